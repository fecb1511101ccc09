"""
Each deployment's processes in a control group (cgroup v2) of their own.

A process can leave a cgroup only for one whose ``cgroup.procs`` it may
write, and every cgroup here is root's: whatever the deployment's code does
(a double fork, ``setsid``, a daemonizing library), its processes stay in
the deployment's cgroup, and removal kills all of them there. The cgroup is
the deployment's user's on the host (a user runs one deployment: the schema
says so), named by the user's home under the host's root: supervisord
enters it in its boot script, while still root, and every command root
starts as that user enters it before it runs as the user
(``saltfleet_user``), whatever it is for. Root's own deployments (a
sandbox's demo) are not contained: there is no one to contain them from. A
host without a writable cgroup v2 hierarchy (an old kernel, a container
that hides it) keeps deployments uncontained, and removal then stops what
supervisord knows of.
"""

import contextlib
import hashlib
import os
import signal
import time
from pathlib import Path

from salt.exceptions import CommandExecutionError

__virtualname__ = "saltfleet_cgroup"

MOUNTS = "/proc/self/mounts"
# Where saltfleet's cgroups go, under the cgroup v2 hierarchy's root.
PARENT = "saltfleet"


def __virtual__():
    return __virtualname__


def hierarchy():
    """The cgroup v2 hierarchy's mount point, or None where the host has none."""
    with contextlib.suppress(OSError):
        for line in Path(MOUNTS).read_text().splitlines():
            fields = line.split()
            if len(fields) > 2 and fields[2] == "cgroup2" and "\\" not in fields[1]:
                return Path(fields[1])
    return None


def name(home):
    """The cgroup of the user whose home (under the host's root) is ``home``, relative to the hierarchy."""
    digest = hashlib.sha256(str(home).encode()).hexdigest()[:12]
    return f"{PARENT}/{Path(home).name}-{digest}"


def folder(home):
    """The user's cgroup folder, made when missing; None when the host has none to give."""
    base = hierarchy()
    if base is None:
        return None
    path = base / name(home)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return path


def enter_line(p, uid):
    """The boot script's line that moves its shell (root, before it drops to ``uid``) into the user's cgroup."""
    base = hierarchy()
    if base is None or uid == 0:
        return None
    path = base / name(p["home"])
    return f'mkdir -p "{path}" 2>/dev/null; echo $$ > "{path}/cgroup.procs" || exit 126'


def opener(home):
    """
    A descriptor of the user's ``cgroup.procs`` opened by root (close-on-exec),
    or None: a child writes "0" to it, before it becomes the user, to enter.
    """
    path = folder(home)
    return None if path is None else os.open(path / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)


def members(path):
    """The pids in cgroup ``path``."""
    try:
        return [int(pid) for pid in (Path(path) / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def kill(p, timeout=10):
    """
    Kill every process in the deployment's cgroup and remove it: the pids it
    held. None when the host gives no cgroup; an error when some outlive ``timeout``.
    """
    base = hierarchy()
    if base is None:
        return None
    path = base / name(p["home"])
    if not path.is_dir():
        return []
    found = members(path)
    deadline = time.monotonic() + timeout
    while True:
        left = members(path)
        if not left:
            break
        if time.monotonic() > deadline:
            raise CommandExecutionError(f"processes {left} of cgroup {path} outlived SIGKILL for {timeout} s")
        if (path / "cgroup.kill").exists():
            (path / "cgroup.kill").write_text("1")
        else:
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    while path.exists():
        try:
            path.rmdir()
        except OSError:
            if time.monotonic() > deadline:
                raise CommandExecutionError(f"cgroup {path} stays after its processes were killed") from None
            time.sleep(0.05)
    return found
