"""Processes of a local fleet (Linux /proc): daemons found by their pidfiles, and everything they started.

What to stop is decided from pidfiles and parentage only (:func:`tree`), never from
where a process runs: a user's shell, ``less`` or ``tail -f`` in ``.demo/`` is not the demo's.
"""

import contextlib
import os
import signal
import time
from pathlib import Path


def _cmdline(pid):
    try:
        return [os.fsdecode(a) for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return []


def alive(pid):
    """True while pid exists and is not a zombie."""
    return _stat(pid) is not None


def pid_from_file(pidfile, marker):
    """The pid in pidfile when that process is alive and its command line holds marker, else None."""
    try:
        pid = int(Path(pidfile).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if runs(pid, marker) else None


def runs(pid, marker):
    """True when pid is alive and its command line holds marker (a recycled pid does not)."""
    return alive(pid) and any(marker in arg for arg in _cmdline(pid))


def parent(pid):
    """The parent pid of a live pid, else None."""
    stat = _stat(pid)
    return stat[0] if stat else None


def _stat(pid):
    """(ppid, start time in clock ticks) of a live, non-zombie pid, else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[19])


def _ancestors():
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        stat = _stat(pid)
        if stat is None:
            break
        pid = stat[0]
    return pids


def tree(roots):
    """{pid: (start time, command line)} of the live ``roots`` and all their descendants, this process excluded.

    The start time tells a process from a later one that got its pid (:func:`still_running`).
    """
    parents, started = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat:
                parents[int(entry.name)], started[int(entry.name)] = stat
    children = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    mine = _ancestors()
    found, todo = {}, [pid for pid in roots if pid in parents]
    while todo:
        pid = todo.pop()
        if pid in found or pid in mine:
            continue
        found[pid] = (started[pid], " ".join(_cmdline(pid)))
        todo.extend(children.get(pid, ()))
    return found


def still_running(snapshot):
    """{pid: command line} of the processes of a :func:`tree` snapshot that still run (same pid, same start)."""
    running = {}
    for pid, (started, cmdline) in snapshot.items():
        stat = _stat(pid)
        if stat and stat[1] == started:
            running[pid] = cmdline
    return running


def processes_under(folder):
    """{pid: command line} of the live processes whose command line, cwd or executable lies in folder.

    For tests, to see what is left in a sandbox they made; it also finds whoever
    merely looks at the folder, so it never decides what the demo stops.
    """
    folder = str(Path(folder).resolve())
    prefix = folder.rstrip("/") + "/"
    mine = _ancestors()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        pid = int(entry.name)
        args = _cmdline(pid)
        places = []
        for link in ("cwd", "exe"):
            with contextlib.suppress(OSError):
                places.append(os.readlink(entry / link))
        if (
            any(arg == folder or prefix in arg for arg in args)
            or any(p == folder or p.startswith(prefix) for p in places)
        ) and alive(pid):
            found[pid] = " ".join(args)
    return found


def stop(pids, timeout=30.0):
    """SIGTERM each pid, wait up to timeout for all to exit, SIGKILL the rest; return the pids killed."""
    pids = [p for p in pids if alive(p)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    killed = [p for p in pids if alive(p)]
    for pid in killed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return killed
