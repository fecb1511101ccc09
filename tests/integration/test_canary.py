"""
Canary rollouts that watch the tasks (fleet.deploy with steps) through a real
salt-master, two real salt-minions and the real `salt-run`, on a real
RabbitMQ: the sample app's Celery workers on both hosts consume one queue,
and a stream of tasks runs through each rollout, so the analysis judges
what each release really does with them.

Each release of the sample app here differs from the good one in one way:
its tasks raise for 40% of inputs, run five times slower, its workers crash
a few seconds after they start, or (an app that fails 5% of its tasks anyway)
it fails one input in twenty as the release before it did.
"""

import contextlib
import shutil
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import git
import pytest
import yaml
from saltfactories.utils import random_string

from localfleet.config import REPO, stop_deployments
from localfleet.sampleapp import Stream
from tests.apps import SAMPLE_APP, celery_client, commit
from tests.conftest import sandbox_root, short_tmpdir

NAME = "canary"
QUEUE = "canary"
HOSTS = 2
# The stream: a task every STREAM_GAP s, each running TASK_SECONDS in a good release.
STREAM_GAP, TASK_SECONDS = 0.05, 0.02
# The steps of every canary rollout here, and thresholds that judge them within a test's time.
ANALYSE = 15
STEPS = f'[{{hosts: 1}}, {{analyse: {ANALYSE}}}, {{hosts: "100%"}}]'
ANALYSIS = "{window: 2, min_tasks: 20}"
FETCH_BODY = '    record = {\n        "task": self.request.id,'
RELEASES = {
    # Which inputs fail is a hash of the input: the tasks that fail spread over every consumer of the queue.
    # Tasks that raise for 4 inputs in 10.
    "flaky": (
        FETCH_BODY,
        '    if zlib.crc32(platform.encode()) % 10 < 4:\n        raise ValueError("4 in 10")\n' + FETCH_BODY,
    ),
    # Tasks five times slower.
    "slow": (FETCH_BODY, "    seconds = seconds * 5\n" + FETCH_BODY),
    # An app that fails 1 input in 20, in this release and the next.
    "fivepct": (
        FETCH_BODY,
        '    if zlib.crc32(platform.encode()) % 20 == 0:\n        raise ValueError("1 in 20")\n' + FETCH_BODY,
    ),
}
CRASH = (
    "\n\nimport threading\nfrom celery.signals import worker_ready\n\n\n@worker_ready.connect\n"
    "def _crash_soon(**_):\n    threading.Timer(6, os._exit, (1,)).start()\n"
)


def canary_repo(base):
    """The sample app: v1, v2 (good), flaky, slow, crashing (off v2), fivepct and fivepct-again (off v2)."""
    work = Path(base) / "app"
    shutil.copytree(SAMPLE_APP, work, ignore=shutil.ignore_patterns("__pycache__"))
    repo = git.Repo.init(work, initial_branch="master")
    app = work / "sampleapp.py"
    shas = {"v1": commit(work, "v1", tag="v1")}
    good = app.read_text().replace('VERSION = "1"', 'VERSION = "2"')
    app.write_text(good)
    shas["v2"] = commit(work, "v2", tag="v2")
    for name, (old, new) in RELEASES.items():
        repo.git.checkout("-b", name, shas["v2"])
        variant = good.replace('VERSION = "2"', f'VERSION = "{name}"').replace(old, new, 1)
        app.write_text(variant.replace("import json\n", "import json\nimport zlib\n", 1))
        shas[name] = commit(work, name)
    app.write_text(app.read_text() + "\n# the same app, released again\n")
    shas["fivepct-again"] = commit(work, "fivepct again")
    repo.git.checkout("-b", "crashing", shas["v2"])
    app.write_text(good.replace('VERSION = "2"', 'VERSION = "crashing"') + CRASH)
    shas["crashing"] = commit(work, "crashing")
    bare = Path(base) / "app.git"
    repo.clone(bare, bare=True)
    return bare, shas


@pytest.fixture(scope="module")
def places(deploy_user):
    base = short_tmpdir("sfc-")
    repo, shas = canary_repo(base)
    data = short_tmpdir("sfcd-", owner=deploy_user)
    roots = [sandbox_root("sfch-", deploy_user) for _ in range(HOSTS)]
    yield {"repo": repo, "shas": shas, "data": data, "roots": roots}
    for root in roots:
        stop_deployments(root, timeout=60)
    for path in (base, data, *roots):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def minions(salt_master):
    factories = sorted(
        (salt_master.salt_minion_daemon(random_string(f"canary{n}-")) for n in range(1, HOSTS + 1)),
        key=lambda f: f.id,
    )
    with contextlib.ExitStack() as stack:
        for factory in factories:
            stack.enter_context(factory.started(start_timeout=120))
        yield factories


class Canary:
    """The two hosts of the deployment, its pillar, and the real CLIs."""

    def __init__(self, salt_cli, run_cli, minions, pillar_dir, places, settings, broker):
        self.cli, self.run_cli, self.ids = salt_cli, run_cli, [m.id for m in minions]
        self.pillar_dir, self.places, self.settings = pillar_dir, places, settings
        self.env = {"SAMPLEAPP_DATA": str(places["data"]), "SAMPLEAPP_BROKER": broker}
        self.app = celery_client(places["data"], broker)

    def write_pillar(self, rev):
        top = {"base": {"*": ["fleet"], **{m: [f"host{n}"] for n, m in enumerate(self.ids, 1)}}}
        shutil.copyfile(REPO / "pillar" / "fleet.sls", self.pillar_dir / "fleet.sls")
        (self.pillar_dir / "top.sls").write_text(yaml.safe_dump(top))
        for n, root in enumerate(self.places["roots"], 1):
            command = f"celery -A sampleapp worker -Q {QUEUE} -c 2 -n canary-h{n}@%%h"
            spec = {
                "repo": str(self.places["repo"]),
                "rev": rev,
                "env": self.env,
                "programs": {"worker": {"command": command, "startsecs": 3}},
            }
            data = {"saltfleet": {"root": str(root), **self.settings}, "deployments": {NAME: spec}}
            (self.pillar_dir / f"host{n}.sls").write_text(yaml.safe_dump(data))
        ret = self.cli.run("-L", "saltutil.refresh_pillar", "wait=True", minion_tgt=",".join(self.ids))
        assert ret.returncode == 0, ret

    def salt_run(self, *args, **kwargs):
        """`salt-run ARGS --out=json`: (returncode, its one document)."""
        ret = self.run_cli.run(*args, **kwargs)
        assert isinstance(ret.data, (dict, list)), (ret.returncode, ret.stdout, ret.stderr)
        return ret.returncode, ret.data

    def at(self, rev):
        """Every host serves ``rev`` (a plain fleet.deploy when one does not): the test's starting point."""
        sha = self.places["shas"][rev]
        if self.releases() != [sha] * HOSTS:
            code, report = self.salt_run("fleet.deploy", NAME, f"rev={sha}", "batch=2", "timeout=300")
            assert code == 0, report
        assert self.releases() == [sha] * HOSTS

    def releases(self):
        ret = self.cli.run("-L", "deployment.status", NAME, minion_tgt=",".join(self.ids))
        return [ret.data[m][NAME]["release"] if isinstance(ret.data.get(m), dict) else None for m in self.ids]

    def canary(self, rev, *extra):
        return self.salt_run(
            "fleet.deploy",
            NAME,
            f"rev={self.places['shas'][rev]}",
            f"steps={STEPS}",
            f"analysis={ANALYSIS}",
            "timeout=300",
            *extra,
        )


@pytest.fixture(scope="module")
def fleet(salt_cli, salt_run_cli, minions, pillar_dir, places, host_settings, rabbitmq):
    ids = ",".join(m.id for m in minions)
    assert salt_cli.run("-L", "saltutil.sync_all", minion_tgt=ids).returncode == 0
    fleet = Canary(
        salt_cli, salt_run_cli, minions, pillar_dir, places, host_settings, rabbitmq.vhost(f"c-{uuid.uuid4().hex[:8]}")
    )
    fleet.write_pillar("v2")
    ret = salt_cli.run("-L", "state.apply", "fleet", minion_tgt=ids, _timeout=900)
    assert ret.returncode == 0, ret
    return fleet


def assert_rolled_back(fleet, report, stream, old="v2"):
    """The canary host was sent back: every host serves ``old`` again, and took the stream's last tasks."""
    shas = fleet.places["shas"]
    assert report["outcome"] == "rolled back", report
    assert report["rolled back"] == {fleet.ids[0]: shas[old]}, report
    assert report["not touched"] == {fleet.ids[1]: shas[old]}, report
    assert fleet.releases() == [shas[old]] * HOSTS
    time.sleep(3)
    assert stream.last_versions() == {"2"}


def test_a_release_failing_forty_percent_of_its_tasks_is_rolled_back_before_its_time(fleet):
    fleet.at("v2")
    with Stream(fleet.app, QUEUE, STREAM_GAP, TASK_SECONDS) as stream:
        code, report = fleet.canary("flaky")
        assert_rolled_back(fleet, report, stream)
    assert code == 1
    [analysis] = report["analysis"]
    assert analysis["decision"] == "failed", analysis
    assert analysis["elapsed"] < ANALYSE, "it failed beyond doubt before the step's full time"
    assert analysis["new"]["failed"] > 0 and analysis["old"]["failed"] == 0, analysis
    assert analysis["new"]["tasks"]["sampleapp.fetch"]["failure_rate"] > 0.2, analysis
    assert analysis["releases"] == {"new": [fleet.places["shas"]["flaky"]], "old": [fleet.places["shas"]["v2"]]}
    # Every task sent through the rollout has its result: none was lost in the handovers.
    states = Counter(stream.states().values())
    assert set(states) <= {"SUCCESS", "FAILURE"}, states
    assert states.get("FAILURE", 0) > 0
    code, history = fleet.salt_run("fleet.history", NAME, "limit=1")
    [entry] = history
    assert entry["analysis"][0]["decision"] == "failed"
    assert entry["analysis"][0]["thresholds"]["min_tasks"] == 20


def test_a_good_release_passes_every_step(fleet):
    fleet.at("v2")
    with Stream(fleet.app, QUEUE, STREAM_GAP, TASK_SECONDS) as stream:
        code, report = fleet.canary("v1")
    assert code == 0, report
    assert report["outcome"] == "complete"
    [analysis] = report["analysis"]
    assert analysis["decision"] == "passed", analysis
    assert analysis["elapsed"] >= ANALYSE
    assert fleet.releases() == [fleet.places["shas"]["v1"]] * HOSTS
    assert set(Counter(stream.states().values())) == {"SUCCESS"}
    code, live = fleet.salt_run("fleet.analysis", NAME)
    assert live["decision"] == "passed" and live["new"]["succeeded"] >= 20, live


def test_an_app_that_fails_five_percent_anyway_passes_against_its_own_baseline(fleet):
    fleet.at("fivepct")
    with Stream(fleet.app, QUEUE, STREAM_GAP, TASK_SECONDS):
        code, report = fleet.canary("fivepct-again")
    assert code == 0, report
    [analysis] = report["analysis"]
    assert analysis["decision"] == "passed", analysis
    assert analysis["new"]["failed"] > 0 and analysis["old"]["failed"] > 0, analysis


def test_a_release_five_times_slower_fails_on_run_time(fleet):
    fleet.at("v2")
    with Stream(fleet.app, QUEUE, STREAM_GAP, TASK_SECONDS) as stream:
        code, report = fleet.canary("slow")
        assert_rolled_back(fleet, report, stream)
    assert code == 1
    [analysis] = report["analysis"]
    assert analysis["decision"] == "failed"
    assert "p95 run time" in analysis["why"], analysis


def test_workers_that_crash_after_starting_are_caught_and_rolled_back(fleet):
    fleet.at("v2")
    with Stream(fleet.app, QUEUE, STREAM_GAP, TASK_SECONDS) as stream:
        code, report = fleet.canary("crashing")
        assert_rolled_back(fleet, report, stream)
    assert code == 1
    [analysis] = report["analysis"]
    assert "crashed" in analysis["why"], analysis
    assert set(Counter(stream.states().values())) <= {"SUCCESS", "FAILURE"}


@pytest.fixture
def operator_cli(salt_master):
    """A salt-run CLI of its own, for the operator's calls while the fleet's runs a rollout in a thread."""
    return salt_master.salt_run_cli(timeout=120)


def test_no_traffic_is_inconclusive_and_the_rollout_pauses_until_promoted(fleet, operator_cli):
    fleet.at("v2")
    before = operator_cli.run("fleet.analysis", NAME).data.get("rollout")
    done = {}
    thread = threading.Thread(target=lambda: done.update(zip(("code", "report"), fleet.canary("fivepct"), strict=True)))
    thread.start()
    try:
        deadline, live = time.monotonic() + 120, {}
        while time.monotonic() < deadline and not (live.get("paused") and live.get("rollout") != before):
            time.sleep(1)
            live = operator_cli.run("fleet.analysis", NAME).data
        assert live.get("decision") == "inconclusive", live
        assert "fewer than min_tasks (20)" in live["why"], live
        assert thread.is_alive(), "the rollout waits"
        assert fleet.releases() == [fleet.places["shas"]["fivepct"], fleet.places["shas"]["v2"]]
        told = operator_cli.run("fleet.promote", NAME)
        assert told.returncode == 0, told
    finally:
        thread.join(timeout=240)
    assert done["code"] == 0, done
    assert fleet.releases() == [fleet.places["shas"]["fivepct"]] * HOSTS
    _, history = fleet.salt_run("fleet.history", NAME, "limit=1")
    [entry] = history
    assert [e["event"] for e in entry["operator"]] == ["pause", "promote"], entry


def test_promote_and_abort_need_a_running_rollout(fleet):
    code, said = fleet.salt_run("fleet.abort", NAME)
    assert code == 1
    assert said["error"].startswith(f"fleet.abort {NAME}: no rollout of {NAME} is running"), said


def test_a_pause_step_waits_and_an_abort_sends_the_changed_host_back(fleet, operator_cli):
    fleet.at("v2")
    shas = fleet.places["shas"]
    done = {}
    args = ("fleet.deploy", NAME, f"rev={shas['v1']}", "steps=[{hosts: 1}, {pause: true}]", "timeout=300")
    thread = threading.Thread(target=lambda: done.update(zip(("code", "report"), fleet.salt_run(*args), strict=True)))
    thread.start()
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and fleet.releases()[0] != shas["v1"]:
            time.sleep(1)
        assert fleet.releases() == [shas["v1"], shas["v2"]]
        told = operator_cli.run("fleet.abort", NAME)
        assert told.returncode == 0, told
        assert "stops and sends every host it changed back" in told.data["comment"], told.data
    finally:
        thread.join(timeout=240)
    assert done["code"] == 1, done
    assert done["report"]["outcome"] == "rolled back", done
    assert done["report"]["rolled back"] == {fleet.ids[0]: shas["v2"]}
    assert fleet.releases() == [shas["v2"]] * HOSTS
    _, history = fleet.salt_run("fleet.history", NAME, "limit=1")
    [entry] = history
    assert entry["operator"][-1]["event"] == "abort", entry
