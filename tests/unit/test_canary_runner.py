"""
fleet.deploy as the runner decides it, Salt's runner loader and a stand-in
client for the minions (no daemons; tests/integration/test_canary.py and
test_rollout.py run the same with real ones): what a failed analysis sends
where, what an operator's abort does, the ledger's record, refusals that
change nothing, and hosts already on the commit skipped (a rollout resumed).
"""

import pytest
import salt.client

from localfleet.config import saltfleet_utils
from tests.unit.test_fleet_cli import fleet
from tests.unit.test_hostile_minion_data import NEW, OLD, Bus, Minions, mine
from tests.unit.test_inventory import add_minion, assign, cloud

STEPS = [{"hosts": 1}, {"analyse": 30}, {"hosts": "100%"}]
FAST = {"window": 1}


def counts(succeeded, failed):
    return {"sampleapp.fetch": {"succeeded": succeeded, "failed": failed, "retried": 0, "runtime": {"50": succeeded}}}


def answer_with(new_counts, on_update=None):
    """Each host as it answers: w1 deploys NEW (and counts ``new_counts`` for it), w2 serves OLD."""

    def answer(minion, fun):
        if fun == "deployment.update_code":
            if on_update:
                on_update()
            return {"result": True, "changes": {}, "comment": "ok", "release": NEW}
        if fun == "deployment.rollback":
            return {"result": True, "changes": {}, "comment": "ok", "release": OLD}
        if fun == "deployment.task_events":
            tasks = {NEW: new_counts} if minion == "w1" else {OLD: counts(200, 0)}
            return {"tasks": tasks, "programs": {}, "offline": [], "problems": []}
        return None

    return answer


@pytest.fixture
def canary(master_opts, monkeypatch):
    for host in ("w1", "w2"):
        grains = {**cloud(), "saltfleet_deployments": {"fetcher": {"rev": "v1", "release": OLD}}}
        add_minion(master_opts, host, grains, mine(release=OLD), age=1)
    assign(master_opts, {"w*": {"fetcher": {"repo": "x"}}})

    def run(new_counts, on_update=None, rev="v2", answer=None, **kwargs):
        minions = Minions(answer or answer_with(new_counts, on_update))
        monkeypatch.setattr(salt.client, "get_local_client", minions)
        loaded = fleet(master_opts)
        loaded["fleet.deploy"].__globals__.update(__jid_event__=Bus(), __context__={}, __jid__="20260101000000000042")
        return loaded["fleet.deploy"]("fetcher", rev=rev, **kwargs), minions, loaded

    return run


def jobs(minions, fun):
    return [(tgt, arg) for tgt, f, arg in minions.jobs if f == fun]


def test_a_failing_analysis_sends_the_changed_host_back_and_the_ledger_keeps_the_figures(canary):
    report, minions, loaded = canary(counts(30, 20), steps=STEPS, analysis=FAST)
    assert report["retcode"] == 1, report
    assert report["outcome"] == "rolled back"
    assert report["rolled back"] == {"w1": OLD}
    assert report["not touched"] == {"w2": OLD}
    assert jobs(minions, "deployment.update_code") == [(["w1"], ["fetcher", "v2"])], "w2 was never changed"
    assert jobs(minions, "deployment.rollback") == [(["w1"], ["fetcher", OLD])]
    [analysis] = report["analysis"]
    assert analysis["decision"] == "failed" and analysis["early"] is True
    assert (analysis["new"]["failed"], analysis["old"]["succeeded"]) == (20, 200)
    [entry] = loaded["fleet.history"]("fetcher")
    assert entry["analysis"][0]["why"] == analysis["why"]
    assert entry["hosts"]["w1"] == {"outcome": "rolled back", "release": OLD}
    assert loaded["fleet.analysis"]("fetcher")["decision"] == "failed"


def test_a_passing_analysis_goes_on_to_every_host(canary):
    report, minions, _ = canary(counts(100, 0), steps=[{"hosts": 1}, {"analyse": 1}], analysis=FAST)
    assert report["retcode"] == 0, report
    assert report["deployed"] == {"w1": NEW, "w2": NEW}
    assert report["analysis"][0]["decision"] == "passed"
    assert jobs(minions, "deployment.rollback") == []


def listener_jobs(minions):
    """(index, hosts, watch, seconds or 'stop') of each task_events job, in the order the runner sent them."""
    return [
        (n, tgt, kw["watch"], "stop" if kw.get("stop") else kw["seconds"])
        for n, ((tgt, fun, _), kw) in enumerate(zip(minions.jobs, minions.kwargs, strict=True))
        if fun == "deployment.task_events"
    ]


def test_the_listeners_start_before_the_canary_batch_so_its_first_tasks_count(canary):
    report, minions, _ = canary(counts(30, 20), steps=STEPS, analysis=FAST, timeout=120)
    assert report["outcome"] == "rolled back", report
    update = [n for n, (_, fun, _) in enumerate(minions.jobs) if fun == "deployment.update_code"]
    listeners = listener_jobs(minions)
    first = listeners[0]
    # Sent to every host before the canary's batch, with the same watch the analysis reads, and lasting
    # the batch's time as well as the step's.
    assert first[0] < update[0] and first[1] == ["w1", "w2"]
    assert {watch for _, _, watch, _ in listeners} == {first[2]}
    # A batch lasts as long as publish lets a host say it still runs (twice the timeout): a host that says so
    # never ends the others' listeners before the step does (a listener started again forgets what it counted).
    assert first[3] >= 30 + 2 * 120
    assert listeners[-1][3] == "stop"


def test_a_failed_canary_batch_stops_the_listeners_it_started(canary):
    def answer(minion, fun):
        if fun == "deployment.update_code":
            return {"result": False, "changes": {}, "comment": "did not start", "release": OLD}
        return answer_with(counts(0, 0))(minion, fun)

    report, minions, _ = canary(counts(0, 0), steps=STEPS, analysis=FAST, answer=answer)
    assert report["outcome"] == "stopped", report
    [(_, _, watch, _), (_, hosts, stopped, how)] = listener_jobs(minions)
    assert (hosts, stopped, how) == (["w1", "w2"], watch, "stop")


def test_an_abort_while_a_batch_runs_rolls_back_before_the_next_step(canary, master_opts):
    # The operator's abort arrives while the first batch runs: the rollout takes it before its pause.
    tell = saltfleet_utils().saltfleet_deploylock.tell
    report, minions, loaded = canary(
        counts(100, 0),
        steps=[{"hosts": 1}, {"pause": True}],
        on_update=lambda: tell(master_opts, "fetcher", "abort", "oncall"),
    )
    assert report["outcome"] == "rolled back", report
    assert "aborted by oncall" in report["summary"]
    assert jobs(minions, "deployment.rollback") == [(["w1"], ["fetcher", OLD])]
    [entry] = loaded["fleet.history"]("fetcher")
    assert entry["operator"][0]["event"] == "abort" and entry["operator"][0]["user"] == "oncall"


def test_an_abort_while_the_canary_batch_runs_stops_the_listeners_it_started(canary, master_opts):
    """Sent back before its analysis: the users' listeners end with the rollout, not at their deadline."""
    tell = saltfleet_utils().saltfleet_deploylock.tell
    report, minions, _ = canary(
        counts(100, 0), steps=STEPS, analysis=FAST, on_update=lambda: tell(master_opts, "fetcher", "abort", "oncall")
    )
    assert "aborted by oncall" in report["summary"], report
    [(_, _, watch, _), *after] = listener_jobs(minions)
    assert [(hosts, stopped, how) for _, hosts, stopped, how in after] == [(["w1", "w2"], watch, "stop")]


def test_promote_and_abort_without_a_running_rollout_are_errors(canary):
    _, _, loaded = canary(counts(100, 0), steps=[{"hosts": 1}, {"analyse": 1}], analysis=FAST)
    loaded["fleet.promote"].__globals__.update(__context__={})
    said = loaded["fleet.promote"]("fetcher")
    assert said["retcode"] == 1
    assert said["error"].startswith("fleet.promote fetcher: no rollout of fetcher is running (its deploy lock is free)")


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"steps": [{"hosts": 0}]}, "rollout:steps:1:hosts: 0 is not a number of hosts"),
        ({"steps": STEPS, "analysis": {"min_task": 5}}, "rollout:analysis:min_task: unknown key"),
        ({"steps": "[{hosts: 1}"}, "rollout:steps: must be a list"),
    ],
)
def test_wrong_steps_are_refused_naming_the_key_and_nothing_changes(canary, kwargs, error):
    report, minions, _ = canary(counts(0, 0), **kwargs)
    assert report["retcode"] == 1
    assert error in report["error"], report
    assert minions.jobs == []


def test_hosts_whose_pillar_gives_different_rollouts_are_refused(canary, master_opts):
    assign(master_opts, {"w1": {"fetcher": {"rollout": {"steps": STEPS}}}, "w2": {"fetcher": {"repo": "x"}}})
    report, minions, _ = canary(counts(0, 0))
    assert "deployments:fetcher:rollout: the master's pillar gives w1 and w2 different rollout;" in report["error"]
    assert minions.jobs == []


def test_a_dry_run_shows_the_steps(canary):
    report, _, _ = canary(counts(0, 0), steps=STEPS, test=True)
    assert report["steps"] == "1 host, analyse 30 s, 1 host", report


def test_a_rollout_run_again_skips_the_hosts_already_on_the_commit(canary, master_opts):
    # w2 was deployed by a rollout whose runner died: the master's cache says it serves NEW.
    grains = {**cloud(), "saltfleet_deployments": {"fetcher": {"rev": "v2", "release": NEW}}}
    add_minion(master_opts, "w2", grains, mine(release=NEW), age=1)
    report, minions, _ = canary(counts(0, 0), batch=1)
    assert report["retcode"] == 0, report
    assert report["deployed"] == {"w1": NEW}
    assert report["skipped"] == {"w2": NEW}
    assert report["summary"].endswith("; 1 host already on it, skipped"), report
    assert jobs(minions, "deployment.update_code") == [(["w1"], ["fetcher", "v2"])]


def test_a_commit_every_host_serves_is_sent_to_none(canary, master_opts):
    for host in ("w1", "w2"):
        grains = {**cloud(), "saltfleet_deployments": {"fetcher": {"rev": NEW, "release": NEW}}}
        add_minion(master_opts, host, grains, mine(release=NEW), age=1)
    report, minions, _ = canary(counts(0, 0), rev=NEW)
    assert report["retcode"] == 0, report
    assert report["skipped"] == {"w1": NEW, "w2": NEW}
    assert jobs(minions, "deployment.update_code") == []
