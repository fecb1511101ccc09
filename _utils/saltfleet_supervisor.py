"""
A deployment's own supervisord: its generations, and the XML-RPC calls that
drive it (its config: saltfleet_supervisor_conf).

Root starts supervisord from a config in root's state dir; supervisord drops
to the deployment's user before it opens its socket, pidfile and logs. Root
then talks to it over that socket (XML-RPC over HTTP, as supervisorctl),
only after the kernel confirmed (SO_PEERCRED) that whoever listens there runs
as the deployment's user: a socket the user swaps for a link to someone
else's is refused, and a pidfile the user could edit is never read.

What answers there is the user's process, so every answer is hostile input:
each call has one deadline for the whole exchange (not per read) and a bound
on what it reads, and each answer is checked against the shape supervisord
gives (a state is one of supervisord's names, a pid a positive number that
/proc shows the deployment's user runs). Anything else fails the call with
an error naming the socket, never a traceback or a value taken as it came.

Generations: each start of a deployment's supervisord is a generation ``gen``
with its own ``supervisord.<gen>.conf`` and boot script in root's state dir,
and ``run/<gen>.sock``, ``run/<gen>.pid``; the ``supervisord.conf`` and
``supervisord.boot`` links name the one that serves (cron's ``@reboot`` line
runs the boot script). Only a generation root wrote a config for is one: a
socket the user makes in ``run/`` is nobody's. A new release starts under a
new generation beside the serving one, and the old one drains.
"""

import contextlib
import http.client
import os
import re
import socket
import struct
import time
import xmlrpc.client
from pathlib import Path

import salt.loader.context
from salt.exceptions import CommandExecutionError

__virtualname__ = "saltfleet_supervisor"

# Every XML-RPC call returns within this, or the deployment's change fails.
RPC_TIMEOUT = 10
# The most an answer may hold (a process list of a few hundred programs is far less).
RPC_LIMIT = 4 << 20
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


# ------------------------------------------------------------------ XML-RPC


class _Overlong(OSError):
    """An answer longer than RPC_LIMIT."""


class _DeadlineSocket(socket.socket):
    """A unix socket whose every read and write waits only what is left of one deadline, and reads a bounded total."""

    deadline = 0.0
    budget = RPC_LIMIT

    def _left(self):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline")
        self.settimeout(left)

    def recv_into(self, buffer, nbytes=0, flags=0):
        self._left()
        count = super().recv_into(buffer, nbytes, flags)
        self.budget -= count
        if self.budget < 0:
            raise _Overlong("answer too long")
        return count

    def recv(self, bufsize, flags=0):
        self._left()
        data = super().recv(bufsize, flags)
        self.budget -= len(data)
        if self.budget < 0:
            raise _Overlong("answer too long")
        return data

    def sendall(self, data, flags=0):
        self._left()
        return super().sendall(data, flags)


class _Connection(http.client.HTTPConnection):
    """HTTP over supervisord's unix socket, within one deadline, with the listener's uid checked."""

    def __init__(self, path, deadline, uid):
        super().__init__("localhost")
        self.socketfile = str(path)
        self.deadline = deadline
        self.uid = uid

    def connect(self):
        sock = _DeadlineSocket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.deadline = self.deadline
        self.sock = sock
        sock.settimeout(max(0.001, self.deadline - time.monotonic()))
        sock.connect(self.socketfile)
        _, uid, _ = peer(sock)
        if self.uid is not None and uid != self.uid:
            sock.close()
            raise PermissionError(f"{self.socketfile} is served by uid {uid}, not the deployment's user")


class _Transport(xmlrpc.client.Transport):
    """XML-RPC through a new ``_Connection`` for every call (supervisord's own transport does the same)."""

    def __init__(self, path, deadline, uid):
        super().__init__()
        self.connection_args = (path, deadline, uid)

    def make_connection(self, host):
        return _Connection(*self.connection_args)


def peer(sock):
    """(pid, uid, gid) the process that listens on a connected unix socket had when it began to listen."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)


def rpc(sock, uid, timeout=RPC_TIMEOUT):
    """supervisord's XML-RPC ``supervisor`` namespace on ``sock``, served by ``uid``: its calls within ``timeout``."""
    transport = _Transport(sock, time.monotonic() + timeout, uid)
    return xmlrpc.client.ServerProxy("http://localhost", transport=transport, allow_none=True).supervisor


def _failed(sock, exc):
    if isinstance(exc, TimeoutError | socket.timeout):
        return CommandExecutionError(f"supervisord on {sock} did not answer within {RPC_TIMEOUT} s")
    if isinstance(exc, _Overlong):
        return CommandExecutionError(f"supervisord on {sock} answered more than {RPC_LIMIT} bytes; refused")
    if isinstance(exc, PermissionError):
        return CommandExecutionError(f"{exc}: root talks to no one else there; move it away")
    if isinstance(exc, xmlrpc.client.Fault):
        return CommandExecutionError(f"supervisord on {sock} refused: {str(exc.faultString)[:200]}")
    return CommandExecutionError(f"supervisord on {sock} did not answer: {str(exc)[:200]}")


def _bad(sock, what, value):
    return CommandExecutionError(f"supervisord on {sock} answered {what} {repr(value)[:80]}, which it never gives")


def call(sock, uid, method, *args):
    """One XML-RPC call; a clear error when supervisord refuses or does not answer in time."""
    try:
        return getattr(rpc(sock, uid), method)(*args)
    except (OSError, xmlrpc.client.Error, http.client.HTTPException, ValueError) as exc:
        raise _failed(sock, exc) from None


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
    try:
        server = rpc(sock, uid)
        # supervisord's own word for its pid: it listens before it daemonizes, so
        # the socket's peer pid is the parent that exited.
        state, pid = server.getState(), server.getPID()
    except (ConnectionRefusedError, ConnectionResetError, BrokenPipeError, FileNotFoundError, xmlrpc.client.Fault):
        # Nothing listens, or a supervisord that is going away hung up.
        return None
    except (OSError, xmlrpc.client.Error, http.client.HTTPException, ValueError) as exc:
        raise _failed(sock, exc) from None
    statename = _state(sock, state)
    if owned_pid(pid, uid) is None:
        raise _bad(sock, "its pid as", pid)
    return statename, pid


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
    for path in [*p["state"].glob("supervisord.*.conf"), *p["state"].glob("supervisord.*.boot")]:
        if path.name.split(".")[1] not in keep and not path.is_symlink():
            path.unlink(missing_ok=True)


def start(cfg, settings, p, gen, uid):
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
        # A generation started before boot scripts: its env is in its config.
        argv = [_utils("saltfleet_files.trusted_tool")("supervisord", settings["supervisord"]), "-c", str(g["conf"])]
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    deadline = time.monotonic() + START_TIMEOUT
    said = _utils("saltfleet_user.run_root")(argv, env, START_TIMEOUT, daemon=True).stdout
    while time.monotonic() < deadline:
        answer = answers(g["socket"], uid)
        if answer and answer[0] == "RUNNING":
            return {"pid": answer[1], "start": process_start(answer[1])}
        time.sleep(0.1)
    said = _utils("saltfleet_user.scrub")(said.strip()[-500:], cfg["env"])
    raise CommandExecutionError(
        f"supervisord did not start: {said or 'no output'} (see {p['logs'] / f'supervisord.g{gen}.log'})"
    )


def shutdown(sock, uid):
    """
    Tell the supervisord on ``sock`` to stop every program at once (SIGTERM;
    each finishes its task in hand up to stopwaitsecs) and exit. supervisord's
    own shutdown alone stops one group after another, and the groups not yet
    signalled would go on taking tasks meanwhile. False when none answered.
    """
    try:
        server = rpc(sock, uid)
        server.stopAllProcesses(False)
        server.shutdown()
    except (OSError, xmlrpc.client.Error, http.client.HTTPException, ValueError):
        return False
    return True


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


def stop_all(p, uid, draining=None, timeout=700):
    """
    Stop every supervisord of a deployment, draining ones too, and wait for
    them (each program finishes its task in hand, up to ``timeout``); past it,
    what is left of them is killed. The gens that ran.
    """
    running = generations(p, uid, draining)
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
    return _records(sock, call(sock, uid, "getAllProcessInfo"), keys)


def proc_name(info):
    return info["name"] if info["group"] == info["name"] else f"{info['group']}:{info['name']}"


def _autostart(sock, uid):
    """(group, name) of the programs supervisord starts by itself."""
    keys = {"name": _name, "group": _name, "autostart": lambda v: isinstance(v, bool)}
    return {
        (c["group"], c["name"]) for c in _records(sock, call(sock, uid, "getAllConfigInfo"), keys) if c["autostart"]
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


def stop_groups(sock, uid, groups, timeout=3600):
    """Stop groups together: SIGTERM, then supervisord waits up to each program's stopwaitsecs."""
    for group in groups:
        with contextlib.suppress(CommandExecutionError):
            call(sock, uid, "stopProcessGroup", group, False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(i["group"] in groups and i["statename"] in BUSY for i in process_info(sock, uid)):
            return
        time.sleep(0.2)


def start_groups(sock, uid, groups):
    for group in groups:
        call(sock, uid, "startProcessGroup", group, False)


def apply_group_changes(sock, uid, diff):
    """What ``supervisorctl update`` does, limited to the groups in ``diff``; stopped groups stop gracefully."""
    call(sock, uid, "reloadConfig")
    stop_groups(sock, uid, diff["removed"] + diff["changed"])
    for group in diff["removed"] + diff["changed"]:
        with contextlib.suppress(CommandExecutionError):
            call(sock, uid, "removeProcessGroup", group)
    for group in diff["changed"] + diff["added"]:
        call(sock, uid, "addProcessGroup", group)


def restart_groups(sock, uid, groups):
    """
    Restart groups gracefully (SIGTERM, each program's stopwaitsecs for the
    task in hand), all at once; return {name: state} of those not RUNNING after.
    """
    if not groups:
        return {}
    stop_groups(sock, uid, groups)
    start_groups(sock, uid, groups)
    return wait_running(sock, uid, groups=set(groups))
