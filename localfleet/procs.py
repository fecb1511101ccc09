"""Processes of a local fleet, found by pidfile or by the directory they belong to (Linux /proc)."""

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
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def pid_from_file(pidfile, marker):
    """The pid in pidfile when that process is alive and its command line holds marker, else None."""
    try:
        pid = int(Path(pidfile).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) and any(marker in arg for arg in _cmdline(pid)) else None


def _ancestors():
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def processes_under(folder):
    """{pid: command line} of the live processes whose command line, cwd or executable lies in folder."""
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
