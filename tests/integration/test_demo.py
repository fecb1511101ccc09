"""
`make demo` then `make demo-down`, as a newcomer runs them: in a fresh clone
at a long path inside a directory no other user may enter (a clone in root's
0700 home, say), the fleet comes up with its deployments RUNNING, the printed
commands work from another shell, a second `make demo` converges without
duplicating anything, and `make demo-down` stops every process the demo
started and nothing else.

The clone and its first `make demo` are the module's; a test that needs the
demo running starts it again when a test before it stopped it
(`demo_running`). The clone builds its own venv from the run's uv cache.
"""

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from localfleet import procs
from localfleet.config import REPO

# As a newcomer clones it: a path of at least 60 characters inside a 0700 home.
CLONE_PATH = ("home", "newcomer", "src", "github.com", "example-org", "saltfleet")


def clone_of_this_checkout(dest):
    """``git clone`` of the repository at ``dest``, with this working tree's changes on top."""
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(dest)], check=True)
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--modified", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout
    for rel in filter(None, listed.decode().split("\0")):
        source = REPO / rel
        if source.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / rel)
        elif not source.exists():
            (dest / rel).unlink(missing_ok=True)


@pytest.fixture(scope="module")
def checkout():
    home = Path(tempfile.mkdtemp(prefix="sf-newcomer-"))
    assert home.stat().st_mode & 0o777 == 0o700
    dest = home.joinpath(*CLONE_PATH)
    assert len(str(dest)) >= 60, dest
    clone_of_this_checkout(dest)
    yield dest
    shutil.rmtree(home, ignore_errors=True)


def make(checkout, target, timeout=900):
    # The run's uv cache (and uv itself): the clone's venv builds without downloading anything.
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["UV_CACHE_DIR"] = str(REPO / ".cache" / "uv")
    return subprocess.run(
        ["make", "--no-print-directory", f"UV={REPO / '.tools' / 'bin' / 'uv'}", target],
        cwd=checkout,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )


def query(checkout, expression):
    """``expression`` over the clone's ``localfleet.demo`` (as ``demo``), evaluated by the clone's own Python."""
    code = f"import json; from localfleet import daemons, demo, procs; print(json.dumps({expression}))"
    proc = subprocess.run(
        [str(checkout / ".venv" / "bin" / "python"), "-c", code],
        cwd=checkout,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(proc.stdout)


def printed_commands(output):
    """The `salt ... -c .demo/etc/salt ...` lines the demo prints for the user."""
    return [
        line.strip() for line in output.splitlines() if re.match(r"^\s+salt(-run|-cloud)? -c \.demo/etc/salt ", line)
    ]


def demo_processes(checkout):
    """{pid: command line} of the demo's daemons and all they started."""
    return {int(pid): cmd for pid, (_, cmd) in query(checkout, "demo.processes()").items()}


def in_demo_folder(checkout):
    """{pid: command line} of whatever runs from .demo/ (the demo's, or anyone's looking at it)."""
    folder = checkout / ".demo"
    return procs.processes_under(folder) if folder.exists() else {}


def socket_link(checkout):
    """The short link by which the demo's daemons know .demo/ (their sockets' paths go through it)."""
    return Path(query(checkout, "str(daemons.alias_of(demo.DEMO))"))


@pytest.fixture(scope="module")
def demo_up(checkout):
    first = make(checkout, "demo")
    try:
        yield first
    finally:
        down = make(checkout, "demo-down")
        assert down.returncode == 0, down.stdout + down.stderr


def demo_is_up(checkout):
    return query(
        checkout, "bool(demo.master_pid()) and all(demo.instances().get(n) == 'running' for n in demo.WORKERS)"
    )


@pytest.fixture
def demo_running(checkout, demo_up):
    """The demo up, whatever a test before did to it: `make demo` again when something of it is stopped."""
    if not demo_is_up(checkout):
        proc = make(checkout, "demo")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert demo_is_up(checkout)
    return demo_up


def test_make_demo_brings_the_fleet_up(checkout, demo_up):
    out = demo_up.stdout
    assert demo_up.returncode == 0, out[-3000:] + demo_up.stderr[-3000:]
    # One progress line per step, in order.
    steps = re.findall(r"^==> \[(\d+)/(\d+)\]", out, re.M)
    assert [int(s) for s, _ in steps] == list(range(1, int(steps[0][1]) + 1))
    table = out[re.search(r"^\$ salt-run -c \.demo/etc/salt .*fleet\.inventory$", out, re.M).end() :]
    assert re.search(r"^demo-worker-1\s+up\s+local\s.*sample-fetcher main@\w{8} 2/2 RUNNING", table, re.M), table
    assert re.search(r"^demo-worker-2\s+up\s+local\s.*sample-reporter main@\w{8} 1/1 RUNNING", table, re.M), table
    # A worker really consumed a task.
    assert "{'platform': 'instagram', 'version': '1'" in out
    assert re.search(r"^The demo fleet runs \(\d+ s\)\.", out, re.M), out[-3000:]
    # Its logs are where the demo says, inside the clone.
    assert (checkout / ".demo" / "var" / "log" / "salt" / "master").stat().st_size
    assert (checkout / ".demo" / "var" / "log" / "salt" / "cloud").is_file()
    assert "make demo-down" in out
    assert printed_commands(out)


def test_sockets_live_at_short_paths_whatever_the_checkouts_path(checkout, demo_running):
    link = socket_link(checkout)
    assert link.is_symlink() and link.resolve() == (checkout / ".demo").resolve()
    listening = subprocess.run(["ss", "-Hxl"], capture_output=True, text=True, check=True).stdout.splitlines()
    # Netid, State, Recv-Q, Send-Q, then the socket's path.
    sockets = [line.split()[4] for line in listening if line.split()[4].startswith(f"{link}/")]
    # The master's, each minion's and each deployment's supervisord socket, all through the link.
    assert any(s.endswith("master_event_pub.ipc") for s in sockets), sockets
    assert sum("/minions/demo-worker-" in s and "minion_event_" in s for s in sockets) >= 2, sockets
    # (supervisord binds "<socket>.<pid>" and renames it: the kernel reports the name it bound)
    supervisords = [s for s in sockets if re.search(r"/var/lib/saltfleet/deployments/[^/]+/run/\d+\.sock\.\d+$", s)]
    assert len(supervisords) == 2, sockets
    assert all(len(s.encode()) <= 107 for s in sockets)


def shell(checkout, line, env):
    """A line the demo printed, typed into a shell in the clone."""
    return subprocess.run(
        line, shell=True, cwd=checkout, capture_output=True, text=True, timeout=300, check=False, env=env
    )


def activated(checkout):
    """The environment of a user who activated the clone's venv."""
    return {**os.environ, "PATH": f"{checkout / '.venv' / 'bin'}:{os.environ['PATH']}"}


def test_printed_commands_work_from_another_shell(checkout, demo_running):
    commands = printed_commands(demo_running.stdout)
    ping = next(c for c in commands if "test.ping" in c)
    proc = shell(checkout, f"{ping} --out=json --static", activated(checkout))
    assert proc.returncode == 0, proc.stderr
    assert '"demo-worker-1": true' in proc.stdout
    assert '"demo-worker-2": true' in proc.stdout


def without_venv():
    """The environment of a user who has not activated the venv: nothing of a venv on PATH."""
    path = [p for p in os.environ["PATH"].split(os.pathsep) if p and not (Path(p) / "activate").exists()]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    return {**env, "PATH": os.pathsep.join(path or ["/usr/bin", "/bin"])}


def inventory_groups(graph):
    """{group: [hosts]} of `ansible-inventory --graph` output."""
    groups, current = {}, None
    for line in graph.splitlines():
        name = line.rsplit("--", 1)[-1].strip() if "--" in line else line.strip()
        if name.startswith("@"):
            current = name[1:].rstrip(":")
            groups.setdefault(current, [])
        elif current and name:
            groups[current].append(name)
    return groups


def test_ansible_inventory_script_needs_no_venv_on_path(checkout, demo_running):
    printed = demo_running.stdout.splitlines()
    command = next(line for line in printed if "localfleet/ansible_inventory.py --list" in line).split("#", 1)[0]
    proc = shell(checkout, command.strip(), without_venv())
    assert proc.returncode == 0, proc.stderr
    inventory = json.loads(proc.stdout)
    assert inventory["deployment_sample_fetcher"]["hosts"] == ["demo-worker-1"]
    assert inventory["deployment_sample_reporter"]["hosts"] == ["demo-worker-2"]
    assert sorted(inventory["salt_up"]["hosts"]) == ["demo-worker-1", "demo-worker-2"]
    assert inventory["_meta"]["hostvars"]["demo-worker-1"]["ansible_host"] == "127.0.0.1"


def test_ansible_reads_the_fleet_through_the_inventory_script(checkout, demo_running):
    ansible_inventory = shutil.which("ansible-inventory", path=without_venv()["PATH"])
    if not ansible_inventory:
        pytest.fail("`ansible-inventory` is needed to check the inventory script: apt-get install ansible-core")
    proc = subprocess.run(
        [ansible_inventory, "-i", "localfleet/ansible_inventory.py", "--graph"],
        cwd=checkout,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**without_venv(), "SALT_CONFIG_DIR": ".demo/etc/salt", "ANSIBLE_INVENTORY_UNPARSED_FAILED": "true"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    groups = inventory_groups(proc.stdout)
    assert groups.get("deployment_sample_fetcher") == ["demo-worker-1"], proc.stdout
    assert groups.get("deployment_sample_reporter") == ["demo-worker-2"], proc.stdout
    assert sorted(groups.get("provider_local", [])) == ["demo-worker-1", "demo-worker-2"], proc.stdout


def test_listens_on_loopback_only(checkout, demo_running):
    master = query(checkout, "demo.read_master_config()")
    assert master["interface"] == "127.0.0.1"
    ss = shutil.which("ss")
    if not ss:
        pytest.fail("`ss` (iproute2) is needed to check what the demo listens on: apt-get install iproute2")
    # TCP listeners and bound UDP sockets, numeric, with their processes; check=True: a failing ss fails the test.
    listening = subprocess.run([ss, "-Htulnp"], capture_output=True, text=True, check=True).stdout
    pids = set(demo_processes(checkout))
    assert pids, "no demo process found"
    mine = []
    for line in listening.splitlines():
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if owners & pids:
            netid, local = line.split()[0], line.split()[4]
            assert local.startswith("127.0.0.1:"), line
            mine.append((netid, int(local.rsplit(":", 1)[1])))
    # The check saw the demo's sockets: at least the master's two ports.
    assert {("tcp", master["publish_port"]), ("tcp", master["ret_port"])} <= set(mine), listening


def test_second_make_demo_converges_without_duplicates(checkout, demo_running):
    before = demo_processes(checkout)
    proc = make(checkout, "demo")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "demo-worker-1 exists and runs" in proc.stdout
    assert "$ salt-cloud -c .demo/etc/salt -p" not in proc.stdout
    after = demo_processes(checkout)
    # The same long-running processes: nothing restarted, nothing doubled.
    daemons = re.compile(r"salt-master .*MainProcess|salt-minion .*MinionProcessManager|supervisord -c")
    assert {p: c for p, c in after.items() if daemons.search(c)} == {
        p: c for p, c in before.items() if daemons.search(c)
    }
    assert sum(1 for c in after.values() if "salt-master" in c and "MainProcess" in c) == 1


def test_make_demo_down_stops_the_demo_and_nothing_else(checkout, demo_running):
    started_by_demo = demo_processes(checkout)
    assert started_by_demo
    link = socket_link(checkout)
    # A user's processes that run in .demo/ or read its files are not the demo's.
    log = checkout / ".demo" / "var" / "log" / "salt" / "master"
    bystanders = [
        subprocess.Popen(["sleep", "600"], cwd=checkout / ".demo"),
        subprocess.Popen(["tail", "-f", str(log)], cwd=checkout / ".demo", stdout=subprocess.DEVNULL),
    ]
    try:
        proc = make(checkout, "demo-down")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert [b.poll() for b in bystanders] == [None, None], proc.stdout
        left = {pid: cmd for pid, cmd in started_by_demo.items() if procs.alive(pid)}
        assert left == {}
        ignored = {b.pid for b in bystanders}
        assert {pid: cmd for pid, cmd in in_demo_folder(checkout).items() if pid not in ignored} == {}
        # Nothing runs through the short link either, and the link is gone.
        assert not os.path.lexists(link)
        assert {pid: cmd for pid, cmd in procs.processes_under(link).items()} == {}
    finally:
        for bystander in bystanders:
            bystander.kill()
            bystander.wait()
    # And it is harmless when there is nothing left to stop.
    again = make(checkout, "demo-down")
    assert again.returncode == 0, again.stdout + again.stderr
    assert not os.path.lexists(link)


def test_the_printed_fleet_deploy_rolls_the_second_revision_out(checkout, demo_running):
    """The rollout the demo prints, typed into another shell: every fetcher then answers with version 2."""
    printed = demo_running.stdout
    assert "fleet.status" in printed.split("The demo fleet runs")[0], "make demo ends by printing fleet.status"
    line = next(c for c in printed_commands(printed) if "fleet.deploy" in c).split("#", 1)[0].strip()
    env = activated(checkout)
    try:
        proc = shell(checkout, line, env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "demo-worker-1" in proc.stdout
        task = shell(checkout, query(checkout, "demo.task_command()"), env)
        assert task.returncode == 0, task.stderr
        assert "'version': '2'" in task.stdout
    finally:
        # Back to the branch pillar names, for the tests after this one.
        salt = ["salt", "-c", ".demo/etc/salt", "demo-worker-1"]
        shell(checkout, " ".join([*salt, "deployment.unpin", "sample-fetcher"]), env)
        shell(checkout, " ".join([*salt, "state.apply"]), env)
