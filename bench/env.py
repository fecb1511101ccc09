"""What every scenario shares: paths, the sample app's repository, processes, timing."""

import contextlib
import getpass
import pwd
import shutil
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from localfleet import daemons, procs
from localfleet.config import REPO, saltfleet_utils, stop_deployments
from localfleet.daemons import BIN, UV_CACHE, FleetError
from localfleet.sampleapp import SAMPLE_APP

__all__ = ["BIN", "REPO", "UV_CACHE", "BenchError"]

USER = getpass.getuser()
# Revisions of the sample app in the bench's repo: each new-revision run gets one never deployed before.
REVISIONS = 12


class BenchError(FleetError):
    """A scenario could not run as it should (a failed apply is not a measurement)."""


sf = saltfleet_utils()


def environ():
    """The environment of every command (localfleet's), with the repository's uv cache whatever the caller's."""
    return daemons.environ(UV_CACHE_DIR=str(UV_CACHE), UV_NO_PROGRESS="1")


def run(cmd, check=True, timeout=1800, cwd=None, env=None):
    """Run a command, capture its output; raise BenchError with its tail when it fails."""
    proc = subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env=env or environ(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode:
        tail = (proc.stdout + proc.stderr).strip()[-3000:]
        raise BenchError(f"`{' '.join(str(c) for c in cmd)}` exited {proc.returncode}:\n{tail}")
    return proc


def timed(fn, *args, **kwargs):
    """(seconds, result) of one call."""
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - started, result


def median(values):
    return statistics.median(values) if values else None


class Workspace:
    """The bench's temporary directory (short, under /tmp) and the sample app's repo and broker in it."""

    def __init__(self, keep=False):
        self.base = Path(tempfile.mkdtemp(prefix="sfb-", dir="/tmp"))
        self.keep = keep
        self.repo, self.shas = make_sample_repo(self.base / "src")
        self.data = self.base / "data"
        self.data.mkdir()
        self._n = 0
        self.sandboxes = []

    def sandbox(self, prefix="h"):
        """A new, empty, short directory: one fresh host."""
        self._n += 1
        path = self.base / f"{prefix}{self._n}"
        path.mkdir()
        self.sandboxes.append(path)
        return path

    def close(self):
        stop_everything_under(self.base, self.sandboxes)
        if not self.keep:
            shutil.rmtree(self.base, ignore_errors=True)


def git(*args, cwd=None):
    env = dict(
        environ(),
        GIT_AUTHOR_NAME="saltfleet bench",
        GIT_AUTHOR_EMAIL="bench@saltfleet.invalid",
        GIT_COMMITTER_NAME="saltfleet bench",
        GIT_COMMITTER_EMAIL="bench@saltfleet.invalid",
    )
    return run(["git", *args], cwd=cwd, env=env).stdout.strip()


def make_sample_repo(base):
    """A bare repo of the sample app with tags v1..vN (VERSION differs, requirements do not); (path, {tag: sha})."""
    work = base / "sample-app"
    shutil.copytree(SAMPLE_APP, work, ignore=shutil.ignore_patterns("__pycache__"))
    git("init", "-q", "--initial-branch=master", cwd=work)
    app = work / "sampleapp.py"
    source = app.read_text()
    shas = {}
    for n in range(1, REVISIONS + 1):
        app.write_text(source.replace('VERSION = "1"', f'VERSION = "{n}"'))
        git("add", "-A", cwd=work)
        git("commit", "-q", "-m", f"sample app v{n}", cwd=work)
        git("tag", f"v{n}", cwd=work)
        shas[f"v{n}"] = git("rev-parse", "HEAD", cwd=work)
    bare = base / "sample-app.git"
    git("clone", "-q", "--bare", str(work), str(bare))
    return bare, shas


# ------------------------------------------------------------------ supervisord


def wait_programs_running(sock, uid=None, timeout=120):
    """
    Poll the supervisord on ``sock`` (served by ``uid``; None: not checked)
    until every program is RUNNING; raise if one fails or time runs out.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = sf.saltfleet_supervisor.process_info(sock, uid)
        states = {i["name"]: i["statename"] for i in info}
        if states and all(s == "RUNNING" for s in states.values()):
            return
        if any(s in ("FATAL", "EXITED") for s in states.values()):
            raise BenchError(f"programs of {sock} did not start: {states}")
        time.sleep(0.05)
    raise BenchError(f"programs of {sock} not RUNNING within {timeout} s")


def serving_socket(root, user, name):
    """(socket, uid) of the supervisord that serves saltfleet deployment ``name`` under ``root``."""
    p = sf.saltfleet_paths.paths(root, user, name)
    gen = sf.saltfleet_supervisor.serving(p)
    if gen is None:
        raise BenchError(f"deployment {name} under {root} has no serving supervisord")
    return sf.saltfleet_paths.generation(p, gen)["socket"], pwd.getpwnam(user).pw_uid


def _stop_baseline(sock, timeout=60):
    """Stop a baseline's supervisord (supervisor.sock, supervisord.pid beside it) and its programs."""
    pid = procs.pid_from_file(sock.with_name("supervisord.pid"), "supervisord")
    sf.saltfleet_supervisor.shutdown(sock, None)
    if pid:
        deadline = time.monotonic() + timeout
        while procs.alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        procs.stop([pid], timeout=5)


def stop_supervisords(root):
    """
    Stop every supervisord under a host ``root`` (their programs go with them):
    saltfleet's deployments, then the baselines' (``**/supervisor.sock``), all at once.
    """
    stop_deployments(root, timeout=60)
    socks = sorted(Path(root).glob("home/*/*.supervisor/supervisor.sock"))
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(_stop_baseline, socks))


def stop_everything_under(base, roots=()):
    """Last resort at exit: the supervisords of each host root, then whatever this bench started from base."""
    for root in roots:
        with contextlib.suppress(Exception):
            stop_supervisords(root)
    leftovers = procs.processes_under(base) if Path(base).exists() else {}
    if leftovers:
        procs.stop(list(leftovers), timeout=30)
