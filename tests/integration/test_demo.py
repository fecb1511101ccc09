"""
`make demo` then `make demo-down`, as a user runs them: the fleet comes up
with its deployments RUNNING, the printed commands work from another shell, a
second `make demo` converges without duplicating anything, and `make demo-down`
leaves no process started from .demo/.
"""

import os
import re
import subprocess
import sys
import time

import pytest

from localfleet import demo, procs
from localfleet.config import REPO

# The tests already run in the repository's venv: `make` must not re-sync it underneath them.
MAKE = ["make", "--no-print-directory", "-o", ".venv/.synced"]


def make(target, timeout=600):
    started = time.monotonic()
    proc = subprocess.run(
        [*MAKE, target],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"},
    )
    return proc, time.monotonic() - started


def printed_commands(output):
    """The `salt ... -c .demo/etc/salt ...` lines the demo prints for the user."""
    return [
        line.strip() for line in output.splitlines() if re.match(r"^\s+salt(-run|-cloud)? -c \.demo/etc/salt ", line)
    ]


def demo_processes():
    return procs.processes_under(demo.DEMO) if demo.DEMO.exists() else {}


@pytest.fixture(scope="module")
def demo_up():
    first, first_elapsed = make("demo")
    try:
        yield first, first_elapsed
    finally:
        down, _ = make("demo-down")
        assert down.returncode == 0, down.stdout + down.stderr


def test_make_demo_brings_the_fleet_up(demo_up):
    proc, elapsed = demo_up
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert elapsed < 300, f"make demo took {elapsed:.0f} s"
    # One progress line per step, in order.
    steps = re.findall(r"^==> \[(\d)/(\d)\]", out, re.M)
    assert [int(s) for s, _ in steps] == list(range(1, int(steps[0][1]) + 1))
    table = out[re.search(r"^\$ salt-run -c \.demo/etc/salt .*fleet\.inventory$", out, re.M).end() :]
    assert re.search(r"^demo-worker-1\s+up\s+local\s.*sample-fetcher main@\w{8} 2/2 RUNNING", table, re.M), table
    assert re.search(r"^demo-worker-2\s+up\s+local\s.*sample-reporter main@\w{8} 1/1 RUNNING", table, re.M), table
    # A worker really consumed a task.
    assert "{'platform': 'instagram', 'version': '1'" in out
    assert "make demo-down" in out
    assert printed_commands(out)


def test_printed_commands_work_from_another_shell(demo_up):
    commands = printed_commands(demo_up[0].stdout)
    ping = next(c for c in commands if "test.ping" in c)
    proc = subprocess.run(
        f"{ping} --out=json --static",
        shell=True,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"},
    )
    assert proc.returncode == 0, proc.stderr
    assert '"demo-worker-1": true' in proc.stdout
    assert '"demo-worker-2": true' in proc.stdout


def test_listens_on_loopback_only(demo_up):
    master = demo.read_master_config()
    assert master["interface"] == "127.0.0.1"
    listening = subprocess.run(["ss", "-Htlnp"], capture_output=True, text=True, check=False).stdout
    pids = set(demo_processes())
    for line in listening.splitlines():
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if owners & pids:
            local = line.split()[3]
            assert local.startswith("127.0.0.1:"), line


def test_second_make_demo_converges_without_duplicates(demo_up):
    before = demo_processes()
    proc, _ = make("demo")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "demo-worker-1 exists and runs" in proc.stdout
    assert "$ salt-cloud -c .demo/etc/salt -p" not in proc.stdout
    after = demo_processes()
    # The same long-running processes: nothing restarted, nothing doubled.
    daemons = re.compile(r"salt-master .*MainProcess|salt-minion .*MinionProcessManager|supervisord -c")
    assert sorted(p for p, c in after.items() if daemons.search(c)) == sorted(
        p for p, c in before.items() if daemons.search(c)
    )
    assert sum(1 for c in after.values() if "salt-master" in c and "MainProcess" in c) == 1


def test_make_demo_down_leaves_nothing_running(demo_up):
    proc, _ = make("demo-down")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert demo_processes() == {}
    assert not demo.master_pid()
    # And it is harmless when there is nothing left to stop.
    again, _ = make("demo-down")
    assert again.returncode == 0, again.stdout + again.stderr
