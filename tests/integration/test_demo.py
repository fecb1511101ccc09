"""
`make demo` then `make demo-down`, as a newcomer runs them: in a fresh clone
at a long path inside a directory no other user may enter (a clone in root's
0700 home, say), the fleet comes up with its deployments RUNNING, the printed
commands work from another shell, a second `make demo` converges without
duplicating anything, every command block of the README runs against it as
written and exits as the README says, and `make demo-down` stops every process
the demo started and nothing else.

The clone and its first `make demo` are the module's; a test that needs the
demo running starts it again when a test before it stopped it
(`demo_running`). The clone builds its own venv from the run's uv cache.
"""

import ast
import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import requests
import salt.config
import salt.utils.event

from localfleet import procs
from localfleet.config import REPO
from tests.integration import readme

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
    code = f"import json; from localfleet import api, daemons, demo, procs; print(json.dumps({expression}))"
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
    """{pid: command line} of the demo's daemons (salt-api beside them) and all they started."""
    started = "procs.tree([*demo.daemons(), *filter(None, [api.Api(demo.DEMO).pid()])])"
    return {int(pid): cmd for pid, (_, cmd) in query(checkout, started).items()}


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
    # Two deployments on one host: the second on a line of its own (each may end with its queues).
    worker_2 = r"^demo-worker-2\s+up\s+local\s.*sample-fetcher main@\w{8} 2/2 RUNNING.*\n"
    worker_2 += r"\s+sample-reporter main@\w{8} 2/2 RUNNING"
    assert re.search(worker_2, table, re.M), table
    # A worker really consumed a task, and the beat's tasks ran on both hosts.
    assert "{'platform': 'instagram', 'version': '1'" in out
    assert re.search(r"^fetches run in 5 s: demo-worker-1 [1-9]\d*, demo-worker-2 [1-9]\d*", out, re.M), out[-3000:]
    assert re.search(r"^The demo fleet runs \(\d+ s\)\.", out, re.M), out[-3000:]
    # Its logs are where the demo says, inside the clone.
    assert (checkout / ".demo" / "var" / "log" / "salt" / "master").stat().st_size
    assert (checkout / ".demo" / "var" / "log" / "salt" / "cloud").is_file()
    assert "make demo-down" in out
    assert printed_commands(out)
    canary = "fleet.deploy sample-fetcher rev=v2 steps='[{hosts: 1}, {analyse: 30}, {hosts: \"100%\"}]'"
    uncommented = [c.split("  #")[0].strip() for c in printed_commands(out)]
    assert f"salt-run -c .demo/etc/salt {canary}" in uncommented, out[-3000:]


def test_the_beat_keeps_both_fetcher_hosts_busy_through_the_broker(checkout, demo_running):
    """Tasks reach sample-fetcher on both hosts all the time, through RabbitMQ, whose URL no command line shows."""
    since = time.time()
    time.sleep(6)
    counts = query(checkout, f"demo.executions_by_host({since})")
    assert counts.get("demo-worker-1", 0) >= 2 and counts.get("demo-worker-2", 0) >= 2, counts
    url = (checkout / ".demo" / "rabbitmq" / "url").read_text().strip()
    assert url.startswith("amqp://") and (checkout / ".demo" / "rabbitmq" / "url").stat().st_mode & 0o077 == 0
    assert (checkout / ".demo" / "etc" / "salt" / "master").stat().st_mode & 0o077 == 0
    password = url.split("@", 1)[0].rsplit(":", 1)[1]
    assert len(password) >= 16
    assert {pid: cmd for pid, cmd in command_lines().items() if password in cmd} == {}


def command_lines():
    """{pid: command line} of every process of this machine."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return found


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
    assert len(supervisords) == 3, sockets
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
    assert sorted(inventory["deployment_sample_fetcher"]["hosts"]) == ["demo-worker-1", "demo-worker-2"]
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
    assert sorted(groups.get("deployment_sample_fetcher", [])) == ["demo-worker-1", "demo-worker-2"], proc.stdout
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
            # epmd (the broker's, on a private port) always adds the IPv6 loopback to the address it is given.
            loopback = ("127.0.0.1:", "[::1]:") if '(("epmd",' in line else ("127.0.0.1:",)
            assert local.startswith(loopback), line
            mine.append((netid, int(local.rsplit(":", 1)[1])))
    # The check saw the demo's sockets: at least the master's two ports and the broker's AMQP port.
    broker = query(checkout, "demo.broker().port")
    assert {("tcp", master["publish_port"]), ("tcp", master["ret_port"]), ("tcp", broker)} <= set(mine), listening


def test_second_make_demo_converges_without_duplicates(checkout, demo_running):
    before = demo_processes(checkout)
    proc = make(checkout, "demo")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "demo-worker-1 exists and runs" in proc.stdout
    assert "$ salt-cloud -c .demo/etc/salt -p" not in proc.stdout
    after = demo_processes(checkout)
    # The same long-running processes: nothing restarted, nothing doubled (the broker's node, not the
    # short-lived Erlang helpers rabbitmqctl and epmd start beside it; the minions, not the processes of
    # their scheduled jobs, whose titles go on with "Schedule(...)").
    daemons = re.compile(
        r"salt-master .*MainProcess|salt-minion (?!.*Schedule\().*MinionProcessManager|supervisord -c"
        r"|beam\.smp .*-s rabbit boot"
    )
    assert sum("salt-minion" in c for c in before.values() if daemons.search(c)) == 2, before
    assert {p: c for p, c in after.items() if daemons.search(c)} == {
        p: c for p, c in before.items() if daemons.search(c)
    }
    assert sum(1 for c in after.values() if "salt-master" in c and "MainProcess" in c) == 1


# ------------------------------------------------------------ the README, typed against the demo
# Each command of the README's blocks, adapted to the demo only in its config
# dir and names (tests/integration/readme.py), run in README order as a script
# runs it: the venv active, no terminal.

SALT = "salt -c .demo/etc/salt"
SALT_RUN = "salt-run -c .demo/etc/salt"
RUNNABLE = [b for b in readme.blocks() if b.planned and readme.PLAN[b.planned[0]] is None]
# Each fleet.* runner, and arguments that make it do its work on the demo.
FLEET_ARGS = {
    "inventory": "",
    "overview": "",
    "inventory_rows": "",
    "ansible_inventory": "",
    "queues": "",
    "status": "sample-fetcher",
    "history": "sample-fetcher limit=5",
    "unlock": "sample-fetcher",
    "deploy": "sample-fetcher rev=v2",
    "rollback": "sample-fetcher",
    "admit": "demo-worker-9 i-0123456789abcdef0 not-a-key",
    "record": "20200101000000000000 demo-worker-1 deployment.update_code",
    # No rollout of the demo runs or ran an analysis: each says so, exit 1 (readme.EXIT_CODES).
    "promote": "sample-fetcher",
    "abort": "sample-fetcher",
    "analysis": "sample-fetcher",
}
# What deployment.status says of each deployment of the demo as `make demo` leaves it: state, rev, pinned, held.
MADE = ("up", "main", None, {})
# sample-fetcher on both workers, sample-reporter on demo-worker-2.
DEPLOYED = 3
# A progress line: its time, two spaces, the step.
STEP = re.compile(r"^(\d\d:\d\d:\d\d\.\d{6})  (sample-fetcher: .*)$")


def back_to_pillar(runner):
    """sample-fetcher follows pillar's rev again, and serves it: the demo as the tests after expect it."""
    runner.shell(f"{SALT} '*' deployment.unpin sample-fetcher")
    runner.shell(f"{SALT} '*' state.apply")


@pytest.fixture(scope="module")
def typed(checkout, demo_up):
    """Runs what a user types from the clone; the demo back to pillar (and without demo-worker-3) after."""
    runner = readme.Runner(activated(checkout), cwd=checkout)
    yield runner
    back_to_pillar(runner)
    without_demo_worker_3(runner, checkout)


def without_demo_worker_3(runner, checkout):
    """The host the README provisions gone again: the tests after see the demo's own workers alone."""
    if "demo-worker-3" in query(checkout, "demo.instances()"):
        runner.shell("salt-cloud -c .demo/etc/salt -y -d demo-worker-3")


def tail(proc):
    return f"  stdout: {proc.stdout[-1500:]}\n  stderr: {proc.stderr[-1500:]}"


def as_made(runner):
    """The demo as `make demo` leaves it, made so if not: every deployment up on pillar's rev, none pinned or held."""
    ret = runner.shell(f"{SALT} '*' deployment.status --out=json --static")
    try:
        rows = [row for host in json.loads(ret.stdout).values() for row in host.values()]
    except (ValueError, AttributeError):
        rows = []
    if len(rows) != DEPLOYED or any(
        (r.get("state"), r.get("rev"), r.get("pinned"), r.get("held")) != MADE for r in rows
    ):
        runner.shell(f"{SALT} '*' deployment.unhold sample-fetcher")
        runner.shell(f"{SALT} '*' deployment.unpin sample-fetcher")
        runner.shell(f"{SALT} -t 600 '*' state.apply")


@pytest.mark.parametrize("block", RUNNABLE, ids=[f"README-line-{b.line}" for b in RUNNABLE])
def test_every_readme_command_runs_against_the_demo_as_written(block, checkout, demo_running, typed, record_property):
    """Each block from the demo as `make demo` left it, its commands in order; every failure listed."""
    as_made(typed)
    started, ran, wrong = time.monotonic(), 0, []
    try:
        for line, commands in readme.plan(block)[1]:
            for command in [] if isinstance(commands, str) else commands:
                proc = typed.run(command)
                ran += 1
                why = readme.judge(command, proc)
                if why:
                    wrong.append(f"README line {block.line}: {line}\n  $ {command}\n  {why}\n{tail(proc)}")
    finally:
        without_demo_worker_3(typed, checkout)
    record_property("report", f"{ran} commands of README line {block.line} in {time.monotonic() - started:.0f} s")
    assert not wrong, f"{len(wrong)} of {ran} commands:\n\n" + "\n\n".join(wrong)


def runner_functions():
    tree = ast.parse((REPO / "_runners" / "fleet.py").read_text())
    return sorted(n.name for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_"))


def test_every_fleet_runner_prints_one_json_document(demo_running, typed):
    assert sorted(FLEET_ARGS) == runner_functions(), "a fleet runner this test does not run"
    wrong = []
    for name, args in FLEET_ARGS.items():
        command = f"{SALT_RUN} fleet.{name} {args} --out=json"
        proc = typed.run(command)
        why = readme.judge(command, proc)
        if why:
            wrong.append(f"$ {command}\n  {why}\n{tail(proc)}")
    back_to_pillar(typed)
    assert not wrong, "\n\n".join(wrong)


@pytest.fixture
def bus(checkout):
    """The progress events on the demo master's event bus, as salt-api's /events would pass them on."""
    opts = salt.config.master_config(str(checkout / ".demo" / "etc" / "salt" / "master"))
    events, done = [], threading.Event()

    def listen(listener):
        while not done.is_set():
            event = listener.get_event(wait=0.2, full=True)
            if event and event["tag"].endswith("/progress") and event["tag"].startswith("salt/run/"):
                events.append(event)

    with salt.utils.event.get_master_event(opts, opts["sock_dir"], listen=True) as listener:
        listener.subscribe("salt/run/")
        thread = threading.Thread(target=listen, args=(listener,), daemon=True)
        thread.start()
        yield events
        done.set()
        thread.join(10)


def test_a_rollout_prints_one_line_a_step_and_every_step_reaches_the_event_bus(demo_running, typed, bus):
    try:
        # From main (a README block may have left v2 serving, and a host already on a commit is skipped).
        start = typed.run(f"{SALT_RUN} fleet.deploy sample-fetcher rev=main --out=json")
        assert start.returncode == 0, tail(start)
        bus.clear()
        human = typed.run(f"{SALT_RUN} fleet.deploy sample-fetcher rev=v2")
        assert human.returncode == 0, tail(human)
        steps = [STEP.match(line)[2] for line in human.stdout.splitlines() if STEP.match(line)]
        assert len(steps) == 6, human.stdout
        assert steps[0] == "sample-fetcher: fleet.deploy v2 to 2 hosts in 2 batches"
        for batch, host in enumerate(("demo-worker-1", "demo-worker-2")):
            assert steps[1 + 2 * batch] == f"sample-fetcher: batch {batch + 1} of 2: {host}", human.stdout
            assert steps[2 + 2 * batch].startswith(f"sample-fetcher: {host}: deployed: "), human.stdout
        assert steps[5] == "sample-fetcher: complete: 2 hosts in 2 batches on v2"
        assert "_stamp" not in human.stdout and "suffix:" not in human.stdout, human.stdout
        machine = typed.run(f"{SALT_RUN} fleet.deploy sample-fetcher rev=main --out=json")
        assert machine.returncode == 0, tail(machine)
        assert json.loads(machine.stdout)["summary"] == "complete: 2 hosts in 2 batches on main"
        assert "sample-fetcher: batch 1 of 2" not in machine.stdout + machine.stderr
        # Both runs' steps are on the bus, the one that printed none too.
        deadline = time.monotonic() + 10
        while len(bus) < 12 and time.monotonic() < deadline:
            time.sleep(0.2)
        by_run = {}
        for event in bus:
            by_run.setdefault(event["tag"].split("/")[2], []).append(event["data"]["message"])
        assert steps in by_run.values(), by_run
        assert [m for m in by_run.values() if m[-1] == "sample-fetcher: complete: 2 hosts in 2 batches on main"], by_run
    finally:
        back_to_pillar(typed)


def test_a_typo_exits_1_naming_what_pillar_has_and_a_refused_rollout_is_in_the_ledger(demo_running, typed):
    status = typed.run(f"{SALT_RUN} fleet.status sample-fetchr")
    assert status.returncode == 1, tail(status)
    assert "no minion's pillar names deployment 'sample-fetchr'; pillar names sample-fetcher, sample-reporter" in (
        status.stdout
    ), status.stdout
    inventory = typed.run(f"{SALT_RUN} fleet.inventory deployment=typo --out=json")
    assert inventory.returncode == 1 and "'typo'" in json.loads(inventory.stdout)["error"], tail(inventory)
    refused = typed.run(f"{SALT_RUN} fleet.deploy sample-fetcher rev=v2 tgt='nosuch-*' --out=json")
    assert refused.returncode == 1 and json.loads(refused.stdout)["outcome"] == "refused", tail(refused)
    [entry] = json.loads(typed.run(f"{SALT_RUN} fleet.history sample-fetcher limit=1 --out=json").stdout)
    assert entry["outcome"].startswith("refused: fleet.deploy sample-fetcher: no minion matching 'nosuch-*'"), entry


def test_a_release_pinned_by_fleet_rollback_reads_as_pinned_until_unpinned(demo_running, typed):
    try:
        assert typed.run(f"{SALT_RUN} fleet.deploy sample-fetcher rev=v2").returncode == 0
        sha = typed.release()
        rolled = typed.run(f"{SALT_RUN} fleet.rollback sample-fetcher release={sha[:10]}")
        assert rolled.returncode == 0, tail(rolled)
        inventory = typed.run(f"{SALT_RUN} fleet.inventory").stdout
        pinned = rf"^demo-worker-1 .* sample-fetcher {sha[:8]} \(pinned\) 2/2 RUNNING"
        assert re.search(pinned, inventory, re.M), inventory
        assert f"{sha}@" not in inventory
        # The demo master's state_output is `changes`: the kept rev shows all the same.
        applied = typed.run(f"{SALT} demo-worker-1 state.apply")
        assert applied.returncode == 0, tail(applied)
        assert f"rev '{sha}' set by deployment.rollback at" in re.sub(r"\s+", " ", applied.stdout), applied.stdout
        unpinned = json.loads(typed.run(f"{SALT} demo-worker-1 deployment.unpin sample-fetcher --out=json").stdout)
        comment = unpinned["demo-worker-1"]["comment"]
        assert f"serves {sha[:12]} until `salt demo-worker-1 state.apply` deploys main" in comment, comment
        typed.run(f"{SALT} demo-worker-1 state.apply")
        inventory = typed.run(f"{SALT_RUN} fleet.inventory").stdout
        assert re.search(r"^demo-worker-1 .* sample-fetcher main@\w{8} 2/2 RUNNING", inventory, re.M), inventory
    finally:
        back_to_pillar(typed)


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


def test_the_printed_fleet_deploy_rolls_the_second_revision_out(checkout, demo_running, typed):
    """The rollout the demo prints, typed into another shell: every fetcher then answers with version 2."""
    printed = demo_running.stdout
    assert "fleet.status" in printed.split("The demo fleet runs")[0], "make demo ends by printing fleet.status"
    line = next(c for c in printed_commands(printed) if "fleet.deploy" in c and "steps=" not in c)
    line = line.split("#", 1)[0].strip()
    env = activated(checkout)
    try:
        proc = shell(checkout, line, env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "complete: 2 hosts in 2 batches on v2" in proc.stdout, proc.stdout
        task = shell(checkout, query(checkout, "demo.task_command()"), env)
        assert task.returncode == 0, task.stderr
        assert "'version': '2'" in task.stdout
    finally:
        # Back to the branch pillar names, for the tests after this one.
        back_to_pillar(typed)


def test_the_printed_canary_rollout_judges_the_first_hosts_tasks_and_goes_on(checkout, demo_running, typed):
    """The canary rollout the demo prints, pasted: one host, 30 s of its tasks against the other's, then the rest."""
    line = next(c for c in printed_commands(demo_running.stdout) if "steps=" in c).split("  #")[0].strip()
    env = activated(checkout)
    # From main on both hosts (a README block may have left v2 serving: a rollout skips a host on its commit).
    back_to_pillar(typed)
    try:
        proc = shell(checkout, line, env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert re.search(r"^\S+  sample-fetcher: analysis 1 \(30 s\), .*: passed: ", proc.stdout, re.M), proc.stdout
        assert "complete: 2 hosts in" in proc.stdout, proc.stdout
        shown = shell(checkout, "salt-run -c .demo/etc/salt fleet.analysis sample-fetcher --out=json", env)
        analysis = json.loads(shown.stdout)
        # The beat's tasks, counted on each side: the canary's new release and the other host's old one.
        assert analysis["decision"] == "passed" and analysis["new"]["succeeded"] >= 20, analysis
        assert analysis["old"]["succeeded"] >= 20, analysis
    finally:
        # Back to the branch pillar names, for the tests after this one.
        back_to_pillar(typed)


def test_make_demo_prints_the_fleet_page_and_passwords_that_log_in(checkout, demo_running):
    """The page's address and users `make demo` prints: salt-api serves the page there and takes the passwords."""
    proc = make(checkout, "demo")
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
    assert sorted(row["id"] for row in overview.json()["return"][0]["hosts"]) == query(checkout, "list(demo.WORKERS)")
    deploy = [{"client": "runner_async", "fun": "fleet.deploy", "arg": ["sample-fetcher"], "kwarg": {"rev": "v2"}}]
    assert requests.post(base, json=deploy, headers=viewer, timeout=60).status_code == 401
    dry = [{**deploy[0], "client": "runner", "kwarg": {"rev": "v2", "test": True}}]
    allowed = requests.post(base, json=dry, headers=session("demo"), timeout=300)
    assert allowed.status_code == 200 and allowed.json()["return"][0]["test"] is True, allowed.text
