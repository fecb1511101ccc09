"""
One minion's bad data never fails the fleet's runners: each runner that reads
what minions write (grains, mine, job returns) is fed a cache with one
well-behaved host and one host writing a hostile value, and must answer for
the fleet, the good host as it is and the hostile one as one row marked
``bad data`` naming what was wrong. Salt's own runner loader, no daemons; the
jobs a runner publishes are answered by a stand-in client (the minions' side).
"""

import json
from pathlib import Path

import pytest
import salt.cache
import salt.client
import salt.config
import salt.loader

from tests.unit.test_fleet_cli import fleet
from tests.unit.test_inventory import add_minion, cloud

OLD, NEW = "a" * 40, "b" * 40
GOOD = "good-1"
BIG = "x" * (10 * 1024 * 1024)


def row(**changes):
    """A deployment.status row as a healthy host writes it, with a Celery worker on queue q."""
    base = {
        "rev": "main",
        "release": NEW,
        "supervisord": "running",
        "programs": {"worker": "RUNNING"},
        "running": 1,
        "state": "up",
        "summary": "up: 1/1 RUNNING",
        "held": {},
        "pinned": None,
        "draining": [],
        "draining_tasks": {},
        "workers": {"fetcher.g1@host": {"queues": ["q"], "active": 0}},
    }
    return {**base, **changes}


def grains(**changes):
    return {**cloud(), "saltfleet_deployments": {"fetcher": {"rev": "main", "release": NEW}}, **changes}


def mine(heartbeat="30", **changes):
    return {"saltfleet.heartbeat": heartbeat, "deployment.status": {"fetcher": row(**changes)}}


def worker(queues=None, active=0):
    return {"fetcher.g1@host": {"queues": ["q"] if queues is None else queues, "active": active}}


# (case, minion id, grains, mine, what the bad data row says)
CASES = [
    ("heartbeat inf", "evil", grains(), mine("inf"), "mine saltfleet.heartbeat: 'inf' is not a finite"),
    ("heartbeat nan", "evil", grains(), mine(float("nan")), "mine saltfleet.heartbeat: nan is not a finite"),
    ("heartbeat huge", "evil", grains(), mine(10**400), "mine saltfleet.heartbeat: '1000"),
    ("heartbeat list", "evil", grains(), mine(["30"]), "mine saltfleet.heartbeat: ['30'] is not a number"),
    ("running huge", "evil", grains(), mine(running=10**30), "fetcher: running: '1000"),
    ("running inf", "evil", grains(), mine(running=float("inf")), "fetcher: running: inf is not a count"),
    ("active a string", "evil", grains(), mine(workers=worker(active="many")), "active: 'many' is not a count"),
    ("queue a list", "evil", grains(), mine(workers=worker([["q"]])), "queues: 0: a list, not a string"),
    ("queues a dict", "evil", grains(), mine(workers=worker({"q": 1})), "queues: a mapping, not a list"),
    ("workers a list", "evil", grains(), mine(workers=[["q"]]), "fetcher: workers: a list, not a mapping"),
    ("programs a list", "evil", grains(), mine(programs=["worker"]), "programs: a list, not a mapping"),
    ("draining a dict", "evil", grains(), mine(draining={"1": 2}), "draining: a mapping, not a list"),
    ("pinned a list", "evil", grains(), mine(pinned=["v1"]), "pinned: a list, not a mapping"),
    ("release a list", "evil", grains(), mine(release=["x"]), "fetcher: release: ['x'] is not a commit SHA"),
    ("summary 10 MB", "evil", grains(), mine(summary=BIG), "summary: 10485760 characters"),
    ("status a list", "evil", grains(), {"deployment.status": ["fetcher"]}, "mine deployment.status: a list, not"),
    ("mine a string", "evil", grains(), "mine", "mine: a string, not a mapping"),
    ("grains a list", "evil", ["fetcher"], mine(), "grains: a list, not a mapping"),
    (
        "deployments a string",
        "evil",
        grains(saltfleet_deployments="fetcher"),
        mine(),
        "grains saltfleet_deployments: a string, not a mapping",
    ),
    (
        "grains release a dict",
        "evil",
        grains(saltfleet_deployments={"fetcher": {"release": {"sha": NEW}}}),
        mine(),
        "grains saltfleet_deployments: fetcher: release: {'sha'",
    ),
    (
        "grains rev 10 MB",
        "evil",
        grains(saltfleet_deployments={"fetcher": {"rev": BIG}}),
        mine(),
        "fetcher: rev: 10485760 characters",
    ),
    (
        "deployment name with a newline",
        "evil",
        grains(),
        {"saltfleet.heartbeat": "30", "deployment.status": {"fetcher\nevil 1 up": row()}},
        "is not a deployment name",
    ),
    (
        "public ips a string",
        "evil",
        grains(saltfleet_cloud={"provider": "ec2", "public_ips": "1.2.3.4"}),
        mine(),
        "saltfleet_cloud: public_ips: a string, not a list",
    ),
    ("ipv4 a dict", "evil", {**grains(), "saltfleet_cloud": {}, "ipv4": {"a": 1}}, mine(), "ipv4: a mapping"),
    ("id with a newline", "evil\nhost up local", grains(), mine(), "id: 'evil\\nhost up local' holds a line break"),
]


@pytest.fixture
def master_opts(master_opts):
    """A master whose pillar assigns deployment fetcher to every minion."""
    pillar = Path(master_opts["pillar_roots"]["base"][0])
    (pillar / "top.sls").write_text("base:\n  '*':\n    - fetcher\n")
    (pillar / "fetcher.sls").write_text(
        "deployments:\n  fetcher:\n    repo: https://example.invalid/app.git\n    min_consumers:\n      q: 0\n"
    )
    return master_opts


class Minions:
    """
    A stand-in LocalClient (``get_local_client``): each minion answers a job
    with ``answer(minion, fun)``, stored in the master's job cache as the
    master stores a minion's own return, and seen as its return event.
    ``forged``: return events under those ids that no minion returned;
    ``silent``: hosts that never return (and keep saying they run the job).
    """

    def __init__(self, answer, forged=None, silent=()):
        self.answer, self.forged, self.silent = answer, forged or {}, set(silent)
        self.jobs, self.kwargs, self.opts = [], [], None

    def __call__(self, *args, mopts=None, **kwargs):
        self.opts = mopts
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def run_job(self, tgt, fun, arg=(), kwarg=None, **kwargs):
        self.jobs.append((list(tgt), fun, list(arg)))
        self.kwargs.append(kwarg or {})
        return {"jid": f"2026010100000000{len(self.jobs):04d}", "minions": list(tgt)}

    def cmd_iter(self, tgt, fun, arg=(), yield_pub_data=False, **kwargs):
        """Salt's blocking iteration: the job, then each return as it comes."""
        pub = self.run_job(tgt, fun, arg)
        if yield_pub_data:
            yield pub
        yield from filter(None, self.get_iter_returns(pub["jid"], pub["minions"]))

    def get_iter_returns(self, jid, minions, **kwargs):
        fun = self.jobs[-1][1]
        store = salt.loader.returners(self.opts, {})["local_cache.returner"]
        for minion, ret in self.forged.items():
            yield {minion: {"ret": ret, "retcode": 0}}
        for minion in minions:
            if minion not in self.silent and minion not in self.forged:
                ret = self.answer(minion, fun)
                store({"jid": jid, "id": minion, "fun": fun, "return": ret, "retcode": 0})
                yield {minion: {"ret": ret, "retcode": 0}}
        while self.silent:
            yield None


class Bus:
    """salt-run's job event (``__jid_event__``): progress lines are kept, not fired."""

    def __init__(self):
        self.base = "salt/run/20260101000000000001"
        self.event = self
        self.fired = []

    def fire_event(self, data, tag=None):
        self.fired.append((tag, data))
        return True


def releases(minion, fun):
    kept = [
        {"release": OLD, "complete": True, "serving": False, "deployed": "2026-01-01T00:00:00Z"},
        {"release": NEW, "complete": True, "serving": True, "deployed": "2026-01-02T00:00:00Z"},
    ]
    return kept


def answers(hostile_status):
    def answer(minion, fun):
        if fun == "deployment.status":
            return {"fetcher": row()} if minion == GOOD else hostile_status
        if fun == "deployment.releases":
            return releases(minion, fun)
        if fun == "state.single":
            key = "deployment_|-fetcher_|-fetcher_|-present"
            return {key: {"result": None, "comment": "would switch", "changes": {"release": {"old": NEW}}}}
        return {"result": True, "release": NEW}

    return answer


@pytest.fixture(params=CASES, ids=[case[0] for case in CASES])
def fleet_with_one_hostile_host(request, master_opts, monkeypatch):
    _, evil, evil_grains, evil_mine, why = request.param
    add_minion(master_opts, GOOD, grains(), mine(), age=1)
    add_minion(master_opts, evil, evil_grains, evil_mine, age=1)
    hostile = evil_mine.get("deployment.status") if isinstance(evil_mine, dict) else evil_mine
    minions = Minions(answers(hostile))
    monkeypatch.setattr(salt.client, "get_local_client", minions)
    runners = fleet(master_opts)
    runners["fleet.deploy"].__globals__.update(__jid_event__=Bus(), __context__={})
    return runners, evil, why


def bad_row(rows, evil, why):
    [row_] = [r for r in rows if r["id"] == evil]
    assert row_["status"] == "bad data", row_
    assert any(why in problem for problem in row_["bad_data"]), row_["bad_data"]
    return row_


def good_row(rows):
    [row_] = [r for r in rows if r["id"] == GOOD]
    assert row_["status"] == "up" and "bad_data" not in row_, row_
    assert row_["deployments"]["fetcher"]["release"] == NEW
    assert row_["deployments"]["fetcher"]["running"] == 1
    return row_


def test_inventory(fleet_with_one_hostile_host):
    runners, evil, why = fleet_with_one_hostile_host
    rows = runners["fleet.inventory"]()
    good_row(rows)
    bad_row(rows, evil, why)
    assert rows == runners["fleet.inventory_rows"]()


def test_inventory_as_a_table(fleet_with_one_hostile_host):
    runners, evil, why = fleet_with_one_hostile_host
    runners["fleet.inventory"].__globals__["__opts__"]["output"] = None
    table = runners["fleet.inventory"]()
    lines = table.splitlines()
    [good] = [line for line in lines if line.startswith(GOOD)]
    assert good.split()[:2] == [GOOD, "up"]
    # The hostile host: its own line, marked, and what was wrong beneath it; no line of its text stands alone.
    [evil_line] = [i for i, line in enumerate(lines) if line.startswith(repr(evil)[1:-1])]
    assert "  bad data  " in lines[evil_line], lines
    shown = why.encode("unicode_escape").decode()
    assert [line for line in lines if line.startswith("  bad data: ") and shown in line], table
    assert len(table) < 100_000
    assert lines[-1] == "2 minions, 1 up, 0 down, 1 bad data"


def test_queues(fleet_with_one_hostile_host):
    runners, evil, why = fleet_with_one_hostile_host
    report = runners["fleet.queues"]()
    [good] = [c for c in report["queues"]["q"]["consumers"] if c["minion"] == GOOD]
    assert good["status"] == "up"
    # Only what was read whole counts: the hostile host's workers are never counted as up.
    assert all(c["status"] != "up" for c in report["queues"]["q"]["consumers"] if c["minion"] == evil)
    assert report["queues"]["q"]["up"] == 1
    [bad] = [b for b in report["bad data"] if b["minion"] == evil]
    assert any(why in problem for problem in bad["problems"])
    runners["fleet.queues"].__globals__["__opts__"]["output"] = None
    assert "bad data" in runners["fleet.queues"]()


def test_ansible_inventory(fleet_with_one_hostile_host):
    runners, evil, why = fleet_with_one_hostile_host
    inventory = runners["fleet.ansible_inventory"](grains=True)
    assert inventory["_meta"]["hostvars"][GOOD]["saltfleet_deployments"]["fetcher"]["release"] == NEW
    assert inventory["_meta"]["hostvars"][evil]["salt_status"] == "bad data"
    assert any(why in p for p in inventory["_meta"]["hostvars"][evil]["salt_bad_data"])
    assert evil in inventory["salt_bad_data"]["hosts"]
    assert GOOD in inventory["deployment_fetcher"]["hosts"]
    runners["fleet.ansible_inventory"].__globals__["__opts__"]["output"] = None
    assert evil in json.loads(runners["fleet.ansible_inventory"]())["_meta"]["hostvars"]


def test_status(fleet_with_one_hostile_host):
    runners, evil, _ = fleet_with_one_hostile_host
    report = runners["fleet.status"]("fetcher")
    assert f"fetcher {row()['release'][:12]} {row()['summary']}" in report["up"][GOOD]
    assert GOOD not in report.get("errors", {})
    # The hostile host answers what its mine holds: a bad answer is its error, a bad row named as bad data.
    said = report.get("errors", {}).get(evil, "")
    assert evil in report["up"] or said, report
    assert not isinstance(report["up"].get(evil), str)


def test_overview(fleet_with_one_hostile_host):
    runners, evil, why = fleet_with_one_hostile_host
    view = runners["fleet.overview"]()
    bad_row(view["hosts"], evil, why)
    good_row(view["hosts"])
    assert view["deployments"]["fetcher"]["hosts"][GOOD]["release"] == NEW
    [good] = [c for c in view["queues"]["queues"]["q"]["consumers"] if c["minion"] == GOOD]
    assert good["status"] == "up"


def test_a_deploy_plan_counts_consumers(fleet_with_one_hostile_host):
    runners, _, _ = fleet_with_one_hostile_host
    report = runners["fleet.deploy"]("fetcher", rev="v2", test=True)
    assert "error" not in report, report
    assert report["hosts"][GOOD]["outcome"] == "would change"


def test_rollback(fleet_with_one_hostile_host):
    runners, _, _ = fleet_with_one_hostile_host
    report = runners["fleet.rollback"]("fetcher", test=True)
    assert "error" not in report, report
    assert report["release"] == OLD


def test_a_minion_that_sent_a_syndic_return_is_no_syndic_unless_this_is_a_master_of_masters(master_opts, monkeypatch):
    """Salt registers any minion that sends a syndic return; only a master of masters asks its syndics."""
    add_minion(master_opts, GOOD, grains(), mine(), age=1)
    registered = Path(master_opts["cachedir"]) / "syndics"
    registered.mkdir(parents=True, exist_ok=True)
    (registered / GOOD).write_text("")

    def asked(*args, **kwargs):
        raise AssertionError("fleet.inventory asked a minion for inventory rows")

    monkeypatch.setattr(salt.client, "get_local_client", asked)
    runners = fleet(master_opts)
    assert [r["id"] for r in runners["fleet.inventory"]()] == [GOOD]
    assert [r["id"] for r in runners["fleet.overview"]()["hosts"]] == [GOOD]


def test_a_syndics_rows_are_checked_field_by_field_on_a_master_of_masters(master_opts, monkeypatch):
    """A registered syndic answers for the minions below it: each row it gives is read as a minion's own data."""
    master_opts["order_masters"] = True
    add_minion(master_opts, "syn", grains(), mine(), age=1)
    registered = Path(master_opts["cachedir"]) / "syndics"
    registered.mkdir(parents=True, exist_ok=True)
    (registered / "syn").write_text("")
    good = {
        "id": "below-1",
        "status": "up",
        "last_seen": "2026-12-06T10:00:00Z",
        "provider": "ec2",
        "public_ips": ["192.0.2.1"],
        "deployments": {"fetcher": {"rev": "main", "release": NEW, "running": 1, "programs": 1}},
    }
    hostile = [
        {**good, "id": "below-2\nroot"},
        {**good, "id": "below-3", "deployments": ["fetcher"]},
        {**good, "id": "below-4", "deployments": {"fetcher": {"release": "inf", "running": float("inf")}}},
        {**good, "id": "below-5", "status": "<b>up</b>"},
        "not a row",
    ]
    minions = Minions(lambda minion, fun: [good, *hostile])
    monkeypatch.setattr(salt.client, "get_local_client", minions)
    rows = fleet(master_opts)["fleet.inventory"]()
    by_id = {row["id"]: row for row in rows}
    assert by_id["below-1"]["syndic"] == "syn" and by_id["below-1"]["status"] == "up", rows
    bad = [row for row in rows if row["status"] == "bad data"]
    assert len(bad) == len(hostile), rows
    assert all(row["id"].startswith("syn#") and row["bad_data"] for row in bad), bad
    assert "below-2\nroot" not in by_id
