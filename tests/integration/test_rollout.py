"""
Rolling deploys across a fleet through a real salt-master and three real
salt-minions: fleet.deploy, fleet.rollback, fleet.history, fleet.unlock and
fleet.status with the real `salt-run` CLI.

Each minion is a host with its own sandbox root (its own pillar file says
which) running the sample Celery app as the unprivileged test user. Every
host's worker consumes a queue of its own, so a task sent there says which
release serves on that host. Each test deploys a deployment of its own name,
so tests share the daemons and nothing else.
"""

import contextlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import celery.exceptions
import git
import pytest
import yaml
from saltfactories.utils import random_string

from localfleet.config import REPO, saltfleet_utils, stop_deployments
from tests.apps import SAMPLE_APP, celery_client, commit, run_task
from tests.conftest import sandbox_root, short_tmpdir, wait_for

BROKEN_REQUIREMENTS = "requirements-broken.txt"
HOSTS = 3


def fleet_repo(base):
    """The sample app at v1, v2 and v3 (tags; VERSION says which), each with a requirements file that cannot install."""
    work = Path(base) / "app"
    shutil.copytree(SAMPLE_APP, work)
    (work / BROKEN_REQUIREMENTS).write_text("celery==5.7.0\nsaltfleet-no-such-package==0.0.1\n")
    git.Repo.init(work, initial_branch="master")
    app = work / "sampleapp.py"
    shas = {}
    for version in ("1", "2", "3"):
        app.write_text(app.read_text().replace('VERSION = "1"', f'VERSION = "{version}"'))
        shas[f"v{version}"] = commit(work, f"app v{version}", tag=f"v{version}")
        app.write_text(app.read_text().replace(f'VERSION = "{version}"', 'VERSION = "1"'))
    bare = Path(base) / "app.git"
    git.Repo(work).clone(bare, bare=True)
    return bare, shas


@pytest.fixture(scope="module")
def places(deploy_user):
    base = short_tmpdir("sfo-")
    repo, shas = fleet_repo(base)
    # The broker and result folders the workers of every host and the tests share.
    data = short_tmpdir("sfd-", owner=deploy_user)
    for folder in ("queue", "control", "results", "processed"):
        (data / folder).mkdir()
        shutil.chown(data / folder, deploy_user.pw_uid, deploy_user.pw_gid)
    roots = [sandbox_root("sfh-", deploy_user) for _ in range(HOSTS)]
    yield {"repo": repo, "shas": shas, "data": data, "roots": roots}
    for root in roots:
        stop_deployments(root, timeout=60)
    for path in (base, data, *roots):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def minions(salt_master):
    """Three minions; sorted by id, the first is fleet.deploy's first batch."""
    factories = [
        salt_master.salt_minion_daemon(random_string(f"fleet{n}-"), overrides={"log_level_logfile": "info"})
        for n in range(1, HOSTS + 1)
    ]
    factories.sort(key=lambda f: f.id)
    with contextlib.ExitStack() as stack:
        for factory in factories:
            stack.enter_context(factory.started(start_timeout=120))
        yield factories


class Fleet:
    """The three hosts: per-host pillar in, the real `salt` and `salt-run` CLIs out."""

    def __init__(self, salt_cli, salt_run_cli, minions, pillar_dir, places, user, settings):
        self.cli, self.run_cli, self.minions = salt_cli, salt_run_cli, minions
        self.ids = [m.id for m in minions]
        self.pillar_dir, self.places, self.user, self.settings = pillar_dir, places, user, settings
        self.deployments = {minion: {} for minion in self.ids}
        self.tasks = celery_client(places["data"])

    def salt(self, *args, tgt=None, **kwargs):
        """`salt -L <the hosts, or tgt> ARGS`: the CLI's result."""
        return self.cli.run("-L", *args, minion_tgt=",".join(tgt or self.ids), **kwargs)

    def salt_run(self, *args, **kwargs):
        """`salt-run ARGS --out=json`: (returncode, its one document, the progress steps the event bus carried)."""
        since = time.time()
        ret = self.run_cli.run(*args, **kwargs)
        assert isinstance(ret.data, (dict, list)), ("not one JSON document", ret.returncode, ret.stdout, ret.stderr)
        return ret.returncode, ret.data, self.progress(since, ret.data)

    def progress(self, since, report):
        """The messages of the progress events of the run that returned ``report`` (its ret event names its jid)."""
        listener, master = self.events

        def returned():
            events = listener.get_events([(master, "salt/run/*/ret")], after_time=since)
            return [e for e in events if e.data.get("return") == report]

        [done] = wait_for(returned, 60, "the run's return on the master's event bus")
        steps = listener.get_events([(master, f"salt/run/{done.tag.split('/')[2]}/progress")], after_time=since)
        return [e.data["message"] for e in sorted(steps, key=lambda e: e.stamp)]

    def spec(self, name, host, rev="v1", requirements=None, queue=None):
        queue = queue or self.queue(name, host)
        spec = {
            "repo": str(self.places["repo"]),
            "rev": rev,
            "env": {"SAMPLEAPP_DATA": str(self.places["data"])},
            "programs": {
                "worker": {"command": f"celery -A sampleapp worker -Q {queue} -c 1 -n {queue}@%%h", "startsecs": 3}
            },
        }
        if requirements:
            spec["requirements"] = requirements
        return spec

    def queue(self, name, host):
        return f"{name}.h{self.ids.index(host) + 1}"

    def write_pillar(self):
        # Every host the repository's pillar/fleet.sls (its mine: what fleet.queues counts), and its own file.
        top = {"base": {"*": ["fleet"], **{minion: [f"host{n}"] for n, minion in enumerate(self.ids, 1)}}}
        self.pillar_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / "pillar" / "fleet.sls", self.pillar_dir / "fleet.sls")
        (self.pillar_dir / "top.sls").write_text(yaml.safe_dump(top))
        for n, (minion, root) in enumerate(zip(self.ids, self.places["roots"], strict=True), 1):
            host = {"root": str(root), **self.settings}
            data = {"saltfleet": host, "deployments": self.deployments[minion]}
            (self.pillar_dir / f"host{n}.sls").write_text(yaml.safe_dump(data))
        ret = self.salt("saltutil.refresh_pillar", "wait=True")
        assert ret.returncode == 0, ret

    def setup(self, name):
        """Deployment ``name`` at v1 on every host, each worker consuming its queue; the master knows where it runs."""
        for minion in self.ids:
            self.deployments[minion][name] = self.spec(name, minion)
        self.write_pillar()
        ret = self.salt("state.single", "deployment.present", f"name={name}", _timeout=900)
        assert ret.returncode == 0, ret
        for minion in self.ids:
            [state] = ret.data[minion].values()
            assert state["result"] is True, state
        assert self.versions(name) == ["1"] * HOSTS

    def break_requirements(self, name, host):
        """Pillar of ``host`` names requirements that cannot install there (and only there)."""
        self.deployments[host][name] = self.spec(name, host, requirements=BROKEN_REQUIREMENTS)
        self.write_pillar()

    def mend_requirements(self, name, host):
        self.deployments[host][name] = self.spec(name, host)
        self.write_pillar()

    def versions(self, name):
        """The app version that serves a task on each host (in host order)."""
        return [self.version(name, minion) for minion in self.ids]

    def version(self, name, host):
        try:
            return run_task(self.tasks, self.queue(name, host), timeout=120)["version"]
        except celery.exceptions.TimeoutError:
            root = self.places["roots"][self.ids.index(host)]
            logs = sorted((root / "home" / self.user.pw_name / "log" / name).glob("*.log"))
            tails = "".join(f"\n--- {log.name}:\n{log.read_text(errors='replace')[-3000:]}" for log in logs)
            status = self.salt("deployment.status", name, tgt=[host]).data
            pytest.fail(f"no worker of {name} on {host} took a task within 120 s; status: {status}{tails}")

    def releases(self, name):
        """What each host says it serves (deployment.status), in host order."""
        ret = self.salt("deployment.status", name)
        return [ret.data[minion][name]["release"] for minion in self.ids]

    def fault(self, host, point, action="wait"):
        """Hold (or kill) deployment changes on ``host`` at ``point`` until the marker goes."""
        root = self.places["roots"][self.ids.index(host)]
        marker = saltfleet_utils().saltfleet_paths.registry(root) / "faults" / point
        marker.parent.mkdir(exist_ok=True)
        marker.write_text(action)
        return marker


@pytest.fixture(autouse=True)
def removed_after(fleet):
    """
    Each test's deployments go when it ends, through the fleet SLS as pillar
    drops them: idle workers of earlier tests would share the CPU with later ones.
    """
    yield
    if any(fleet.deployments.values()):
        fleet.deployments = {minion: {} for minion in fleet.ids}
        fleet.write_pillar()
        ret = fleet.salt("state.apply", "fleet", _timeout=600)
        assert ret.returncode == 0, ret


@pytest.fixture(scope="module")
def fleet(salt_cli, salt_run_cli, minions, pillar_dir, places, deploy_user, host_settings, event_listener, salt_master):
    ret = salt_cli.run("-L", "saltutil.sync_all", minion_tgt=",".join(m.id for m in minions))
    assert ret.returncode == 0, ret
    fleet = Fleet(salt_cli, salt_run_cli, minions, pillar_dir, places, deploy_user, host_settings)
    # Where a rollout's progress goes: the master's event bus (salt-run prints one document).
    fleet.events = (event_listener, salt_master.id)
    fleet.write_pillar()
    return fleet


def test_a_rollout_stops_at_the_batch_whose_host_fails_and_says_who_serves_what(fleet, places):
    name = "ro-fail"
    shas = places["shas"]
    h1, h2, h3 = fleet.ids
    fleet.setup(name)

    code, dry, _ = fleet.salt_run("fleet.deploy", name, "rev=v2", "test=True")
    assert code == 0, dry
    assert {h: row["outcome"] for h, row in dry["hosts"].items()} == dict.fromkeys(fleet.ids, "would change")
    assert all(row["release"] == {"old": shas["v1"], "new": shas["v2"]} for row in dry["hosts"].values())
    assert fleet.versions(name) == ["1", "1", "1"], "a dry run changes nothing"

    fleet.break_requirements(name, h2)
    code, report, progress = fleet.salt_run("fleet.deploy", name, "rev=v2", "batch=1")
    assert code != 0, report
    assert report["outcome"] == "stopped", report
    assert report["deployed"] == {h1: shas["v2"]}, report
    assert list(report["failed"]) == [h2]
    assert "saltfleet-no-such-package" in report["failed"][h2]["reason"]
    assert report["failed"][h2]["still serves"] == shas["v1"]
    assert report["not touched"] == {h3: shas["v1"]}
    assert report["summary"].startswith("stopped: batch 2 of 3 failed")
    assert any(f"batch 1 of 3: {h1}" in line for line in progress), progress
    assert any(f"batch 2 of 3: {h2}" in line for line in progress), progress
    assert not any("batch 3 of 3" in line for line in progress), "the rollout stopped at batch 2"
    # What the report says is what serves: host one on v2, two and three still on v1 and consuming.
    assert fleet.releases(name) == [shas["v2"], shas["v1"], shas["v1"]]
    assert fleet.versions(name) == ["2", "1", "1"]


def test_a_rollout_stops_at_a_host_that_does_not_answer(fleet, places):
    name = "ro-down"
    shas = places["shas"]
    h1, h2, h3 = fleet.ids
    fleet.setup(name)
    stopped = fleet.minions[1]
    stopped.terminate()
    try:
        code, report, _ = fleet.salt_run("fleet.deploy", name, "rev=v2", "batch=1", "timeout=10")
        assert code != 0, report
        assert report["deployed"] == {h1: shas["v2"]}, report
        assert report["no answer"] == [h2]
        assert report["failed"] == {}
        assert report["not touched"] == {h3: shas["v1"]}
        code, status, _ = fleet.salt_run("fleet.status", name, "timeout=5")
        assert code != 0, status
        assert status["not answering"] == [h2]
        assert sorted(status["up"]) == [h1, h3]
    finally:
        stopped.start(start_timeout=120)
    wait_for(lambda: fleet.salt("test.ping", tgt=[h2], _timeout=30).data is True, 120, f"{h2} answering again")
    # The host that never got the job still serves v1.
    assert fleet.versions(name) == ["2", "1", "1"]


def test_a_second_rollout_of_a_deployment_is_refused_naming_who_deploys_it(fleet, places, salt_master):
    name = "ro-lock"
    h1 = fleet.ids[0]
    fleet.setup(name)
    record = Path(salt_master.config["cachedir"]) / "saltfleet" / "locks" / f"{name}.json"
    marker = fleet.fault(h1, "build")
    first = subprocess.Popen(
        fleet.run_cli.cmdline("fleet.deploy", name, "rev=v2", f"tgt={h1}"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    waiting = None
    try:
        # The first rollout holds the lock while host one's build waits at the fault point.
        holder = wait_for(lambda: record.exists() and json.loads(record.read_text()), 120, "the first rollout's lock")
        assert holder["pid"] == first.pid
        code, refused, _ = fleet.salt_run("fleet.deploy", name, "rev=v3")
        assert code != 0, refused
        assert refused["outcome"] == "refused"
        assert (
            f"being deployed by {holder['user']} (fleet.deploy {name} rev=v2 batch=1, pid {first.pid}"
            in refused["error"]
        )
        assert f"since {holder['since']}" in refused["error"]
        code, shown, _ = fleet.salt_run("fleet.unlock", name)
        assert code != 0 and shown["state"] == "held", shown
        # One that may wait gets its turn after the first.
        waiting = subprocess.Popen(
            fleet.run_cli.cmdline("fleet.deploy", name, "rev=v2", f"tgt={h1}", "lock_wait=600"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        marker.unlink()
    out, err = first.communicate(timeout=600)
    code, report = first.returncode, json.loads(out)
    assert code == 0, (report, err)
    assert report["deployed"] == {h1: places["shas"]["v2"]}
    out, err = waiting.communicate(timeout=600)
    code, again = waiting.returncode, json.loads(out)
    assert code == 0, (again, err)
    assert again["deployed"] == {h1: places["shas"]["v2"]}
    assert not record.exists(), "the lock's record goes with its holder"
    # The ledger has all three: the one that ran, the refused one and the one that waited.
    code, history, _ = fleet.salt_run("fleet.history", name)
    assert code == 0
    assert [(h["rev"], h["outcome"].split(":")[0]) for h in history] == [
        ("v2", "complete"),
        ("v3", "refused"),
        ("v2", "complete"),
    ]


def test_history_lists_the_rollouts_and_rollback_brings_every_host_back(fleet, places):
    name = "ro-back"
    shas = places["shas"]
    h1, h2, h3 = fleet.ids
    fleet.setup(name)
    code, report, _ = fleet.salt_run("fleet.deploy", name, "rev=v2", "batch=2")
    assert code == 0, report
    assert report["deployed"] == dict.fromkeys(fleet.ids, shas["v2"])
    assert report["batches"] == [[h1, h2], [h3]]
    fleet.break_requirements(name, h2)
    code, report, _ = fleet.salt_run("fleet.deploy", name, "rev=v3", "batch=1")
    assert code != 0, report
    fleet.mend_requirements(name, h2)
    assert fleet.versions(name) == ["3", "2", "2"]

    code, history, _ = fleet.salt_run("fleet.history", name)
    assert code == 0
    assert [(h["what"], h["rev"]) for h in history] == [("fleet.deploy", "v2"), ("fleet.deploy", "v3")]
    done, stopped = history
    assert done["outcome"].startswith("complete") and done["who"]
    assert done["hosts"] == {h: {"outcome": "deployed", "release": shas["v2"]} for h in fleet.ids}
    assert stopped["outcome"].startswith("stopped: batch 2 of 3 failed")
    assert stopped["hosts"][h1] == {"outcome": "deployed", "release": shas["v3"]}
    assert stopped["hosts"][h2]["outcome"] == "failed"
    assert stopped["hosts"][h2]["release"] == shas["v2"]
    assert stopped["hosts"][h3] == {"outcome": "not touched", "release": shas["v2"]}

    # Back to the newest release every host keeps complete: v2 (host two's v3 never built).
    code, report, _ = fleet.salt_run("fleet.rollback", name)
    assert code == 0, report
    assert report["rev"] == shas["v2"]
    # Hosts two and three never left v2: skipped, not sent a job.
    assert report["deployed"] == {h1: shas["v2"]}, report
    assert report["skipped"] == {h2: shas["v2"], h3: shas["v2"]}
    assert fleet.versions(name) == ["2", "2", "2"]
    # And once more: every host back to the release before, v1, and its code runs.
    code, report, _ = fleet.salt_run("fleet.rollback", name, "batch=100%")
    assert code == 0, report
    assert fleet.releases(name) == [shas["v1"]] * HOSTS
    assert fleet.versions(name) == ["1", "1", "1"]
    code, history, _ = fleet.salt_run("fleet.history", name)
    assert [(h["what"], h["rev"], h["outcome"].split(":")[0]) for h in history[2:]] == [
        ("fleet.rollback", shas["v2"], "complete"),
        ("fleet.rollback", shas["v1"], "complete"),
    ]


def test_a_failing_pre_hook_stops_the_rollout_before_any_host_switches_and_post_hooks_run_after_it(fleet, places):
    name = "ro-hook"
    fleet.setup(name)
    code, report, _ = fleet.salt_run("fleet.deploy", name, "rev=v2", "pre=python -c 'raise SystemExit(3)'")
    assert code != 0, report
    assert "the pre hook `python -c 'raise SystemExit(3)'` failed" in report["summary"]
    assert "no host was changed" in report["summary"]
    assert report["deployed"] == {}
    assert report["not touched"] == dict.fromkeys(fleet.ids, places["shas"]["v1"])
    assert fleet.versions(name) == ["1", "1", "1"]
    # A post hook runs once, after the last batch, in the new release.
    code, report, _ = fleet.salt_run(
        "fleet.deploy", name, "rev=v2", "batch=3", "post=python -c 'import sampleapp; print(sampleapp.VERSION)'"
    )
    assert code == 0, report
    [post] = report["hooks"]["post"]
    assert (post["host"], post["retcode"], post["stdout"].strip()) == (fleet.ids[0], 0, "2")
    assert fleet.versions(name) == ["2", "2", "2"]
    # Without hook arguments, pillar deployments:<name>:hooks of the first host counts.
    for minion in fleet.ids:
        # A word of the form KEY=value reaches the command as a word, not as a keyword Salt takes.
        show = "import os, sampleapp; print(getattr(sampleapp, os.environ['SHOWN']))"
        fleet.deployments[minion][name]["hooks"] = {"post": f'env SHOWN=VERSION python -c "{show}"'}
    fleet.write_pillar()
    code, report, _ = fleet.salt_run("fleet.deploy", name, "rev=v3", "batch=3")
    assert code == 0, report
    [post] = report["hooks"]["post"]
    assert (post["host"], post["retcode"], post["stdout"].strip()) == (fleet.ids[0], 0, "3")


def test_fleet_status_names_held_and_down_programs_and_exits_non_zero_while_one_is_down(fleet):
    name = "ro-status"
    h1, h2, h3 = fleet.ids
    fleet.setup(name)
    code, status, _ = fleet.salt_run("fleet.status", name)
    assert code == 0, status
    ret = fleet.salt("deployment.hold", name, "worker", "reason=db maintenance", tgt=[h1])
    assert ret.returncode == 0, ret
    ret = fleet.salt("deployment.supervisorctl", name, "stop", "worker", tgt=[h3])
    assert ret.returncode == 0, ret

    code, status, _ = fleet.salt_run("fleet.status", name)
    assert code != 0, status
    assert status["down"] == {h3: {name: ["worker STOPPED"]}}
    assert status["held"] == {h1: {name: {"worker": "db maintenance"}}}
    assert status["not answering"] == []
    assert sorted(status["up"]) == [h1, h2]
    # The whole fleet's status says the same of this deployment.
    code, everything, _ = fleet.salt_run("fleet.status")
    assert code != 0
    assert everything["down"][h3][name] == ["worker STOPPED"]

    ret = fleet.salt("deployment.start", name, tgt=[h3])
    assert ret.returncode == 0, ret
    code, status, _ = fleet.salt_run("fleet.status", name)
    assert code == 0, status
    assert status["held"] == {h1: {name: {"worker": "db maintenance"}}}, "a held program is not down"


def test_host_level_deploys_go_into_the_ledger_and_the_grain_targets_the_hosts(fleet, places):
    name = "ro-host"
    shas = places["shas"]
    h1, h2, h3 = fleet.ids
    fleet.setup(name)
    # Ad-hoc targeting by deployment, as the README shows it.
    # The master matches -G against its grains cache, which a host's pillar refresh updates.
    ret = fleet.salt("saltutil.refresh_pillar", "wait=True")
    assert ret.returncode == 0, ret
    ret = fleet.cli.run("-G", "test.ping", minion_tgt=f"saltfleet_deployments:{name}:*")
    assert ret.returncode == 0, ret
    assert sorted(ret.data) == sorted(fleet.ids)
    ret = fleet.cli.run("-G", "test.ping", minion_tgt=f"saltfleet_deployments:{name}-nowhere:*")
    assert not ret.data

    ret = fleet.salt("deployment.update_code", name, "v2", tgt=[h1, h2])
    assert ret.returncode == 0, ret
    # The reactor records each return as it arrives.
    jobs = wait_for(
        lambda: [
            h
            for h in fleet.salt_run("fleet.history", name)[1]
            if h["what"] == "deployment.update_code" and len(h["hosts"]) == 2
        ],
        120,
        "both returns in the ledger",
    )
    [job] = jobs
    assert job["who"] and job["rev"] == "v2"
    assert job["hosts"] == {h: {"outcome": "deployed", "release": shas["v2"]} for h in (h1, h2)}
    assert job["outcome"] == "2 deployed"
    ret = fleet.salt("deployment.rollback", name, tgt=[h1])
    assert ret.returncode == 0, ret
    wait_for(
        lambda: any(h["what"] == "deployment.rollback" for h in fleet.salt_run("fleet.history", name)[1]),
        120,
        "the rollback in the ledger",
    )
    [back] = [h for h in fleet.salt_run("fleet.history", name)[1] if h["what"] == "deployment.rollback"]
    assert back["hosts"] == {h1: {"outcome": "deployed", "release": shas["v1"]}}
    assert fleet.versions(name) == ["1", "2", "1"]
    assert h3 not in job["hosts"]


def test_a_queue_floor_cuts_batches_short_and_refuses_a_rollout_it_cannot_hold(fleet, places):
    name = "ro-floor"
    shared = f"{name}.shared"
    shas = places["shas"]
    h1, h2, h3 = fleet.ids
    # Every host's worker consumes one queue; the first host's pillar keeps two of the three up.
    for minion in fleet.ids:
        fleet.deployments[minion][name] = fleet.spec(name, minion, queue=shared)
    fleet.deployments[h1][name]["min_consumers"] = {shared: 2}
    fleet.write_pillar()
    ret = fleet.salt("state.single", "deployment.present", f"name={name}", _timeout=900)
    assert ret.returncode == 0, ret
    # The master counts the consumers each host reported (fleet.queues, from the mine).
    wait_for(
        lambda: (fleet.salt_run("fleet.queues", f"queue={shared}")[1]["queues"].get(shared) or {}).get("up") == 3,
        120,
        f"three consumers of {shared} in fleet.queues",
    )

    # batch=2 would take two of three consumers out at once: one host a batch instead, and the report says why.
    code, dry, progress = fleet.salt_run("fleet.deploy", name, "rev=v2", "batch=2", "test=True")
    assert code == 0, dry
    assert dry["batches"] == [[h1], [h2], [h3]], dry
    assert [row["queue"] for row in dry["held back"]] == [shared, shared], dry
    assert any(f"batch 1 cut short: queue {shared} keeps 2 of its 3 consumers" in line for line in progress), progress
    code, report, _ = fleet.salt_run("fleet.deploy", name, "rev=v2", "batch=2")
    assert code == 0, report
    assert report["batches"] == [[h1], [h2], [h3]], report
    assert report["held back"][0] == {"batch": 1, "queue": shared, "floor": 2, "consumers": 3}, report
    assert report["deployed"] == dict.fromkeys(fleet.ids, shas["v2"])
    assert run_task(fleet.tasks, shared, timeout=120)["version"] == "2"

    # A floor of three: no host can go out, so nothing is deployed and the refusal names the queue.
    fleet.deployments[h1][name]["min_consumers"] = {shared: 3}
    fleet.write_pillar()
    code, refused, _ = fleet.salt_run("fleet.deploy", name, "rev=v1")
    assert code != 0, refused
    assert f"queue {shared} has 3 consumers up and a floor of 3" in refused["error"], refused
    assert refused["error"].endswith("nothing was changed"), refused
    assert fleet.releases(name) == [shas["v2"]] * 3


def test_a_runner_killed_between_batches_and_inside_one_frees_the_lock_and_its_rollout_resumes(
    fleet, places, salt_master
):
    name = "ro-killed"
    shas = places["shas"]
    h1, h2, h3 = fleet.ids
    fleet.setup(name)

    def started(*args):
        return subprocess.Popen(fleet.run_cli.cmdline("fleet.deploy", name, *args), stdout=subprocess.PIPE, text=True)

    def last():
        _, history, _ = fleet.salt_run("fleet.history", name, "limit=1")
        return history[-1] if history else {}

    # Killed between two batches: while the rollout pauses after its first (SIGKILL: no handler runs).
    runner = started("rev=v2", "steps=[{hosts: 1}, {pause: true}]")
    try:
        wait_for(lambda: (last().get("operator") or [{}])[-1].get("event") == "pause", 180, "the rollout's pause")
    finally:
        runner.kill()
        runner.wait()
    entry = last()
    assert entry["outcome"] == "interrupted: its runner stopped before the end", entry
    assert entry["hosts"][h1] == {"outcome": "deployed", "release": shas["v2"]}, entry
    assert entry["hosts"][h2]["outcome"] == "not touched"

    # Killed inside a batch: host two's apply is held at its build when the runner dies, and finishes by itself.
    marker = fleet.fault(h2, "build")
    try:
        runner = started("rev=v2", "batch=1")
        wait_for(
            lambda: last().get("hosts", {}).get(h2, {}).get("outcome") == "sent, no return recorded", 180, "batch 2"
        )
        runner.kill()
        runner.wait()
    finally:
        marker.unlink()
    # The lock went with the runner's process: the next rollout takes it at once (no lock_wait), and resumes.
    wait_for(lambda: fleet.releases(name)[1] == shas["v2"], 180, f"{h2}'s held job finishing without its runner")
    # The master's reactor records its return (fleet.record), under the rollout that sent the job.
    deployed = {"outcome": "deployed", "release": shas["v2"]}
    entry = wait_for(lambda: last() if last()["hosts"][h2] == deployed else None, 60, f"{h2}'s return in the ledger")
    assert entry["outcome"] == "interrupted: its runner stopped before the end", entry
    code, report, progress = fleet.salt_run("fleet.deploy", name, "rev=v2", "batch=1")
    assert code == 0, report
    assert report["skipped"] == {h1: shas["v2"], h2: shas["v2"]}, report
    assert report["deployed"] == {h3: shas["v2"]}
    assert any("the lock's last holder" in line and "died before its end" in line for line in progress), progress
    assert fleet.versions(name) == ["2", "2", "2"]


def test_a_host_lost_during_its_update_is_no_answer_and_the_next_rollout_brings_it_in_line(fleet, places):
    name = "ro-lost"
    shas = places["shas"]
    h1, h2, h3 = fleet.ids
    fleet.setup(name)
    marker = fleet.fault(h2, "build")
    runner = subprocess.Popen(
        fleet.run_cli.cmdline("fleet.deploy", name, "rev=v2", "batch=1", "timeout=20"),
        stdout=subprocess.PIPE,
        text=True,
    )
    lost = fleet.minions[1]
    try:
        # Host two's update_code is held at its build when its minion goes.
        wait_for(lambda: fleet.salt("saltutil.is_running", "deployment.update_code", tgt=[h2]).data, 180, "h2's job")
        lost.terminate()
        out, _ = runner.communicate(timeout=300)
        report = json.loads(out)
        assert runner.returncode == 1, report
        assert report["deployed"] == {h1: shas["v2"]}, report
        assert report["no answer"] == [h2]
        assert report["not touched"] == {h3: shas["v1"]}, "the rollout stopped at the lost host"
    finally:
        marker.unlink()
        lost.start(start_timeout=120)
    wait_for(lambda: fleet.salt("test.ping", tgt=[h2], _timeout=30).data is True, 120, f"{h2} answering again")
    # Back, it says what it serves (whatever its killed job left: the handover switches whole or not at all).
    serving = fleet.releases(name)[1]
    assert serving in (shas["v1"], shas["v2"])
    code, status, _ = fleet.salt_run("fleet.status", name, "timeout=30")
    assert code == 0, status
    assert status["up"][h2] == [f"{name} {serving[:12]} up: 1/1 RUNNING"], status
    code, report, _ = fleet.salt_run("fleet.deploy", name, "rev=v2", "batch=1")
    assert code == 0, report
    assert fleet.versions(name) == ["2", "2", "2"]


def test_a_master_restarted_during_a_batch_ends_the_rollout_with_a_report_and_the_ledger_and_lock_say_the_truth(
    fleet, places, salt_master
):
    name = "ro-master"
    shas = places["shas"]
    h1 = fleet.ids[0]
    fleet.setup(name)
    marker = fleet.fault(h1, "build")
    runner = subprocess.Popen(
        fleet.run_cli.cmdline("fleet.deploy", name, "rev=v2", "batch=1", "timeout=30"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: fleet.salt("saltutil.is_running", "deployment.update_code", tgt=[h1]).data, 180, "h1's job")
        salt_master.terminate()
        salt_master.start(start_timeout=120)
    finally:
        marker.unlink()
    out, err = runner.communicate(timeout=600)
    # One document and an exit code, never a traceback.
    report = json.loads(out)
    assert "Traceback" not in err, err
    assert runner.returncode == (0 if report["outcome"] == "complete" else 1), report
    for minion in fleet.ids:
        wait_for(lambda m=minion: fleet.salt("test.ping", tgt=[m], _timeout=30).data is True, 180, f"{minion} back")
    # What the ledger and the lock say afterwards is what the hosts serve.
    _, history, _ = fleet.salt_run("fleet.history", name, "limit=1")
    [entry] = history
    assert entry["outcome"] == report["summary"], entry
    serving = dict(zip(fleet.ids, fleet.releases(name), strict=True))
    for minion, row in entry["hosts"].items():
        if row["outcome"] in ("deployed", "not touched"):
            assert serving[minion] == row["release"], (minion, row, serving)
    _, lock, _ = fleet.salt_run("fleet.unlock", name)
    assert lock["state"] == "free", lock
    # It stops cleanly: the runner lost the master's bus with it, so the batch's host is no answer (whether it
    # switched is not known to the runner); what it serves is what fleet.status says, and a new run resumes.
    assert report["outcome"] == "stopped" and report["no answer"] == [h1], report
    assert serving[h1] in (shas["v1"], shas["v2"])
    code, again, _ = fleet.salt_run("fleet.deploy", name, "rev=v2", "batch=1")
    assert code == 0, again
    assert fleet.versions(name) == ["2", "2", "2"]
