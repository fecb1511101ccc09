"""
A rollout's hosts, hooks and Celery floors come from the master's own pillar,
never from what a minion says: a minion that claims a deployment in its
grains, mine and cached (overridden) pillar, sorting first and holding fake
workers, is no host of its rollout, is never sent its jobs, picks no release
for a rollback and keeps no floor up. Salt's runner loader, no daemons; the
minions' side is a stand-in client.
"""

import pytest
import salt.cache
import salt.client

from tests.unit.test_fleet_cli import fleet
from tests.unit.test_hostile_minion_data import NEW, OLD, Bus, Minions, mine, releases, row, worker
from tests.unit.test_inventory import add_minion, assign, cloud

STRAY = "a-stray"  # sorts before every host: the old "first host"


def grains(release=NEW):
    return {**cloud(), "saltfleet_deployments": {"fetcher": {"rev": "main", "release": release}}}


def answer(minion, fun):
    if fun == "deployment.releases":
        if minion == STRAY:
            # A release no real host keeps: a rollback that asked it would go nowhere (or where it says).
            return [{"release": "c" * 40, "complete": True, "serving": True, "deployed": "2027-01-01T00:00:00Z"}]
        return releases(minion, fun)
    if fun == "deployment.status":
        return {"fetcher": row()}
    if fun == "deployment.run":
        return {"retcode": 0, "stdout": "migrated", "stderr": ""}
    return {"result": True, "changes": {}, "comment": "ok", "release": NEW}


@pytest.fixture
def fleet_and_a_stray(master_opts, monkeypatch):
    for host in ("w1", "w2"):
        add_minion(master_opts, host, grains(), mine(), age=1)
    # The stray says it runs fetcher everywhere a minion can say so, with five Celery workers on q.
    fake = {f"fetcher.g{i}@stray": {"queues": ["q"], "active": 0} for i in range(5)}
    add_minion(master_opts, STRAY, grains(), mine(workers=fake), age=1)
    salt.cache.factory(master_opts).store("pillar", STRAY, {"deployments": {"fetcher": {"repo": "x"}}})
    minions = Minions(answer)
    monkeypatch.setattr(salt.client, "get_local_client", minions)

    def runners():
        loaded = fleet(master_opts)
        loaded["fleet.deploy"].__globals__.update(__jid_event__=Bus(), __context__={})
        return loaded

    return master_opts, minions, runners


def targets(minions):
    return {minion for tgt, _, _ in minions.jobs for minion in tgt}


def test_a_stray_is_no_host_and_the_hosts_pillar_gives_the_hooks(fleet_and_a_stray):
    opts, minions, runners = fleet_and_a_stray
    for host in ("w1", "w2"):
        add_minion(opts, host, grains(OLD), mine(release=OLD), age=1)
    assign(opts, {"w*": {"fetcher": {"repo": "x", "hooks": {"pre": "python manage.py migrate"}}}})
    loaded = runners()
    report = loaded["fleet.deploy"]("fetcher", rev="v2")
    assert report["retcode"] == 0, report
    assert report["deployed"] == {"w1": NEW, "w2": NEW}
    assert STRAY not in targets(minions)
    assert [(tgt, fun) for tgt, fun, _ in minions.jobs] == [
        (["w1"], "deployment.run"),
        (["w1"], "deployment.update_code"),
        (["w2"], "deployment.update_code"),
    ]
    assert report["hooks"]["pre"][0]["command"] == "python manage.py migrate"
    said = [data["message"] for _, data in loaded["fleet.deploy"].__globals__["__jid_event__"].fired]
    assert any(f"{STRAY} says it runs fetcher, but the master's pillar does not assign it there" in m for m in said)


def test_a_strays_workers_keep_no_floor_and_its_pillar_drops_none(fleet_and_a_stray):
    """w1 and w2 hold the two consumers of q, and its floor is 2: no host may go first."""
    opts, minions, runners = fleet_and_a_stray
    assign(opts, {"w*": {"fetcher": {"repo": "x", "min_consumers": {"q": 2}}}})
    report = runners()["fleet.deploy"]("fetcher", rev="v2")
    assert report["retcode"] == 1, report
    assert "queue q has 2 consumers up and a floor of 2 (min_consumers)" in report["error"]
    assert minions.jobs == []


def test_the_highest_floor_any_hosts_pillar_gives_counts(fleet_and_a_stray):
    opts, _, runners = fleet_and_a_stray
    assign(opts, {"w1": {"fetcher": {"min_consumers": {"q": 2}}}, "w2": {"fetcher": {"min_consumers": {"q": 1}}}})
    report = runners()["fleet.deploy"]("fetcher", rev="v2", test=True)
    assert report["retcode"] == 1 and "a floor of 2" in report["error"], report


def test_hosts_whose_pillar_gives_different_hooks_are_refused_naming_them(fleet_and_a_stray):
    opts, minions, runners = fleet_and_a_stray
    assign(opts, {"w1": {"fetcher": {"hooks": {"pre": "migrate"}}}, "w2": {"fetcher": {"hooks": {"pre": "other"}}}})
    report = runners()["fleet.deploy"]("fetcher", rev="v2")
    assert report["retcode"] == 1
    assert "deployments:fetcher:hooks: the master's pillar gives w1 and w2 different hooks;" in report["error"]
    assert minions.jobs == []


def test_a_rollback_asks_and_moves_the_hosts_alone(fleet_and_a_stray):
    opts, minions, runners = fleet_and_a_stray
    assign(opts, {"w*": {"fetcher": {"repo": "x"}}})
    report = runners()["fleet.rollback"]("fetcher")
    assert report["retcode"] == 0, report
    assert report["deployed"] == {"w1": NEW, "w2": NEW}
    assert minions.jobs[0][1] == "deployment.releases"
    assert minions.jobs[1][2] == ["fetcher", OLD]
    assert STRAY not in targets(minions)


def test_status_and_queues_floors_on_the_page_follow_the_masters_pillar(fleet_and_a_stray):
    opts, minions, runners = fleet_and_a_stray
    assign(opts, {"w*": {"fetcher": {"repo": "x", "min_consumers": {"q": 1}}}})
    loaded = runners()
    report = loaded["fleet.status"]("fetcher")
    assert sorted(report["up"]) == ["w1", "w2"]
    assert targets(minions) == {"w1", "w2"}
    view = loaded["fleet.overview"]()
    assert view["deployments"]["fetcher"]["min_consumers"] == {"q": 1}


def test_a_host_whose_worker_row_is_whole_still_counts(fleet_and_a_stray):
    """The floor counts the hosts' own workers: three on q (w1 two), a floor of 1 lets w1 go first."""
    opts, _, runners = fleet_and_a_stray
    add_minion(opts, "w1", grains(), mine(workers={**worker(), "fetcher.g2@host": {"queues": ["q"]}}), age=1)
    assign(opts, {"w*": {"fetcher": {"min_consumers": {"q": 1}}}})
    report = runners()["fleet.deploy"]("fetcher", rev="v2", batch=2)
    assert report["retcode"] == 0, report
    assert report["batches"] == [["w1"], ["w2"]]
    assert report["held back"][0]["queue"] == "q"
