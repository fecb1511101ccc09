"""What fleet.overview gives the fleet page, from a master's cache and ledger; and Salt's ACL deciding its buttons."""

import pytest
import salt.cache
import salt.config

from localfleet.config import saltfleet_utils
from tests.unit.test_inventory import add_minion, assign, cloud, load_runner

page = saltfleet_utils().saltfleet_page
OLD, NEW = "a" * 40, "b" * 40
HOSTILE = "<img src=x onerror=alert(1)>"


@pytest.fixture
def master_opts(master_opts):
    master_opts["output"] = None
    return master_opts


def status_row(release, held=None, draining=(), programs=None):
    programs = {"worker": "RUNNING"} if programs is None else programs
    return {
        "release": release,
        "rev": "main",
        "supervisord": "running",
        "programs": programs,
        "running": sum(s == "RUNNING" for s in programs.values()),
        "held": held or {},
        "draining": list(draining),
        "draining_tasks": {str(pid): 1 for pid in draining},
        "state": "up",
        "summary": f"up: {sum(s == 'RUNNING' for s in programs.values())}/{len(programs)} RUNNING",
        "workers": {f"worker@{release[:4]}": {"queues": ["fetch"], "active": 0}},
    }


def grains(release, subject):
    return {**cloud(), "saltfleet_deployments": {"fetcher": {"rev": "main", "release": release, "subject": subject}}}


def mine(rows):
    return {"saltfleet.heartbeat": "30", "deployment.status": rows}


def test_a_deployment_on_two_releases_is_drift_and_each_host_keeps_its_holds_drains_and_subject():
    facts = {
        "w1": ("up", grains(OLD, "old subject")["saltfleet_deployments"], {"fetcher": status_row(OLD)}),
        "w2": (
            "up",
            grains(NEW, HOSTILE)["saltfleet_deployments"],
            {"fetcher": status_row(NEW, held={"worker": HOSTILE}, draining=[4242])},
        ),
    }
    view = page.deployments(facts, {"fetcher": {"fetch": 2}})
    fetcher = view["fetcher"]
    assert fetcher["drift"] is True
    assert fetcher["releases"] == {OLD: ["w1"], NEW: ["w2"]}
    assert fetcher["min_consumers"] == {"fetch": 2}
    w2 = fetcher["hosts"]["w2"]
    assert (w2["subject"], w2["held"]) == (HOSTILE, {"worker": HOSTILE})
    assert (w2["draining"], w2["draining_tasks"]) == ([4242], {"4242": 1})
    assert (w2["running"], w2["total"]) == (1, 1)
    same = page.deployments({k: v for k, v in facts.items() if k == "w1"})
    assert same["fetcher"]["drift"] is False


def test_a_subject_is_shown_for_its_own_release_only_and_long_values_are_cut():
    known = {"release": OLD, "subject": "the old release"}
    fresher = status_row(NEW, held={"worker": "x" * 5000})
    entry = page.host_entry("up", known, fresher)
    assert entry["release"] == NEW
    assert entry["subject"] is None
    assert len(entry["held"]["worker"]) == 500
    assert page.host_entry("down", known, {})["subject"] == "the old release"


def test_a_floored_queue_is_listed_even_with_no_consumer_and_flagged_below_its_floor():
    found = {"fetch": [{"minion": "w1", "deployment": "fetcher", "node": "n", "active": 0, "status": "up"}]}
    view = page.queues(found, [], {"fetcher": {"fetch": 2, "reports": 1}})
    assert view["queues"]["fetch"]["floors"] == {"fetcher": 2}
    assert (view["queues"]["fetch"]["up"], view["queues"]["fetch"]["below"]) == (1, True)
    assert view["queues"]["reports"] == {"up": 0, "consumers": [], "floors": {"fetcher": 1}, "below": True}


def test_the_page_counts_consumers_as_fleet_queues_does(master_opts):
    workers = {"n1@w1": {"queues": ["fetch", "reports"], "active": 1}, "n2@w1": {"queues": ["fetch"], "active": 0}}
    add_minion(
        master_opts,
        "w1",
        grains=grains(OLD, "s"),
        mine=mine({"fetcher": {**status_row(OLD), "workers": workers}}),
        age=5,
    )
    lost = {"error": "no answer from the workers"}
    add_minion(
        master_opts,
        "w2",
        grains=grains(OLD, "s"),
        mine=mine({"fetcher": {**status_row(OLD), "workers": lost}}),
        age=500,
    )
    add_minion(master_opts, "w3", grains=grains(NEW, "s"), mine=mine({"fetcher": status_row(NEW)}), age=500)
    runner = load_runner(master_opts)
    runner.__opts__ = {**master_opts, "output": "json"}
    report = runner.queues()
    facts = {
        m: ("up" if m == "w1" else "down", {}, cache_mine(master_opts, m)["deployment.status"])
        for m in ("w1", "w2", "w3")
    }
    view = page.queues(*page.consumers(facts), {})
    assert {
        q: {k: v for k, v in info.items() if k in ("up", "consumers")} for q, info in view["queues"].items()
    } == report["queues"]
    assert view["unanswered"] == report["unanswered"]


def cache_mine(opts, minion):
    return salt.cache.factory(opts).fetch("mine", minion)


def test_the_rollout_view_starts_from_the_running_rollouts_and_the_last_finished_one():
    def lines(rid, ended):
        out = [{"type": "rollout", "id": rid, "event": "start", "deployment": "fetcher"}]
        return out + ([{"type": "rollout", "id": rid, "event": "end", "outcome": "complete"}] if ended else [])

    entries = [*lines("1", True), {"type": "host", "jid": "9"}, *lines("2", False), *lines("3", True)]
    entries += lines("4", True)
    shown = page.rollouts(entries, running={"2"})
    assert [(r["id"], r["running"]) for r in shown] == [("2", True), ("4", False)]
    assert [e["event"] for e in shown[1]["events"]] == ["start", "end"]


@pytest.mark.parametrize(
    ("perms", "fetcher", "reporter"),
    [
        (["@runner"], True, True),
        ([{"@runner": ["fleet.overview"]}], False, False),
        # Salt matches with re.match: an unanchored pattern also allows every name it begins.
        ([{"@runner": [{"fleet.deploy": {"args": ["fetcher$"]}}]}], True, False),
        ([{"@runner": [{"fleet.deploy": {"args": ["fetcher"]}}]}], True, True),
        ([{"@runner": [{"fleet.deploy": {"kwargs": {"rev": "v[0-9]+$"}}}]}], False, False),
        (None, False, False),
    ],
)
def test_actions_are_what_salts_own_acl_check_allows(master_opts, perms, fetcher, reporter):
    allowed = page.checker(master_opts, perms)
    shown = page.actions(["fetcher", "fetcher-reporter"], lambda fun: True, allowed)
    assert shown["fetcher"]["deploy"] is fetcher
    assert shown["fetcher-reporter"]["deploy"] is reporter


def test_promote_and_abort_only_where_their_runner_functions_exist(master_opts):
    allowed = page.checker(master_opts, ["@runner"])
    shown = page.actions(["fetcher"], lambda fun: fun in {"fleet.deploy", "fleet.rollback"}, allowed)
    assert shown["fetcher"] == {"deploy": True, "rollback": True, "promote": False, "abort": False}


def test_overview_reads_the_cache_and_the_ledger_in_one_call(master_opts):
    add_minion(master_opts, "w1", grains=grains(OLD, "old"), mine=mine({"fetcher": status_row(OLD)}), age=5)
    add_minion(master_opts, "w2", grains=grains(NEW, HOSTILE), mine=mine({"fetcher": status_row(NEW)}), age=5)
    add_minion(master_opts, "bare", grains=cloud(), mine={"saltfleet.heartbeat": "30"}, age=5)
    assign(
        master_opts, {"w1": {"fetcher": {"min_consumers": {"fetch": 1}, "deploy_key": "SECRET"}}, "w2": {"fetcher": {}}}
    )
    utils = saltfleet_utils()
    utils.saltfleet_ledger.journal(master_opts, "20250101")(
        {"event": "start", "kind": "fleet.deploy", "user": "alice", "deployment": "fetcher", "rev": "v2"}
    )
    runner = load_runner(master_opts)
    runner.__utils__ = utils
    # As Salt's runner loader lists the fleet runner's functions: the page's four verbs among them.
    runner.__salt__ = {
        f"fleet.{fun}": getattr(runner, fun) for fun in ("overview", "deploy", "rollback", "promote", "abort")
    }
    runner.__user__ = "alice"
    view = runner.overview(perms=[{"@runner": ["fleet.(overview|deploy|promote)$"]}])
    assert [h["id"] for h in view["hosts"]] == ["bare", "w1", "w2"]
    assert sorted(view["deployments"]["fetcher"]["hosts"]) == ["w1", "w2"]
    assert view["deployments"]["fetcher"]["drift"] is True
    assert view["deployments"]["fetcher"]["min_consumers"] == {"fetch": 1}
    assert view["queues"]["queues"]["fetch"]["floors"] == {"fetcher": 1}
    assert view["actions"] == {"fetcher": {"deploy": True, "rollback": False, "promote": True, "abort": False}}
    assert view["capabilities"] == {"deploy": True, "rollback": True, "promote": True, "abort": True}
    assert [r["id"] for r in view["rollouts"]] == ["20250101"]
    assert view["history"][0]["who"] == "alice"
    assert "SECRET" not in repr(view)
    assert view["floors_read"] is True
    # The page's first look: everything but the floors, which need the master's pillar of every host.
    quick = runner.overview(perms=[{"@runner": ["fleet.(overview|deploy|promote)$"]}], floors=False)
    assert quick["floors_read"] is False and quick["deployments"]["fetcher"]["min_consumers"] == {}
    assert quick["queues"]["queues"]["fetch"]["floors"] == {}
    assert {k: v for k, v in quick.items() if k not in ("deployments", "queues", "floors_read", "generated")} == {
        k: v for k, v in view.items() if k not in ("deployments", "queues", "floors_read", "generated")
    }
