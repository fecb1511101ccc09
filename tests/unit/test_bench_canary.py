"""
The bench's time to roll back, computed after the fact from the sample app's
execution records: the moment a bad release could be judged is the one at
which saltfleet's own analysis would fail it, and the old release serves
again only once a worker the rollback started takes a task.
"""

from bench import canary
from localfleet.config import saltfleet_utils

analysis = saltfleet_utils().saltfleet_analysis
SETTINGS = saltfleet_utils().saltfleet_schema.analysis_settings({"window": canary.WINDOW})


def record(task, version, start, node="canary-m01.g1@vm"):
    return {"task": task, "node": node, "version": version, "start": start, "end": start + 0.02}


def stream(new_inputs, old_count, since=100.0):
    """``old_count`` good tasks completed from ``since`` on, then the flaky release's, one a second later each."""
    records, inputs = [], {}
    for n in range(old_count):
        inputs[f"o{n}"] = "p1"
        records.append(record(f"o{n}", canary.GOOD, since + n * 0.01))
    for n, platform in enumerate(new_inputs):
        inputs[f"n{n}"] = platform
        records.append(record(f"n{n}", canary.FLAKY, since + 1 + n, node="canary-m01.g2@vm"))
    return records, inputs


def verdict(failed, total, old_done):
    figures = {"app": {"succeeded": total - failed, "failed": failed, "retried": 0, "runtime": {}}}
    old = {"app": {"succeeded": old_done, "failed": 0, "retried": 0, "runtime": {}}}
    return analysis.judge(analysis.summary(figures), analysis.summary(old), [], 1, 30, SETTINGS)["decision"]


def test_the_release_is_judged_at_the_completion_where_the_analysis_would_fail_it():
    # The rule: 4 inputs in 10 fail (p10-p13, p20-p23, ...); p5-p9 succeed first.
    platforms = [f"p{n}" for n in range(5, 40)]
    records, inputs = stream(platforms, old_count=30)
    judged = canary.judged_at(records, inputs, since=100.0)
    assert judged is not None
    failed = sum(canary.fails(p) for p in platforms[: judged["tasks"]])
    assert judged["failed"] == failed
    assert verdict(failed, judged["tasks"], 30) == "failed"
    before = sum(canary.fails(p) for p in platforms[: judged["tasks"] - 1])
    assert verdict(before, judged["tasks"] - 1, 30) == "running", "judged at the first such completion"
    assert judged["at"] == records[30 + judged["tasks"] - 1]["end"]


def test_without_enough_old_tasks_the_absolute_limit_judges():
    platforms = [f"p{n}" for n in range(100) if canary.fails(f"p{n}")]
    few = canary.judged_at(*stream(platforms, old_count=5), since=100.0)
    many = canary.judged_at(*stream(platforms, old_count=30), since=100.0)
    assert few["limit"] == SETTINGS["max_failure_rate"] and many["limit"] < few["limit"]
    assert few["tasks"] > many["tasks"]


def test_a_release_that_fails_nothing_is_never_judged():
    assert canary.judged_at(*stream([f"p{n}" for n in range(4, 10)] * 5, old_count=30), since=100.0) is None


def test_the_old_release_serves_again_in_a_worker_the_rollback_started():
    fleet = canary.CanaryFleet.__new__(canary.CanaryFleet)
    draining = record("a", canary.GOOD, 10.5, node="canary-m01.g1@vm")
    records = [
        record("b", canary.GOOD, 9.0, node="canary-m01.g1@vm"),
        draining,
        record("c", canary.GOOD, 10.2, node="canary-m02.g1@vm"),
        record("d", canary.GOOD, 14.0, node="canary-m01.g3@vm"),
    ]
    assert canary.serving_again(fleet, records, "m01", judged=10.0) == 14.0
