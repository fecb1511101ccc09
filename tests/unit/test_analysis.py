"""
A rollout's canary analysis without daemons: the statistics and the decision
(saltfleet_analysis), the steps' plan (saltfleet_steps), the rollout settings
in pillar (saltfleet_schema.check_rollout) and a host's report of its task
counts read as the minion's word (saltfleet_taskevents.reply).
"""

import math
import random

import pytest

from localfleet.config import saltfleet_utils

utils = saltfleet_utils()
analysis = utils.saltfleet_analysis
NEW, OLD = "b" * 40, "a" * 40
SETTINGS = utils.saltfleet_schema.analysis_settings()


def tasks(succeeded, failed, retried=0, runtime=0.01, name="app.fetch"):
    """One task name's counts, every success taking ``runtime`` seconds."""
    bucket = int(math.log(runtime / 1e-4, 1.1))
    return {name: {"succeeded": succeeded, "failed": failed, "retried": retried, "runtime": {bucket: succeeded}}}


def decide(new, old, elapsed=60, seconds=60, crashed=(), **settings):
    figures = analysis.summary(new), analysis.summary(old)
    return analysis.judge(*figures, list(crashed), elapsed, seconds, {**SETTINGS, **settings})


def test_the_lower_bound_holds_the_true_rate_at_its_confidence():
    rng = random.Random(7)
    misses = 0
    for _ in range(2000):
        failed = sum(rng.random() < 0.3 for _ in range(50))
        misses += analysis.lower_bound(failed, 50, 0.95) > 0.3
    # An exact one-sided 95% bound is above the true rate at most one time in twenty.
    assert 20 <= misses <= 100


@pytest.mark.parametrize(
    ("failed", "total", "bound"),
    # The rates where P(X >= failed) reaches 1%, summed term by term with math.comb (and checked no other way).
    [(1, 1, 0.01), (0, 10, 0.0), (12, 30, 0.201296), (5, 100, 0.012969), (500, 1000, 0.462778)],
)
def test_the_lower_bound_is_clopper_pearsons(failed, total, bound):
    assert analysis.lower_bound(failed, total, 0.99) == pytest.approx(bound, abs=1e-5)


def test_one_failure_in_one_task_is_no_proof():
    # The old release fails 1 in 20 too: one failed task of the new one says nothing yet.
    assert decide(tasks(0, 1), tasks(380, 20), elapsed=3)["decision"] == "running"


def test_percentiles_come_from_the_histogram_within_a_bucket():
    row = tasks(100, 0, runtime=0.25)["app.fetch"]
    assert analysis.quantile(row["runtime"], 0.95) == pytest.approx(0.25, rel=0.1)
    assert analysis.quantile({}, 0.5) is None


def test_a_release_failing_forty_percent_fails_before_its_time():
    verdict = decide(tasks(18, 12), tasks(60, 0), elapsed=10)
    assert verdict["decision"] == "failed"
    assert verdict["early"] is True
    assert "12 of 30 tasks failed (40.0%)" in verdict["why"]
    assert verdict["limit"] == 0.1


def test_a_few_failures_are_no_proof_yet():
    # 1 failure in 5 against a limit of 10%: it may be bad luck, so the step runs on.
    assert decide(tasks(4, 1), tasks(60, 0), elapsed=10)["decision"] == "running"


def test_an_app_that_always_fails_five_percent_passes_against_its_own_baseline():
    verdict = decide(tasks(190, 10), tasks(380, 20))
    assert verdict["decision"] == "passed"
    assert verdict["limit"] == 0.15


def test_a_step_passes_only_after_its_full_time():
    assert decide(tasks(200, 0), tasks(200, 0), elapsed=30)["decision"] == "running"
    assert decide(tasks(200, 0), tasks(200, 0), elapsed=60)["decision"] == "passed"


def test_a_release_five_times_slower_fails_on_its_run_time():
    verdict = decide(tasks(100, 0, runtime=0.5), tasks(100, 0, runtime=0.1))
    assert verdict["decision"] == "failed"
    assert "times the old release's" in verdict["why"]


def test_too_few_tasks_is_inconclusive():
    verdict = decide(tasks(3, 0), tasks(3, 0))
    assert verdict["decision"] == "inconclusive"
    assert "fewer than min_tasks (20)" in verdict["why"]


def test_retries_that_end_in_success_are_no_failures():
    assert decide(tasks(100, 0, retried=80), tasks(100, 0))["decision"] == "passed"


def test_crashed_workers_fail_the_step_at_once():
    verdict = decide(tasks(0, 0), tasks(0, 0), elapsed=1, crashed=["w1: worker BACKOFF"])
    assert verdict["decision"] == "failed"
    assert "w1: worker BACKOFF" in verdict["why"]


def test_without_an_old_baseline_the_absolute_limit_holds():
    assert decide(tasks(70, 30), tasks(0, 0))["decision"] == "passed"
    assert decide(tasks(30, 70), tasks(0, 0))["decision"] == "failed"


steps = utils.saltfleet_steps


def whole(plan):
    return plan, []


@pytest.mark.parametrize(
    ("given", "batch", "expected"),
    [
        (None, None, [{"batch": ["h1"]}, {"batch": ["h2"]}, {"batch": ["h3"]}, {"batch": ["h4"]}]),
        (
            [{"hosts": 1}, {"analyse": 60}, {"hosts": "50%"}, {"pause": True}],
            None,
            [{"batch": ["h1"]}, {"analyse": 60}, {"batch": ["h2"]}, {"pause": True}, {"batch": ["h3", "h4"]}],
        ),
        (
            [{"hosts": 1}, {"analyse": 60}, {"hosts": "100%"}],
            2,
            [{"batch": ["h1"]}, {"analyse": 60}, {"batch": ["h2", "h3"]}, {"batch": ["h4"]}],
        ),
        ([{"hosts": "10%"}, {"analyse": 5}], None, [{"batch": ["h1"]}, {"analyse": 5}, {"batch": ["h2", "h3", "h4"]}]),
    ],
)
def test_steps_become_batches_analyses_and_pauses(given, batch, expected):
    assert steps.actions(given, ["h1", "h2", "h3", "h4"], batch, whole) == (expected, [])


def check(rollout):
    errors = []
    utils.saltfleet_schema.check_rollout("deployments:app:rollout", rollout, errors)
    return errors


def test_rollout_settings_in_pillar_are_checked_key_by_key():
    assert check({"steps": [{"hosts": 1}, {"analyse": 60}, {"hosts": "25%"}, {"pause": True}]}) == []
    assert check({"analysis": {"max_failure_rate": 0.2, "min_tasks": 5, "inconclusive": "pass"}}) == []
    assert check({"steps": [{"hosts": 0}]}) == [
        "deployments:app:rollout:steps:1:hosts: 0 is not a number of hosts (2) or a share of them ('25%')"
    ]
    assert check({"steps": [{"analyze": 60}]})[0].startswith(
        "deployments:app:rollout:steps:1: {'analyze': 60} is not a step"
    )
    assert check({"steps": [{"pause": "yes"}]})[0].startswith("deployments:app:rollout:steps:1:pause: must be true")
    assert check({"analysis": {"min_task": 5}}) == [
        "deployments:app:rollout:analysis:min_task: unknown key; did you mean 'min_tasks'?"
    ]
    assert check({"analysis": {"inconclusive": "wait"}}) == [
        "deployments:app:rollout:analysis:inconclusive: must be pause or pass or fail, got 'wait'"
    ]
    assert check({"analysis": {"max_failure_rate": 2}}) == [
        "deployments:app:rollout:analysis:max_failure_rate: must be between 0.0 and 1.0, got 2"
    ]


reply = utils.saltfleet_taskevents.reply


def test_a_hosts_counts_are_taken_only_as_counts():
    good = {"tasks": {NEW: tasks(3, 1)}, "programs": {NEW: {"worker": {"state": "RUNNING", "pid": 7}}}, "offline": []}
    read = reply({**good, "problems": []})
    assert read["tasks"][NEW]["app.fetch"]["failed"] == 1
    for bad in (
        {"tasks": {"not-a-sha": tasks(1, 0)}},
        {"tasks": {NEW: {"app.fetch": {"succeeded": -1, "failed": 0, "retried": 0}}}},
        {"tasks": {NEW: {"app.fetch": {"succeeded": True, "failed": 0, "retried": 0}}}},
        {"tasks": {NEW: {"app.fetch": {"succeeded": 1, "failed": 0, "retried": 0, "runtime": {"999": 1}}}}},
        {"tasks": {NEW: {f"t{n}": tasks(1, 0)["app.fetch"] for n in range(500)}}},
        {"programs": {NEW: {"worker": {"state": "RUNNING", "pid": "7"}}}},
        {"offline": "everyone"},
        ["not", "a", "mapping"],
    ):
        with pytest.raises(ValueError, match=r"^bad data: "):
            reply(bad)
