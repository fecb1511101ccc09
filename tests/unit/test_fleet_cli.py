"""
What an operator reads from the fleet runner, from a master's cache through
Salt's own runner loader (no daemons): a rollout's progress one line a step,
a typo that exits 1 and says so, refusals in the deploy ledger, a pinned rev
that reads as one, Ansible's host variables without every grain, and numbers
that agree with their nouns.
"""

import json
import re

import pytest
import salt.cache
import salt.config
import salt.loader

from localfleet.config import saltfleet_utils
from tests.unit.test_inventory import add_minion, assign, cloud, load_runner, status

rollout = saltfleet_utils().saltfleet_rollout
fleet_hosts = saltfleet_utils().saltfleet_hosts
SHA = "d94214361ad8489b99e0e59c663484d25b287454"


def fleet(opts):
    """The fleet runner as salt-run loads it, with the globals Salt's runner client gives a job."""
    runners = salt.loader.runner(opts, utils=salt.loader.utils(opts))
    runners["fleet.deploy"].__globals__.update(__jid__="20260101000000000001", __user__="operator")
    return runners


def with_pillar(opts, minion, deployments):
    """The pillar the master last compiled for ``minion``, naming ``deployments``."""
    salt.cache.factory(opts).store("pillar", minion, {"deployments": {d: {"repo": "x"} for d in deployments}})


# ------------------------------------------------------------------ progress


def test_a_progress_step_prints_as_one_line_with_its_time(master_opts):
    printer = salt.loader.outputters(master_opts)["fleet_progress"]
    event = {
        "message": "sample-fetcher: demo-worker-1: deployed: 91148e2f81ba",
        "level": "ok",
        "_stamp": "2026-12-06T05:42:07.902499+00:00",
    }
    text = printer({"suffix": "progress", "event": event})
    assert re.fullmatch(r"\d\d:\d\d:07\.902499  sample-fetcher: demo-worker-1: deployed: 91148e2f81ba", text), text
    # A message with line breaks stays one line.
    assert "\n" not in printer({"suffix": "progress", "event": {**event, "message": "a\nb"}})


def test_the_progress_outputter_prints_anything_else_as_nested(master_opts):
    printer = salt.loader.outputters(master_opts)["fleet_progress"]
    assert printer({"summary": "complete"}) == salt.loader.outputters(master_opts)["nested"]({"summary": "complete"})


# ------------------------------------------------------- a typo exits 1, says why


def test_fleet_status_of_a_deployment_pillar_names_nowhere_exits_1_naming_the_known_ones(master_opts):
    add_minion(master_opts, "w1", cloud(), {"deployment.status": {"sample-fetcher": status(1, 1)}})
    with_pillar(master_opts, "w1", ["sample-fetcher"])
    report = fleet(master_opts)["fleet.status"]("sample-fetchr")
    assert report["retcode"] == 1
    assert "no minion's pillar names deployment 'sample-fetchr'; pillar names sample-fetcher" in report["error"]


def test_fleet_status_of_a_deployment_pillar_assigns_but_no_host_runs_yet_says_where_to_apply(master_opts):
    add_minion(master_opts, "w1", cloud(), {"deployment.status": {}})
    with_pillar(master_opts, "w1", ["reporter"])
    report = fleet(master_opts)["fleet.status"]("reporter")
    assert report["retcode"] == 1
    assert "pillar assigns it to w1, and none of them has reported it yet (`salt -L w1 state.apply`" in report["error"]


def test_fleet_status_of_a_target_that_matches_no_host_exits_1(master_opts):
    add_minion(master_opts, "w1", cloud(), {"deployment.status": {"sample-fetcher": status(1, 1)}})
    report = fleet(master_opts)["fleet.status"](tgt="demo-wroker-*")
    assert report["retcode"] == 1
    assert "no minion matching 'demo-wroker-*' (glob) hosts a deployment" in report["error"]


@pytest.mark.parametrize(
    ("filters", "why"),
    [
        ({"deployment": "typo"}, "no minion's pillar names deployment 'typo'; pillar names sample-fetcher"),
        ({"tgt": "nosuch-*"}, "no accepted minion matches tgt='nosuch-*'"),
        ({"provider": "ec3"}, "runs on provider 'ec3' (providers of those minions: local)"),
    ],
)
def test_fleet_inventory_filtered_to_nothing_exits_1_saying_why(master_opts, filters, why):
    add_minion(master_opts, "w1", cloud(), {"deployment.status": {"sample-fetcher": status(1, 1)}})
    with_pillar(master_opts, "w1", ["sample-fetcher"])
    for output in ("json", None):
        master_opts["output"] = output
        report = fleet(master_opts)["fleet.inventory"](**filters)
        assert report["retcode"] == 1, report
        assert why in report["error"]


# ------------------------------------------------------- refusals in the ledger


def test_a_rollout_refused_because_no_host_matched_is_in_the_ledger(master_opts):
    add_minion(master_opts, "w1", cloud(), {"deployment.status": {"sample-fetcher": status(1, 1)}})
    assign(master_opts, {"w1": {"sample-fetcher": {}}})
    runners = fleet(master_opts)
    report = runners["fleet.deploy"]("sample-fetcher", rev="v2", tgt="nosuch-*")
    assert report["retcode"] == 1
    [entry] = runners["fleet.history"]("sample-fetcher")
    assert (entry["what"], entry["who"], entry["rev"], entry["jid"]) == (
        "fleet.deploy",
        "operator",
        "v2",
        "20260101000000000001",
    )
    assert entry["outcome"].startswith("refused: fleet.deploy sample-fetcher: no minion matching 'nosuch-*'")


def test_a_rollback_refused_and_a_deploy_without_a_rev_are_in_the_ledger_too(master_opts):
    runners = fleet(master_opts)
    assert runners["fleet.rollback"]("sample-fetcher")["retcode"] == 1
    runners["fleet.deploy"].__globals__["__jid__"] = "20260101000000000002"  # each salt-run is a job of its own
    assert runners["fleet.deploy"]("sample-fetcher")["retcode"] == 1
    assert [(e["what"], e["outcome"][:8]) for e in runners["fleet.history"]()] == [
        ("fleet.rollback", "refused:"),
        ("fleet.deploy", "refused:"),
    ]
    # A dry run is no rollout: nothing is recorded.
    assert runners["fleet.deploy"]("sample-fetcher", rev="v2", test=True)["retcode"] == 1
    assert len(runners["fleet.history"]()) == 2


# ------------------------------------------------------------ pins and wording


def test_a_pinned_release_reads_as_a_pin_in_the_inventory(master_opts):
    master_opts["output"] = None
    pin = {"rev": SHA, "by": "deployment.rollback", "at": "2026-12-06T05:42:07Z"}
    rolled_back = {**status(2, 2, release=SHA), "rev": SHA, "pinned": pin}
    pinned_branch = {**status(1, 1, release="b" * 40), "rev": "v2", "pinned": {**pin, "rev": "v2"}}
    add_minion(master_opts, "w1", cloud(), {"saltfleet.heartbeat": 30, "deployment.status": {"f": rolled_back}})
    add_minion(master_opts, "w2", cloud(), {"saltfleet.heartbeat": 30, "deployment.status": {"g": pinned_branch}})
    lines = load_runner(master_opts).inventory().splitlines()
    assert lines[1].endswith("f d9421436 (pinned) 2/2 RUNNING"), lines[1]
    assert lines[2].endswith("g v2@bbbbbbbb (pinned) 1/1 RUNNING"), lines[2]
    assert lines[-1] == "2 minions, 2 up, 0 down"


def test_numbers_agree_with_their_nouns(master_opts):
    add_minion(master_opts, "w1", cloud(), {"saltfleet.heartbeat": 30})
    master_opts["output"] = None
    assert load_runner(master_opts).inventory().splitlines()[-1] == "1 minion, 1 up, 0 down"
    hosts = {"h1": {"outcome": "deployed", "release": SHA}}
    assert rollout.report("app", "v2", [["h1"]], hosts, None)["summary"] == "complete: 1 host in 1 batch on v2"
    assert fleet_hosts.status_report("app", ["h1"], {})["summary"].startswith("1 host, 1 not answering")
    assert [rollout.count(n, "batch") for n in (1, 2)] == ["1 batch", "2 batches"]


# ------------------------------------------------------------------- Ansible


def test_ansible_host_variables_carry_what_an_inventory_needs_and_grains_on_request(master_opts):
    grains = {**cloud("ec2", "eu-west-1", "t3.small", "3.3.3.3"), "os": "Debian", "cpu_flags": ["fpu"] * 100}
    add_minion(master_opts, "w1", grains, {"saltfleet.heartbeat": 30, "deployment.status": {"f": status(1, 1)}})
    runner = fleet(master_opts)["fleet.ansible_inventory"]
    w1 = runner()["_meta"]["hostvars"]["w1"]
    assert "salt_grains" not in w1
    assert w1["saltfleet_cloud"]["region"] == "eu-west-1"
    assert w1["saltfleet_deployments"] == {
        "f": {"rev": "main", "release": "a" * 40, "running": 1, "programs": 1, "supervisord": "running"}
    }
    assert len(json.dumps(w1)) < 1000
    assert runner(grains="os")["_meta"]["hostvars"]["w1"]["salt_grains"] == {"os": "Debian"}
    assert runner(grains=True)["_meta"]["hostvars"]["w1"]["salt_grains"]["cpu_flags"] == ["fpu"] * 100
    assert runner(grains=5)["retcode"] == 1
