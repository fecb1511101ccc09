"""
A deployment's own supervisord: its generations, and the calls that drive it
(its config: saltfleet_supervisor_conf; the XML-RPC under them:
saltfleet_xmlrpc).

Root starts supervisord from a config in root's state dir; supervisord drops
to the deployment's user before it opens its socket, pidfile and logs. Root
then talks to it over that socket only (saltfleet_xmlrpc: the listener must
be the user), and a pidfile the user could edit is never read. Every answer
is checked against the shape supervisord gives (a state is one of
supervisord's names, a pid a positive number that /proc shows the
deployment's user runs); anything else fails the call with an error naming
the socket, never a value taken as it came.

Generations: each start of a deployment's supervisord is a generation ``gen``
with its own ``supervisord.<gen>.conf`` and boot script in root's state dir,
and ``run/<gen>.sock``, ``run/<gen>.pid``; the ``supervisord.conf`` and
``supervisord.boot`` links name the one that serves (cron's ``@reboot`` line
runs the boot script). Only a generation root wrote a config for is one: a
socket the user makes in ``run/`` is nobody's. A new release starts under a
new generation beside the serving one, and the old one drains.
"""

import contextlib
import os
import re
import time
from pathlib import Path

import salt.loader.context
from salt.exceptions import CommandExecutionError

__virtualname__ = "saltfleet_supervisor"

START_TIMEOUT = 30
BUSY = ("STARTING", "RUNNING", "BACKOFF", "STOPPING")
IDLE = ("STOPPED", "EXITED", "FATAL")
PROCESS_STATES = (*BUSY, *IDLE, "UNKNOWN")
SUPERVISOR_STATES = ("FATAL", "RUNNING", "RESTARTING", "SHUTDOWN")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
GENERATION_RE = re.compile(r"^[1-9][0-9]{0,5}$")


def __virtual__():
    return __virtualname__


def _utils(name):
    # Salt's utils loader packs no __utils__ into utils modules. The loader in
    # context is that mapping while one of their functions runs, or the loader
    # module's whose code runs on (a context manager's body) and holds it.
    loader = salt.loader.context.loader_ctxvar.get()
    return loader.pack.get("__utils__", loader)[name]


def _call(sock, uid, method, *args):
    return _utils("saltfleet_xmlrpc.call")(sock, uid, method, *args)


def _bad(sock, what, value):
    said = _utils("saltfleet_xmlrpc.said")(value)
    return CommandExecutionError(f"supervisord on {sock} answered {what} {said}, which it never gives")


def _state(sock, answer):
    if not isinstance(answer, dict) or answer.get("statename") not in SUPERVISOR_STATES:
        raise _bad(sock, "a state", answer)
    return answer["statename"]


def owned_pid(value, uid):
    """``value`` when it is a pid /proc shows ``uid`` running (a live, non-zombie process), else None."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        return None
    try:
        status = Path(f"/proc/{value}/status").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    uids = fields.get("Uid", "").split()
    if not uids or int(uids[0]) != uid or fields.get("State", "").strip().startswith("Z"):
        return None
    return value


def answers(sock, uid):
    """
    (state, pid) of the supervisord answering on ``sock`` as ``uid`` (state
    RUNNING, SHUTDOWN...), None when nothing listens there; an error when
    something listens but does not answer in time, is not the user's, or
    answers what supervisord never would.
    """
    if not os.path.lexists(sock):
        return None
    # supervisord's own word for its pid: it listens before it daemonizes, so
    # the socket's peer pid is the parent that exited.
    said = _utils("saltfleet_xmlrpc.ask")(sock, uid, ("getState",), ("getPID",))
    if said is None:
        return None
    state, pid = said
    statename = _state(sock, state)
    # supervisord daemonizes into a session of its own: a pid it gives is a session leader the user runs.
    if owned_pid(pid, uid) is None or _session(pid) != pid:
        raise _bad(sock, "its pid as", pid)
    return statename, pid


def _session(pid):
    try:
        return os.getsid(pid)
    except OSError:
        return None


# -------------------------------------------------------------- processes


def process_start(pid):
    """When ``pid`` started (clock ticks since boot), or None when it is no pid, gone or a zombie."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else int(fields[19])


def alive(record):
    """True while a recorded process ({pid, start}) still runs (the same one, not a reused pid)."""
    return bool(record) and record.get("start") is not None and process_start(record.get("pid")) == record["start"]


# ------------------------------------------------------------ generations


def serving(p):
    """The generation the ``supervisord.conf`` link (root's) names, or None before the first start."""
    try:
        gen = os.readlink(p["conf"]).removeprefix("supervisord.").removesuffix(".conf")
    except OSError:
        return None
    return gen if GENERATION_RE.match(gen) else None


def known_generations(p):
    """The generations root wrote a config for: the only ones that can be a supervisord root started."""
    names = (c.name.removeprefix("supervisord.").removesuffix(".conf") for c in p["state"].glob("supervisord.*.conf"))
    return sorted(gen for gen in names if GENERATION_RE.match(gen))


def generations(p, uid, draining=None):
    """
    {gen: {"pid", "start", "state"}} of the deployment's supervisords that
    still run: those of root's configs answering on their socket (state
    RUNNING), and those recorded as ``draining`` ({gen: {pid, start, ...}})
    that have not exited yet (state draining; ``answering`` while their
    workers finish their tasks before supervisord is told to stop).
    """
    draining = draining or {}
    found = {}
    for gen in known_generations(p):
        answer = answers(_utils("saltfleet_paths.generation")(p, gen)["socket"], uid)
        if answer and answer[0] == "RUNNING":
            found[gen] = {"pid": answer[1], "start": process_start(answer[1]), "state": "RUNNING"}
            if draining.get(gen, {}).get("pid") == answer[1]:
                found[gen] = {**draining[gen], "state": "draining", "answering": True}
    for gen, record in draining.items():
        if gen not in found and alive(record):
            found[gen] = {**record, "state": "draining"}
    return found


def generation_env(p, gen):
    """
    The env generation ``gen``'s supervisord sourced (root's env file), without
    saltfleet's own ``LANG``; None for a generation without one (started
    before env files: its env is in its config).
    """
    try:
        script = _utils("saltfleet_paths.generation")(p, gen)["env"].read_text()
    except FileNotFoundError:
        return None
    env = _utils("saltfleet_supervisor_conf.boot_env")(script)
    if env.get("LANG") == "C.UTF-8":
        del env["LANG"]
    return env


def secrets(p, env):
    """
    What the deployment's output must never show, as (name, value) pairs:
    ``env`` (its env in pillar) and the env of each generation root keeps (a
    value pillar changed since still runs until the next apply, and its logs
    keep it).
    """
    pairs = {(str(key), str(value)) for key, value in (env or {}).items()}
    for gen in known_generations(p):
        pairs.update((str(key), str(value)) for key, value in (generation_env(p, gen) or {}).items())
    return sorted(pairs)


def free_generation(p, taken):
    """A generation number that neither a running supervisord nor a config of the deployment uses."""
    used = set(taken) | set(known_generations(p))
    return next(str(n) for n in range(1, len(used) + 2) if str(n) not in used)


def link_serving(p, gen):
    """Make ``gen`` the serving generation: the supervisord.conf and .boot links (root's) name its files."""
    g = _utils("saltfleet_paths.generation")(p, gen)
    _utils("saltfleet_files.relink")(p["conf"], g["conf"].name)
    _utils("saltfleet_files.relink")(p["boot"], g["boot"].name)


def prune_confs(p, keep):
    """Remove the configs and boot scripts (they carry env) of generations that neither serve nor run."""
    for path in [
        *p["state"].glob("supervisord.*.conf"),
        *p["state"].glob("supervisord.*.boot"),
        *p["state"].glob("supervisord.*.env"),
    ]:
        if path.name.split(".")[1] not in keep and not path.is_symlink():
            path.unlink(missing_ok=True)


def start(cfg, binary, p, gen, uid):
    """
    Start generation ``gen`` by its boot script (as cron does at boot); return
    {pid, start} once it answers as the user. What supervisord said, if it
    does not start, comes back with the deployment's env values hidden.
    """
    g = _utils("saltfleet_paths.generation")(p, gen)
    if g["boot"].exists():
        _utils("saltfleet_files.check_trusted")(g["boot"])
        argv = [str(g["boot"])]
    else:
        # A generation started before boot scripts: its env is in its config (``binary``: root's supervisord).
        argv = [binary, "-c", str(g["conf"])]
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    deadline = time.monotonic() + START_TIMEOUT
    said = _utils("saltfleet_user.run_root")(argv, env, START_TIMEOUT, daemon=True).stdout
    while time.monotonic() < deadline:
        answer = answers(g["socket"], uid)
        if answer and answer[0] == "RUNNING":
            return {"pid": answer[1], "start": process_start(answer[1])}
        time.sleep(0.1)
    said = _utils("saltfleet_user.scrub")(said.strip(), cfg["env"])[-500:]
    raise CommandExecutionError(
        f"supervisord did not start: {said or 'no output'} (see {_utils('saltfleet_paths.log')(p, 'supervisord', gen)})"
    )


def shutdown(sock, uid):
    """
    Tell the supervisord on ``sock`` to stop every program at once (SIGTERM;
    each finishes its task in hand up to stopwaitsecs) and exit. supervisord's
    own shutdown alone stops one group after another, and the groups not yet
    signalled would go on taking tasks meanwhile. False when none answered.
    """
    try:
        return _utils("saltfleet_xmlrpc.ask")(sock, uid, ("stopAllProcesses", False), ("shutdown",)) is not None
    except CommandExecutionError:
        return False


def wait_exited(records, timeout):
    """Wait until the recorded processes ({gen: {pid, start}}) exited; return those still running."""
    deadline = time.monotonic() + timeout
    while True:
        left = {gen: r for gen, r in records.items() if alive(r)}
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.2)


def kill_session(pid, uid):
    """SIGKILL every process of ``uid`` in the session ``pid`` leads (a supervisord and its programs)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == pid and owned_pid(int(entry.name), uid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), 9)


def stop_all(p, uid, draining=None, timeout=None):
    """
    Stop every supervisord of a deployment, draining ones too, and wait for
    them (each program finishes its task in hand, up to ``timeout``: by
    default what root's configs give their programs); past it, what is left
    of them is killed. The gens that ran.
    """
    running = generations(p, uid, draining)
    if timeout is None:
        confs = (_utils("saltfleet_paths.generation")(p, gen)["conf"] for gen in known_generations(p))
        timeout = max([_utils("saltfleet_supervisor_conf.stop_seconds")(c.read_text()) for c in confs] or [30])
    for gen, info in running.items():
        if info["state"] == "RUNNING" or info.get("answering"):
            shutdown(_utils("saltfleet_paths.generation")(p, gen)["socket"], uid)
    for record in wait_exited(running, timeout).values():
        if owned_pid(record["pid"], uid):
            kill_session(record["pid"], uid)
    left = wait_exited(running, 10)
    if left:
        pids = ", ".join(str(r["pid"]) for r in left.values())
        raise CommandExecutionError(f"supervisord (pid {pids}) did not stop within {timeout} s, nor when killed")
    return sorted(running)


# ------------------------------------------------------------------ programs


def _records(sock, answer, keys):
    """A list of supervisord's records, each with ``keys`` ({key: check}) checked; an error otherwise."""
    if not isinstance(answer, list) or len(answer) > 1000:
        raise _bad(sock, "a list of", answer)
    found = []
    for item in answer:
        if not isinstance(item, dict) or not all(check(item.get(key)) for key, check in keys.items()):
            raise _bad(sock, "a record", item)
        found.append({key: item[key] for key in keys})
    return found


def _name(value):
    return isinstance(value, str) and bool(NAME_RE.match(value))


def process_info(sock, uid):
    """[{name, group, statename, pid}] of supervisord's programs, as checked answers."""
    keys = {
        "name": _name,
        "group": _name,
        "statename": lambda v: v in PROCESS_STATES,
        "pid": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    }
    return _records(sock, _call(sock, uid, "getAllProcessInfo"), keys)


def proc_name(info):
    return info["name"] if info["group"] == info["name"] else f"{info['group']}:{info['name']}"


def _autostart(sock, uid):
    """(group, name) of the programs supervisord starts by itself."""
    keys = {"name": _name, "group": _name, "autostart": lambda v: isinstance(v, bool)}
    return {
        (c["group"], c["name"]) for c in _records(sock, _call(sock, uid, "getAllConfigInfo"), keys) if c["autostart"]
    }


def idle_groups(sock, uid):
    """Groups with a program that should run (autostart) but is STOPPED, EXITED or FATAL."""
    autostart = _autostart(sock, uid)
    return sorted(
        {i["group"] for i in process_info(sock, uid) if (i["group"], i["name"]) in autostart and i["statename"] in IDLE}
    )


def wait_running(sock, uid, groups=None, timeout=120):
    """
    Wait until the programs that start by themselves (autostart) are RUNNING
    (they outlived their startsecs) or supervisord gave up on them; return
    {name: state} of those not RUNNING.
    """
    started = time.monotonic()
    autostart = _autostart(sock, uid)
    while True:
        pending = {
            proc_name(i): i["statename"]
            for i in process_info(sock, uid)
            if (groups is None or i["group"] in groups)
            and (i["group"], i["name"]) in autostart
            and i["statename"] != "RUNNING"
        }
        waited = time.monotonic() - started
        final = all(s == "FATAL" or (s in ("STOPPED", "EXITED") and waited > 2) for s in pending.values())
        if not pending or final or waited > timeout:
            return pending
        time.sleep(0.2)


def stop_groups(sock, uid, groups, timeout):
    """
    Stop groups together: SIGTERM, then supervisord waits up to each
    program's stopwaitsecs; ``timeout`` (from root's config) bounds the wait,
    whatever the programs' states say.
    """
    for group in groups:
        with contextlib.suppress(CommandExecutionError):
            _call(sock, uid, "stopProcessGroup", group, False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(i["group"] in groups and i["statename"] in BUSY for i in process_info(sock, uid)):
            return
        time.sleep(0.2)


def start_groups(sock, uid, groups):
    for group in groups:
        _call(sock, uid, "startProcessGroup", group, False)


def apply_group_changes(sock, uid, diff, timeout):
    """What ``supervisorctl update`` does, limited to the groups in ``diff``; stopped groups stop gracefully."""
    _call(sock, uid, "reloadConfig")
    stop_groups(sock, uid, diff["removed"] + diff["changed"], timeout)
    for group in diff["removed"] + diff["changed"]:
        with contextlib.suppress(CommandExecutionError):
            _call(sock, uid, "removeProcessGroup", group)
    for group in diff["changed"] + diff["added"]:
        _call(sock, uid, "addProcessGroup", group)


def restart_groups(sock, uid, groups, timeout):
    """
    Restart groups gracefully (SIGTERM, each program's stopwaitsecs for the
    task in hand), all at once; return {name: state} of those not RUNNING after.
    """
    if not groups:
        return {}
    stop_groups(sock, uid, groups, timeout)
    start_groups(sock, uid, groups)
    return wait_running(sock, uid, groups=set(groups))
