"""
A deployment's own supervisord: its generations, and the XML-RPC calls that
drive it (its config: saltfleet_supervisor_conf).

Root starts supervisord from a config in root's state dir; supervisord drops
to the deployment's user before it opens its socket, pidfile and logs. Root
then talks to it over that socket (XML-RPC over HTTP, as supervisorctl),
always with a timeout, and only after the kernel confirmed (SO_PEERCRED) that
whoever listens there runs as the deployment's user: a socket the user swaps
for a link to someone else's is refused, and a pidfile the user could edit is
never read.

Generations: each start of a deployment's supervisord is a generation ``gen``
with its own ``supervisord.<gen>.conf``, ``run/<gen>.sock`` and
``run/<gen>.pid``; the ``supervisord.conf`` link in root's state dir names the
one that serves (cron's ``@reboot`` line starts it). A new release starts
under a new generation beside the serving one, and the old one drains.
"""

import contextlib
import http.client
import os
import socket
import struct
import subprocess
import tempfile
import time
import xmlrpc.client
from pathlib import Path

import salt.loader.context
from salt.exceptions import CommandExecutionError

__virtualname__ = "saltfleet_supervisor"

# Every XML-RPC call returns within this, or the deployment's change fails.
RPC_TIMEOUT = 10
START_TIMEOUT = 30
BUSY = ("STARTING", "RUNNING", "BACKOFF", "STOPPING")
IDLE = ("STOPPED", "EXITED", "FATAL")


def __virtual__():
    return __virtualname__


def _utils(name):
    # Salt's utils loader packs no __utils__ into utils modules. The loader in
    # context is that mapping while one of their functions runs, or the loader
    # module's whose code runs on (a context manager's body) and holds it.
    loader = salt.loader.context.loader_ctxvar.get()
    return loader.pack.get("__utils__", loader)[name]


# ------------------------------------------------------------------ XML-RPC


class _Connection(http.client.HTTPConnection):
    """HTTP over supervisord's unix socket, with a timeout and the listener's uid checked."""

    def __init__(self, path, timeout, uid):
        super().__init__("localhost", timeout=timeout)
        self.socketfile = str(path)
        self.uid = uid

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socketfile)
        _, uid, _ = peer(self.sock)
        if self.uid is not None and uid != self.uid:
            self.sock.close()
            raise PermissionError(f"{self.socketfile} is served by uid {uid}, not the deployment's user")


class _Transport(xmlrpc.client.Transport):
    """XML-RPC through a new ``_Connection`` for every call (supervisord's own transport does the same)."""

    def __init__(self, path, timeout, uid):
        super().__init__()
        self.connection_args = (path, timeout, uid)

    def make_connection(self, host):
        return _Connection(*self.connection_args)


def peer(sock):
    """(pid, uid, gid) the process that listens on a connected unix socket had when it began to listen."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)


def rpc(sock, uid, timeout=RPC_TIMEOUT):
    """supervisord's XML-RPC ``supervisor`` namespace on ``sock``, served by ``uid``."""
    transport = _Transport(sock, timeout, uid)
    return xmlrpc.client.ServerProxy("http://localhost", transport=transport, allow_none=True).supervisor


def _failed(sock, exc):
    if isinstance(exc, TimeoutError | socket.timeout):
        return CommandExecutionError(f"supervisord on {sock} did not answer within {RPC_TIMEOUT} s")
    if isinstance(exc, PermissionError):
        return CommandExecutionError(f"{exc}: root talks to no one else there; move it away")
    if isinstance(exc, xmlrpc.client.Fault):
        return CommandExecutionError(f"supervisord on {sock} refused: {exc.faultString}")
    return CommandExecutionError(f"supervisord on {sock} did not answer: {exc}")


def call(sock, uid, method, *args):
    """One XML-RPC call; a clear error when supervisord refuses or does not answer in time."""
    try:
        return getattr(rpc(sock, uid), method)(*args)
    except (OSError, xmlrpc.client.Error) as exc:
        raise _failed(sock, exc) from None


def answers(sock, uid):
    """
    (state, pid) of the supervisord answering on ``sock`` as ``uid`` (state
    RUNNING, SHUTDOWN...), None when nothing listens there; an error when
    something listens but does not answer in time or is not the user's.
    """
    if not os.path.lexists(sock):
        return None
    try:
        server = rpc(sock, uid)
        # supervisord's own word for its pid: it listens before it daemonizes, so
        # the socket's peer pid is the parent that exited.
        return server.getState()["statename"], server.getPID()
    except (ConnectionRefusedError, ConnectionResetError, BrokenPipeError, FileNotFoundError, xmlrpc.client.Fault):
        # Nothing listens, or a supervisord that is going away hung up.
        return None
    except (OSError, xmlrpc.client.Error) as exc:
        raise _failed(sock, exc) from None


# -------------------------------------------------------------- processes


def process_start(pid):
    """When ``pid`` started (clock ticks since boot), or None when it is gone or a zombie."""
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
    """The generation the ``supervisord.conf`` link names, or None before the first start."""
    try:
        return os.readlink(p["conf"]).removeprefix("supervisord.").removesuffix(".conf")
    except OSError:
        return None


def generations(p, uid, draining=None):
    """
    {gen: {"pid", "start", "state"}} of the deployment's supervisords that
    still run: those answering on their socket (state RUNNING), and those
    recorded as ``draining`` ({gen: {pid, start, ...}}) that have not exited
    yet (state draining; ``answering`` while their workers finish their
    tasks before supervisord is told to stop).
    """
    draining = draining or {}
    found = {}
    if p["run"].is_dir():
        for sock in sorted(p["run"].glob("*.sock")):
            answer = answers(sock, uid)
            if answer and answer[0] == "RUNNING":
                gen = sock.name.removesuffix(".sock")
                found[gen] = {"pid": answer[1], "start": process_start(answer[1]), "state": "RUNNING"}
                if draining.get(gen, {}).get("pid") == answer[1]:
                    found[gen] = {**draining[gen], "state": "draining", "answering": True}
    for gen, record in (draining or {}).items():
        if gen not in found and alive(record):
            found[gen] = {**record, "state": "draining"}
    return found


def free_generation(p, taken):
    """A generation number that neither a running supervisord nor a config of the deployment uses."""
    used = set(taken) | {
        c.name.removeprefix("supervisord.").removesuffix(".conf") for c in p["state"].glob("supervisord.*.conf")
    }
    return next(str(n) for n in range(1, len(used) + 2) if str(n) not in used)


def link_serving(p, gen):
    """Make ``gen`` the serving generation: the supervisord.conf link (root's) names its config."""
    _utils("saltfleet_files.relink")(p["conf"], _utils("saltfleet_paths.generation")(p, gen)["conf"].name)


def prune_confs(p, keep):
    """Remove the configs (they carry env) of generations that neither serve nor run."""
    for conf in p["state"].glob("supervisord.*.conf"):
        if conf.name.removeprefix("supervisord.").removesuffix(".conf") not in keep:
            conf.unlink(missing_ok=True)


def start(cfg, settings, p, gen, uid):
    """Start generation ``gen`` from its config; return {pid, start} once it answers as the user."""
    g = _utils("saltfleet_paths.generation")(p, gen)
    binary = _utils("saltfleet_files.trusted_tool")("supervisord", settings["supervisord"])
    # A file, not a pipe: the daemon keeps what it inherited open.
    with tempfile.TemporaryFile() as output:
        subprocess.run(
            [binary, "-c", str(g["conf"])],
            env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"},
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            check=False,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            answer = answers(g["socket"], uid)
            if answer and answer[0] == "RUNNING":
                return {"pid": answer[1], "start": process_start(answer[1])}
            time.sleep(0.1)
        output.seek(0)
        said = output.read().decode(errors="replace").strip()[-500:]
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
    except (OSError, xmlrpc.client.Error):
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


def stop_all(p, uid, draining=None, timeout=700):
    """Stop every supervisord of a deployment, draining ones too, and wait for them; the gens that ran."""
    running = generations(p, uid, draining)
    for gen, info in running.items():
        if info["state"] == "RUNNING" or info.get("answering"):
            shutdown(_utils("saltfleet_paths.generation")(p, gen)["socket"], uid)
    left = wait_exited(running, timeout)
    if left:
        pids = ", ".join(str(r["pid"]) for r in left.values())
        raise CommandExecutionError(f"supervisord (pid {pids}) did not stop within {timeout} s; stop it by hand")
    return sorted(running)


# ------------------------------------------------------------------ programs


def process_info(sock, uid):
    return call(sock, uid, "getAllProcessInfo")


def proc_name(info):
    return info["name"] if info["group"] == info["name"] else f"{info['group']}:{info['name']}"


def _autostart(sock, uid):
    """(group, name) of the programs supervisord starts by itself."""
    return {(c["group"], c["name"]) for c in call(sock, uid, "getAllConfigInfo") if c.get("autostart")}


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
