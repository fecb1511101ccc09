"""
What fleet.deploy, fleet.rollback and fleet.status decide from what the hosts
return: batches, each host's outcome, the report and its retcode, the release
a rollback goes to, the fleet's status; and which minions host a deployment,
from a master's cache. No daemons.
"""

import os
from pathlib import Path

import pytest
import salt.cache
import salt.config

from localfleet.config import saltfleet_utils
from tests.unit.test_inventory import assign

rollout = saltfleet_utils().saltfleet_rollout
fleet_hosts = saltfleet_utils().saltfleet_hosts
OLD, NEW, NEWER = "a" * 40, "b" * 40, "c" * 40


@pytest.mark.parametrize(
    ("size", "count", "expected"),
    [
        (1, 3, [[0], [1], [2]]),
        ("2", 5, [[0, 1], [2, 3], [4]]),
        ("20%", 10, [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]),
        ("34%", 3, [[0, 1], [2]]),
        ("10%", 3, [[0], [1], [2]]),  # never a batch of none
        ("100%", 3, [[0, 1, 2]]),
    ],
)
def test_batches(size, count, expected):
    assert rollout.batches(range(count), size) == expected


@pytest.mark.parametrize("size", [0, "-1", "abc", "0%", "150%", ""])
def test_a_batch_size_that_means_nothing_is_refused_with_the_forms_that_do(size):
    with pytest.raises(ValueError, match=r"batch=2\) or a share of them \(batch=20%\)"):
        rollout.batches(range(3), size)


def test_outcomes_of_update_code_returns():
    deployed = {"ret": {"result": True, "changes": {}, "comment": "ok", "release": NEW}, "retcode": 0}
    assert rollout.outcome(deployed) == {"outcome": "deployed", "release": NEW}
    failed = {"ret": {"result": False, "comment": "uv: no such package", "release": OLD}, "retcode": 1}
    assert rollout.outcome(failed) == {"outcome": "failed", "reason": "uv: no such package", "release": OLD}
    error = {"ret": "ERROR: deployment app is not installed on this host", "retcode": 1}
    assert rollout.outcome(error) == {"outcome": "failed", "reason": "deployment app is not installed on this host"}
    # A return claiming success with a failing retcode is no success.
    assert rollout.outcome({"ret": {"result": True, "release": NEW}, "retcode": 1})["outcome"] == "failed"
    assert rollout.outcome(None) == {"outcome": "no answer"}
    assert len(rollout.outcome({"ret": "x" * 5000, "retcode": 1})["reason"]) == 2000


def test_dry_run_outcomes():
    key = "deployment_|-app_|-app_|-present"
    change = {key: {"result": None, "comment": "release would be switched", "changes": {"release": {"old": OLD}}}}
    assert rollout.dry_outcome({"ret": change})["outcome"] == "would change"
    assert rollout.dry_outcome({"ret": change})["release"] == {"old": OLD}
    assert (
        rollout.dry_outcome({"ret": {key: {"result": True, "comment": "at", "changes": {}}}})["outcome"] == "no change"
    )
    bad = rollout.dry_outcome({"ret": {key: {"result": False, "comment": "rev not found", "changes": {}}}})
    assert bad == {"outcome": "failed", "reason": "rev not found"}
    busy = rollout.dry_outcome({"ret": ["The function state.single is running as PID 7"]})
    assert busy["outcome"] == "failed" and "PID 7" in busy["reason"]


def test_a_stopped_rollout_reports_who_is_on_the_new_rev_who_failed_and_who_was_never_touched():
    hosts = {
        "h1": {"outcome": "deployed", "release": NEW},
        "h2": {"outcome": "failed", "reason": "no such package", "release": OLD},
        "h3": {"outcome": "not touched", "release": OLD},
        "h4": {"outcome": "not touched", "release": OLD},
    }
    plan = [["h1"], ["h2"], ["h3"], ["h4"]]
    report = rollout.report("app", "v2", plan, hosts, "batch 2 of 4 failed (h2: failed)")
    assert report["outcome"] == "stopped" and report["retcode"] == 1
    assert report["deployed"] == {"h1": NEW}
    assert report["failed"] == {"h2": {"reason": "no such package", "still serves": OLD}}
    assert report["not touched"] == {"h3": OLD, "h4": OLD}
    assert report["no answer"] == []
    assert report["summary"] == "stopped: batch 2 of 4 failed (h2: failed); 1 of 4 hosts on v2"


def test_a_complete_rollout_exits_zero_and_says_when_the_rev_moved_meanwhile():
    hosts = {"h1": {"outcome": "deployed", "release": NEW}, "h2": {"outcome": "deployed", "release": NEW}}
    report = rollout.report("app", "main", [["h1", "h2"]], hosts, None)
    assert (report["outcome"], report["retcode"]) == ("complete", 0)
    assert report["summary"] == "complete: 2 hosts in 1 batch on main"
    hosts["h2"]["release"] = NEWER
    assert "main resolved to 2 commits" in rollout.report("app", "main", [["h1"], ["h2"]], hosts, None)["summary"]


def releases(*rows):
    return [
        {"release": sha, "complete": complete, "serving": serving, "deployed": at}
        for sha, complete, serving, at in rows
    ]


def test_rollback_goes_to_the_newest_release_complete_everywhere_other_than_the_one_serving():
    every = releases((OLD, True, False, "2024-01-01T00:00:00Z"), (NEW, True, True, "2024-02-01T00:00:00Z"))
    assert rollout.choose_release("app", {"h1": every, "h2": every}) == OLD


def test_after_a_stopped_rollout_rollback_goes_to_what_the_untouched_hosts_serve():
    h1 = releases(
        (OLD, True, False, "2024-01-01T00:00:00Z"),
        (NEW, True, False, "2024-02-01T00:00:00Z"),
        (NEWER, True, True, "2024-03-01T00:00:00Z"),
    )
    h2 = releases(
        (OLD, True, False, "2024-01-01T00:00:00Z"),
        (NEW, True, True, "2024-02-01T00:00:00Z"),
        (NEWER, False, False, "2024-03-01T00:00:00Z"),  # its build failed: it never served
    )
    h3 = releases((OLD, True, False, "2024-01-01T00:00:00Z"), (NEW, True, True, "2024-02-01T00:00:00Z"))
    assert rollout.choose_release("app", {"h1": h1, "h2": h2, "h3": h3}) == NEW
    assert rollout.choose_release("app", {"h1": h1, "h2": h2, "h3": h3}, requested="aaaa") == OLD
    with pytest.raises(ValueError, match=r"'cccc' names 0 of the releases complete on every host"):
        rollout.choose_release("app", {"h1": h1, "h2": h2}, requested="cccc")


def test_rollback_without_an_older_release_everywhere_says_what_to_do():
    only = releases((NEW, True, True, "2024-02-01T00:00:00Z"))
    with pytest.raises(ValueError, match="no release other than the serving bbbbbbbbbbbb is kept complete"):
        rollout.choose_release("app", {"h1": only})


def status_row(programs, held=None, supervisord="running"):
    return {"supervisord": supervisord, "programs": programs, "held": held or {}, "summary": "up: ..."}


def test_fleet_status_names_programs_down_and_held_and_hosts_that_do_not_answer():
    returns = {
        "h1": {"ret": {"app": status_row({"w:0": "STOPPED", "beat": "RUNNING"}, held={"w": {"reason": "db work"}})}},
        "h2": {"ret": {"app": status_row({"w:0": "FATAL", "beat": "RUNNING"})}},
        "h3": {"ret": {"app": status_row({}, supervisord="stopped")}},
        "h4": {"ret": {"app": status_row({"w:0": "RUNNING"})}},
    }
    for row in returns.values():
        for status in row["ret"].values():
            status["held"] = {k: v["reason"] for k, v in status["held"].items()}
    report = fleet_hosts.status_report("app", ["h1", "h2", "h3", "h4", "h5"], returns)
    assert report["down"] == {"h2": {"app": ["w:0 FATAL"]}, "h3": {"app": ["supervisord stopped"]}}
    assert report["held"] == {"h1": {"app": {"w": "db work"}}}
    assert report["not answering"] == ["h5"]
    assert sorted(report["up"]) == ["h1", "h4"]
    assert report["retcode"] == 1
    assert report["summary"] == "5 hosts, 2 with programs down, 1 with programs held, 1 not answering"


def test_fleet_status_is_zero_when_only_held_programs_are_stopped():
    returns = {"h1": {"ret": {"app": status_row({"w:0": "STOPPED"}, held={"*": "maintenance"})}}}
    report = fleet_hosts.status_report(None, ["h1"], returns)
    assert report["retcode"] == 0
    assert report["held"] == {"h1": {"app": {"all programs": "maintenance"}}}


def test_hook_commands_are_argv_lists_never_shell_lines():
    assert rollout.commands("python manage.py migrate --noinput", "pre") == [
        ["python", "manage.py", "migrate", "--noinput"]
    ]
    assert rollout.commands(["python -c 'print(1); print(2)'", ["sh", "-c", "x"]], "post") == [
        ["python", "-c", "print(1); print(2)"],
        ["sh", "-c", "x"],
    ]
    assert rollout.commands(None, "pre") == []
    with pytest.raises(ValueError, match="post: an empty command"):
        rollout.commands([""], "post")
    pillar = {"deployments": {"app": {"hooks": {"post": "python manage.py migrate"}}}}
    assert rollout.hooks_in_pillar(pillar, "app") == {"pre": [], "post": [["python", "manage.py", "migrate"]]}
    assert rollout.hooks_in_pillar({}, "app") == {"pre": [], "post": []}


def remember(opts, minion_id, grains=None, mine=None):
    Path(opts["pki_dir"], "minions", minion_id).write_text("-----BEGIN PUBLIC KEY-----\nx\n-----END PUBLIC KEY-----\n")
    cache = salt.cache.factory(opts)
    if grains is not None:
        cache.store("grains", minion_id, grains)
    if mine is not None:
        cache.store("mine", minion_id, mine)


def test_the_hosts_of_a_deployment_are_those_the_master_heard_run_it(master_opts):
    remember(master_opts, "w1", {"saltfleet_deployments": {"app": {"release": OLD}}})
    # Its grains are older than its mine, which a deploy refreshes at once.
    remember(
        master_opts,
        "w2",
        {"saltfleet_deployments": {"app": {"release": OLD}}},
        {"deployment.status": {"app": {"release": NEW}, "other": {"release": OLD}}},
    )
    remember(master_opts, "w3", {"saltfleet_deployments": {"other": {"release": OLD}}})
    remember(master_opts, "x1", {"saltfleet_deployments": {"app": {"release": OLD}}})
    assign(master_opts, {"w*": {"app": {}, "other": {}}, "x1": {"app": {}}})
    os.makedirs(master_opts["cachedir"], exist_ok=True)
    assert fleet_hosts.hosts_of(master_opts, "app") == {"w1": OLD, "w2": NEW, "x1": OLD}
    assert fleet_hosts.hosts_of(master_opts, "app", "w*") == {"w1": OLD, "w2": NEW}
    assert fleet_hosts.hosts_of(master_opts, "app", "w1,x1", "list") == {"w1": OLD, "x1": OLD}
    assert fleet_hosts.hosts_of(master_opts, "nowhere") == {}
    assert fleet_hosts.deployments_of(master_opts, "w*") == {"w1": ["app"], "w2": ["app", "other"], "w3": ["other"]}


# min_consumers: four hosts, two Celery workers each on queue q (8 consumers up), one on r on h4.
CONSUMERS = {"h1": {"q": 2}, "h2": {"q": 2}, "h3": {"q": 2}, "h4": {"q": 2, "r": 1}, "elsewhere": {"q": 1}}
HOSTS = ["h1", "h2", "h3", "h4"]


def test_without_a_floor_the_batches_stand():
    plan = rollout.batches(HOSTS, 2)
    assert rollout.within_floor(plan, CONSUMERS, {}) == (plan, [])


@pytest.mark.parametrize(
    ("floors", "expected"),
    [
        # 9 consumers, two hosts out leave 5: a floor of 5 holds; 6 does not, so one host a batch.
        ({"q": 5}, [["h1", "h2"], ["h3", "h4"]]),
        ({"q": 6}, [["h1"], ["h2"], ["h3"], ["h4"]]),
        # A floor on a queue none of the batch consumes holds nothing back.
        ({"q": 5, "other": 3}, [["h1", "h2"], ["h3", "h4"]]),
    ],
)
def test_a_batch_that_would_leave_a_queue_below_its_floor_is_cut_short(floors, expected):
    plan, held = rollout.within_floor(rollout.batches(HOSTS, 2), CONSUMERS, floors)
    assert plan == expected
    if expected != [["h1", "h2"], ["h3", "h4"]]:
        assert held[0] == {"batch": 1, "queue": "q", "floor": 6, "consumers": 9}
        assert [row["batch"] for row in held] == [1, 2, 3]
    else:
        assert held == []


def test_cut_short_batches_fill_up_again_once_the_queue_allows():
    # r has one consumer and a floor of 0; q's floor lets three hosts out at once.
    plan, held = rollout.within_floor([HOSTS], CONSUMERS, {"q": 3, "r": 0})
    assert plan == [["h1", "h2", "h3"], ["h4"]]
    assert held == [{"batch": 1, "queue": "q", "floor": 3, "consumers": 9}]


def test_a_host_that_alone_would_leave_a_queue_below_its_floor_is_refused_naming_the_queue():
    # h4 holds r's only consumer: no batch can take it out with a floor of 1.
    with pytest.raises(ValueError, match=r"queue r has 1 consumers up and a floor of 1 .*h4 consumes it with 1"):
        rollout.within_floor(rollout.batches(HOSTS, 1), CONSUMERS, {"r": 1})
