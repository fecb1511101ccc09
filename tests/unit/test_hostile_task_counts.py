"""
A hostile minion's task counts never fail a rollout's analysis: a canary
``fleet.deploy`` in steps over two hosts of one deployment, the good one
reporting its Celery tasks as a host does and the other answering
``deployment.task_events`` with something no host writes. The analysis must
judge on the good host's counts, name the other one's answer as bad data in
its notes, and end as it would without it. Salt's own runner loader, no
daemons; the jobs are answered by a stand-in client (the minions' side).
"""

import json
import math
from pathlib import Path

import pytest
import salt.client
import salt.loader

from tests.unit.test_fleet_cli import fleet
from tests.unit.test_hostile_minion_data import Bus, Minions, grains, mine
from tests.unit.test_inventory import add_minion

OLD, NEW = "a" * 40, "b" * 40
GOOD, EVIL = "good-1", "evil-1"
STEPS = [{"hosts": 2}, {"analyse": 1}]
ANALYSIS = {"window": 1, "min_tasks": 5}


def counts(succeeded=30, failed=0, retried=0, runtime=0.01):
    bucket = int(math.log(runtime / 1e-4, 1.1))
    return {"succeeded": succeeded, "failed": failed, "retried": retried, "runtime": {bucket: succeeded}}


def good_events():
    return {
        "tasks": {NEW: {"app.fetch": counts()}},
        "programs": {NEW: {"worker": {"state": "RUNNING", "pid": 7}}},
        "offline": [],
        "problems": [],
    }


def answers(hostile):
    def answer(minion, fun):
        if fun == "deployment.task_events":
            return good_events() if minion == GOOD else hostile
        if fun == "deployment.update_code":
            return {"result": True, "release": NEW, "comment": "switched"}
        return {"result": True, "release": OLD}

    return answer


@pytest.fixture
def master_opts(master_opts):
    """A master whose pillar assigns deployment fetcher to every minion."""
    pillar = Path(master_opts["pillar_roots"]["base"][0])
    (pillar / "top.sls").write_text("base:\n  '*':\n    - fetcher\n")
    (pillar / "fetcher.sls").write_text("deployments:\n  fetcher:\n    repo: https://example.invalid/app.git\n")
    return master_opts


def canary(master_opts, monkeypatch, hostile):
    """fleet.deploy fetcher in steps with the evil host answering ``hostile``: the report, or the runner's crash."""
    for minion in (GOOD, EVIL):
        add_minion(master_opts, minion, grains(), mine(), age=1)
    monkeypatch.setattr(salt.client, "get_local_client", Minions(answers(hostile)))
    runners = fleet(master_opts)
    runners["fleet.deploy"].__globals__.update(__jid_event__=Bus(), __context__={})
    try:
        return runners["fleet.deploy"]("fetcher", rev="v2", steps=STEPS, analysis=ANALYSIS)
    except Exception as exc:
        pytest.fail(f"one host's task counts crashed the rollout: {type(exc).__name__}: {exc!s:.300}")


HOSTILE = [
    ("a release that is None", {"tasks": {None: {"app.fetch": counts()}, OLD: {"app.fetch": counts()}}}),
    ("only a release that is None", {"tasks": {None: {"app.fetch": counts()}}}),
    ("a release that is no SHA", {"tasks": {"../../etc": {"app.fetch": counts()}}}),
    ("a release that is a number", {"tasks": {7: {"app.fetch": counts()}}}),
    ("programs of a release that is None", {"programs": {None: {"worker": {"state": "FATAL", "pid": 1}}}}),
    ("a count that is NaN", {"tasks": {NEW: {"app.fetch": {**counts(), "failed": float("nan")}}}}),
    ("a count that is negative", {"tasks": {NEW: {"app.fetch": {**counts(), "succeeded": -30}}}}),
    ("a count that is a bool", {"tasks": {NEW: {"app.fetch": {**counts(), "failed": True}}}}),
    ("a count that is huge", {"tasks": {NEW: {"app.fetch": {**counts(), "failed": 10**30}}}}),
    ("a bucket that is a superscript", {"tasks": {NEW: {"app.fetch": {**counts(), "runtime": {"²": 1}}}}}),
    ("a bucket that is negative", {"tasks": {NEW: {"app.fetch": {**counts(), "runtime": {-1: 1}}}}}),
    ("a bucket that is a float", {"tasks": {NEW: {"app.fetch": {**counts(), "runtime": {1.5: 1}}}}}),
    ("a task name that is no string", {"tasks": {NEW: {7: counts()}}}),
    ("a task name that is huge", {"tasks": {NEW: {"x" * 100_000: counts()}}}),
    ("too many task names", {"tasks": {NEW: {f"t{n}": counts() for n in range(5000)}}}),
    ("too many releases", {"tasks": {f"{n:040x}": {"t": counts()} for n in range(500)}}),
    ("a program's pid that is a string", {"programs": {NEW: {"worker": {"state": "RUNNING", "pid": "1"}}}}),
    ("a program's state that is huge", {"programs": {NEW: {"worker": {"state": "R" * 10**6, "pid": 1}}}}),
    ("offline that is a mapping", {"offline": {"node": 1}}),
    ("problems that are numbers", {"problems": [1, 2]}),
    ("a task name that clears the screen", {"tasks": {NEW: {"\x1b[2J\x1b[Happ.fetch": counts()}}}),
    ("a task name of two lines", {"tasks": {OLD: {"app.fetch\nfleet.deploy complete": counts()}}}),
    ("a program that sets the title", {"programs": {NEW: {"\x1b]0;root@master\x07": {"state": "RUNNING", "pid": 1}}}}),
    ("a node offline that rings", {"offline": ["node\x07"]}),
    ("a list", ["not", "a", "report"]),
    ("a string", "ERROR: deployment.task_events failed"),
    ("nothing", None),
]


@pytest.mark.parametrize("hostile", [h for _, h in HOSTILE], ids=[case for case, _ in HOSTILE])
def test_one_hosts_hostile_counts_are_a_note_and_the_good_hosts_decide(master_opts, monkeypatch, hostile):
    report = canary(master_opts, monkeypatch, hostile)
    assert report["outcome"] == "complete", report
    [step] = report["analysis"]
    assert step["decision"] == "passed", step
    assert step["new"]["succeeded"] == 30 and step["new"]["failed"] == 0, step
    assert step["releases"]["new"] == [NEW]
    assert all(isinstance(sha, str) and len(sha) == 40 for sha in step["releases"]["old"]), step["releases"]
    assert any(note.startswith(f"{EVIL}: bad data: ") for note in step["notes"]), step["notes"]
    # The live record fleet.analysis shows was written whole.
    live = json.loads((Path(master_opts["cachedir"]) / "saltfleet" / "analysis" / "fetcher.json").read_text())
    assert live["decision"] == "passed"


def test_one_hosts_many_task_names_keep_the_fleets_figures_small(master_opts, monkeypatch):
    """
    The most a host's return may hold: 64 releases of 101 task names, each
    with every run time bucket. The old side adds up every host's names, so
    one host's made-up names made each window's record (fleet.analysis) tens
    of MB: the fleet's figures keep as many task names as a host's do.
    """
    row = {"succeeded": 10**9, "failed": 0, "retried": 0, "runtime": {bucket: 1 for bucket in range(200)}}
    hostile = {"tasks": {f"{n:040x}": {f"t{n}.{i}": row for i in range(101)} for n in range(64)}}
    report = canary(master_opts, monkeypatch, hostile)
    [step] = report["analysis"]
    assert step["decision"] == "passed", step
    live = Path(master_opts["cachedir"]) / "saltfleet" / "analysis" / "fetcher.json"
    assert live.stat().st_size < 1 << 20, f"fleet.analysis holds {live.stat().st_size >> 20} MB"
    assert len(json.loads(live.read_text())["old"]["tasks"]) <= 101


# ------------------------------------------------------------- operators' words


def test_a_verdict_left_for_an_earlier_rollout_is_not_taken_by_the_next(master_opts):
    loader = salt.loader.utils(master_opts)
    lock, tell = loader["saltfleet_deploylock.lock"], loader["saltfleet_deploylock.tell"]
    first = lock(master_opts, "fetcher")
    first.acquire("op", "fleet.deploy fetcher")
    tell(master_opts, "fetcher", "abort", "alice")
    first.release()
    second = lock(master_opts, "fetcher")
    second.acquire("op", "fleet.deploy fetcher")
    try:
        assert second.told() is None, "an abort meant for the rollout before was taken by this one"
        # A verdict with no holder's token (as a hand-made file) names no holder.
        (Path(master_opts["cachedir"]) / "saltfleet" / "locks" / "fetcher.verdict").write_text('{"verdict": "abort"}')
        assert second.told() is None
        tell(master_opts, "fetcher", "promote", "bob")
        assert second.told()["user"] == "bob"
    finally:
        second.release()


@pytest.mark.parametrize("name", ["../fetcher", "../../../tmp/x", "a/b", ".hidden", "", "x\0y"])
@pytest.mark.parametrize("command", ["fleet.analysis", "fleet.promote", "fleet.abort"])
def test_a_deployment_name_is_never_a_path(master_opts, command, name):
    before = sorted(Path(master_opts["cachedir"]).parent.rglob("*"))
    said = fleet(master_opts)[command](name)
    assert said.get("retcode") == 1 and "is not a deployment name" in said["error"], said
    created = set(Path(master_opts["cachedir"]).parent.rglob("*")) - set(before)
    assert not [p for p in created if p.is_file() and p.suffix in (".json", ".verdict", ".lock")], created


def test_a_hosts_problems_reach_the_record_on_one_printable_line(master_opts, monkeypatch):
    hostile = {**good_events(), "problems": ["app x: \x1b[2J\x1b]0;owned\x07gone\nfleet.deploy: complete"]}
    report = canary(master_opts, monkeypatch, hostile)
    [step] = report["analysis"]
    [note] = [n for n in step["notes"] if n.startswith(f"{EVIL}: ")]
    assert note.isprintable() and "gone" in note, note
