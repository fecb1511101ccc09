"""
`make demo` then `make demo-down`, as a user runs them: the fleet comes up
with its deployments RUNNING, the printed commands work from another shell, a
second `make demo` converges without duplicating anything, and `make demo-down`
stops every process the demo started and nothing else.

The first `make demo` is the module's; a test that needs the demo running
starts it again when a test before it stopped it (`demo_running`).
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import requests

from localfleet import demo, procs
from localfleet.api import Api
from localfleet.config import REPO

# The tests already run in the repository's venv: `make` must not re-sync it underneath them.
MAKE = ["make", "--no-print-directory", "-o", ".venv/.synced"]


def make(target, timeout=600):
    return subprocess.run(
        [*MAKE, target],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"},
    )


def printed_commands(output):
    """The `salt ... -c .demo/etc/salt ...` lines the demo prints for the user."""
    return [
        line.strip() for line in output.splitlines() if re.match(r"^\s+salt(-run|-cloud)? -c \.demo/etc/salt ", line)
    ]


def started_by_demo():
    """The demo's daemons (salt-api beside them) and all they started: a procs.tree snapshot."""
    return procs.tree([*demo.daemons(), *filter(None, [Api(demo.DEMO).pid()])])


def demo_processes():
    """{pid: command line} of the demo's daemons and all they started."""
    return {pid: cmdline for pid, (_, cmdline) in started_by_demo().items()}


def in_demo_folder():
    """{pid: command line} of whatever runs from .demo/ (the demo's, or anyone's looking at it)."""
    return procs.processes_under(demo.DEMO) if demo.DEMO.exists() else {}


@pytest.fixture(scope="module")
def demo_up():
    # Whatever ran in .demo/ before the demo (a developer's shell) is not the demo's.
    before = set(in_demo_folder())
    first = make("demo")
    try:
        yield first, before
    finally:
        down = make("demo-down")
        assert down.returncode == 0, down.stdout + down.stderr


def demo_is_up():
    states = demo.instances()
    return bool(demo.master_pid()) and all(states.get(name) == "running" for name in demo.WORKERS)


@pytest.fixture
def demo_running(demo_up):
    """The demo up, whatever a test before did to it: `make demo` again when something of it is stopped."""
    if not demo_is_up():
        proc = make("demo")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert demo_is_up()
    return demo_up


def test_make_demo_brings_the_fleet_up(demo_up):
    proc, _ = demo_up
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    # One progress line per step, in order.
    steps = re.findall(r"^==> \[(\d+)/(\d+)\]", out, re.M)
    assert [int(s) for s, _ in steps] == list(range(1, int(steps[0][1]) + 1))
    table = out[re.search(r"^\$ salt-run -c \.demo/etc/salt .*fleet\.inventory$", out, re.M).end() :]
    assert re.search(r"^demo-worker-1\s+up\s+local\s.*sample-fetcher main@\w{8} 2/2 RUNNING", table, re.M), table
    assert re.search(r"^demo-worker-2\s+up\s+local\s.*sample-reporter main@\w{8} 1/1 RUNNING", table, re.M), table
    # A worker really consumed a task.
    assert "{'platform': 'instagram', 'version': '1'" in out
    assert "make demo-down" in out
    assert printed_commands(out)


def shell(line, env):
    """A line the demo printed, typed into a shell in the repository."""
    return subprocess.run(line, shell=True, cwd=REPO, capture_output=True, text=True, timeout=120, check=False, env=env)


def test_printed_commands_work_from_another_shell(demo_running):
    commands = printed_commands(demo_running[0].stdout)
    ping = next(c for c in commands if "test.ping" in c)
    activated = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    proc = shell(f"{ping} --out=json --static", activated)
    assert proc.returncode == 0, proc.stderr
    assert '"demo-worker-1": true' in proc.stdout
    assert '"demo-worker-2": true' in proc.stdout


def without_venv():
    """The environment of a user who has not activated the venv: nothing of .venv/ on PATH."""
    venv = str(REPO / ".venv")
    path = [p for p in os.environ["PATH"].split(os.pathsep) if p and not os.path.realpath(p).startswith(venv)]
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


def test_ansible_inventory_script_needs_no_venv_on_path(demo_running):
    printed = demo_running[0].stdout.splitlines()
    command = next(line for line in printed if "localfleet/ansible_inventory.py --list" in line).split("#", 1)[0]
    proc = shell(command.strip(), without_venv())
    assert proc.returncode == 0, proc.stderr
    inventory = json.loads(proc.stdout)
    assert inventory["deployment_sample_fetcher"]["hosts"] == ["demo-worker-1"]
    assert inventory["deployment_sample_reporter"]["hosts"] == ["demo-worker-2"]
    assert sorted(inventory["salt_up"]["hosts"]) == ["demo-worker-1", "demo-worker-2"]
    assert inventory["_meta"]["hostvars"]["demo-worker-1"]["ansible_host"] == "127.0.0.1"


def test_ansible_reads_the_fleet_through_the_inventory_script(demo_running):
    ansible_inventory = shutil.which("ansible-inventory", path=without_venv()["PATH"])
    if not ansible_inventory:
        pytest.fail("`ansible-inventory` is needed to check the inventory script: apt-get install ansible-core")
    proc = subprocess.run(
        [ansible_inventory, "-i", "localfleet/ansible_inventory.py", "--graph"],
        cwd=REPO,
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


def test_listens_on_loopback_only(demo_running):
    master = demo.read_master_config()
    assert master["interface"] == "127.0.0.1"
    ss = shutil.which("ss")
    if not ss:
        pytest.fail("`ss` (iproute2) is needed to check what the demo listens on: apt-get install iproute2")
    # TCP listeners and bound UDP sockets, numeric, with their processes; check=True: a failing ss fails the test.
    listening = subprocess.run([ss, "-Htulnp"], capture_output=True, text=True, check=True).stdout
    pids = set(demo_processes())
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


def test_second_make_demo_converges_without_duplicates(demo_running):
    before = demo_processes()
    proc = make("demo")
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


def test_make_demo_down_stops_the_demo_and_nothing_else(demo_running):
    _, before_demo = demo_running
    started = started_by_demo()
    assert started
    # A user's processes that run in .demo/ or read its files are not the demo's.
    log = demo.DEMO / "var" / "log" / "salt" / "master"
    bystanders = [
        subprocess.Popen(["sleep", "600"], cwd=demo.DEMO),
        subprocess.Popen(["tail", "-f", str(log)], cwd=demo.DEMO, stdout=subprocess.DEVNULL),
    ]
    try:
        proc = make("demo-down")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert [b.poll() for b in bystanders] == [None, None], proc.stdout
        assert procs.still_running(started) == {}
        assert demo_processes() == {}
        assert not demo.master_pid()
        ignored = before_demo | {b.pid for b in bystanders}
        assert {pid: cmd for pid, cmd in in_demo_folder().items() if pid not in ignored} == {}
    finally:
        for bystander in bystanders:
            bystander.kill()
            bystander.wait()
    # And it is harmless when there is nothing left to stop.
    again = make("demo-down")
    assert again.returncode == 0, again.stdout + again.stderr


def test_the_printed_fleet_deploy_rolls_the_second_revision_out(demo_running):
    """The rollout the demo prints, typed into another shell: every fetcher then answers with version 2."""
    printed = demo_running[0].stdout
    assert "fleet.status" in printed.split("The demo fleet runs")[0], "make demo ends by printing fleet.status"
    line = next(c for c in printed_commands(printed) if "fleet.deploy" in c).split("#", 1)[0].strip()
    activated = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    try:
        proc = shell(line, activated)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "demo-worker-1" in proc.stdout
        task = shell(demo.task_command(), activated)
        assert task.returncode == 0, task.stderr
        assert "'version': '2'" in task.stdout
    finally:
        # Back to the branch pillar names, for the tests after this one.
        salt = ["salt", "-c", ".demo/etc/salt", "demo-worker-1"]
        shell(" ".join([*salt, "deployment.unpin", "sample-fetcher"]), activated)
        shell(" ".join([*salt, "state.apply"]), activated)


def test_make_demo_prints_the_fleet_page_and_passwords_that_log_in(demo_running):
    """The page's address and users `make demo` prints: salt-api serves the page there and takes the passwords."""
    proc = make("demo")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    url = re.search(r"^The fleet page: (http://127\.0\.0\.1:\d+)/fleet\s", proc.stdout, re.M)
    passwords = dict(re.findall(r"^\s+user (demo|viewer)\s+password (\S+)", proc.stdout, re.M))
    assert url and set(passwords) == {"demo", "viewer"}, proc.stdout[-2000:]
    base = url.group(1)
    page = requests.get(f"{base}/fleet", timeout=30)
    assert page.status_code == 200 and 'http-equiv="Content-Security-Policy"' in page.text

    def session(user):
        login = requests.post(
            f"{base}/login", json={"username": user, "password": passwords[user], "eauth": "file"}, timeout=60
        )
        assert login.status_code == 200, login.text
        return {"X-Auth-Token": login.json()["return"][0]["token"], "Accept": "application/json"}

    viewer = session("viewer")
    overview = requests.post(base, json=[{"client": "runner", "fun": "fleet.overview"}], headers=viewer, timeout=120)
    assert overview.status_code == 200, overview.text
    assert sorted(row["id"] for row in overview.json()["return"][0]["hosts"]) == list(demo.WORKERS)
    deploy = [{"client": "runner_async", "fun": "fleet.deploy", "arg": ["sample-fetcher"], "kwarg": {"rev": "v2"}}]
    assert requests.post(base, json=deploy, headers=viewer, timeout=60).status_code == 401
    dry = [{**deploy[0], "client": "runner", "kwarg": {"rev": "v2", "test": True}}]
    allowed = requests.post(base, json=dry, headers=session("demo"), timeout=300)
    assert allowed.status_code == 200 and allowed.json()["return"][0]["test"] is True, allowed.text
