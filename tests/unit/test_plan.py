"""
The plan of a deployment's apply (_utils/saltfleet_plan.py) from facts alone:
what changes, which generation serves, which handover runs, what retention
prunes, and the comment; no daemon, no git, no root.
"""

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from salt.exceptions import CommandExecutionError

from tests.support.loaded import module, utils

plan_ = utils.saltfleet_plan
kinds = module("saltfleet_plan")  # its dataclasses: Context, OnHost, Asked
A, B, C = "a" * 40, "b" * 40, "c" * 40
VENV, VENV2 = "1" * 16, "2" * 16


@pytest.fixture
def root():
    """A host root short enough for supervisord's socket paths."""
    path = Path(tempfile.mkdtemp(prefix="sfu-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def ctx(root, manifest=None, handover="overlap", env=None, fleet=None, pinned=None, rev="main", **spec):
    host, _ = utils.saltfleet_schema.validate_host({"root": str(root), "user": "nobody", "handover": handover})
    cfg, errors = utils.saltfleet_schema.validate_deployment(
        "app", {"repo": "/srv/app.git", "rev": rev, "env": env or {}, **spec}, host
    )
    assert errors == []
    return kinds.Context(
        name="app",
        cfg=cfg,
        settings=host,
        p=utils.saltfleet_paths.paths(str(root), "nobody", "app"),
        uid=65534,
        gid=65534,
        tools={"uv": "/usr/bin/uv", "supervisord": "/usr/bin/supervisord", "setpriv": "/usr/bin/setpriv"},
        manifest=manifest or {},
        pillar_rev=rev,
        pinned=pinned,
        fleet=fleet or {},
    )


SECTIONS = {"program:w": {"command": "python w.py"}}


def asked(sha=A, digest=VENV, built=True, **more):
    return kinds.Asked(
        sha=sha,
        digest=digest,
        sections=SECTIONS,
        sysfiles={},
        build_release=not built,
        build_venv=not built,
        **more,
    )


def serving(c, gen="1", sha=A, digest=VENV, **host):
    """The facts of a host serving ``sha`` with venv ``digest`` under generation ``gen``, as the plan rendered it."""
    p = c.p
    conf = utils.saltfleet_supervisor_conf.render(
        c.cfg,
        plan_.held_sections(SECTIONS, {}),
        p,
        gen,
        utils.saltfleet_paths.release(p, sha),
        utils.saltfleet_paths.venv(p, digest),
    )
    boot = utils.saltfleet_supervisor_conf.boot_script(c.cfg, c.tools, p, gen, c.uid, c.gid)
    env = utils.saltfleet_supervisor_conf.env_script(c.cfg)
    facts = {"serving": gen, "running": True, "serving_info": {"pid": 10, "start": 1}, "old_conf": conf}
    return kinds.OnHost(**{**facts, "old_boot": boot, "old_env": env, "taken": (gen,), **host})


def test_a_first_deploy_starts_supervisord_with_everything_built(root):
    c = ctx(root)
    plan = plan_.decide(c, kinds.OnHost(), asked(built=False))
    assert plan.action == "start" and plan.gen == "1"
    assert set(plan.changes) == {"release", "virtualenv", "supervisord"}
    assert plan.changes["release"] == {"old": None, "new": A}
    assert "Deployment app: release would be switched to aaaaaaaaaaaa (main); virtualenv would be built" in (
        plan_.describe(c, plan, dry=True)
    )


def test_nothing_to_do_is_a_no_op_and_says_what_serves(root):
    manifest = {"rev": "main", "release": A, "venv": VENV, "generation": "1"}
    c = ctx(root, manifest, fleet={"sha": A, "at": "2026-12-06T06:00:00Z"})
    plan = plan_.decide(c, serving(c), asked())
    assert plan.changes == {} and plan.action == "none" and plan.gen == "1"
    assert plan_.describe(c, plan, dry=False) == (
        "Deployment app is at aaaaaaaaaaaa (main, which the master resolved to aaaaaaaaaaaa "
        "at 2026-12-06T06:00:00Z) and running"
    )


def test_a_rev_that_names_the_serving_release_is_recorded_alone(root):
    """A pin dropped, or a rev naming the commit that serves: nothing builds or restarts, the rev is recorded."""
    manifest = {"rev": A, "release": A, "venv": VENV, "generation": "1"}
    c = ctx(root, manifest)
    plan = plan_.decide(c, serving(c), asked())
    assert plan.changes == {"rev": {"old": A, "new": "main"}} and plan.action == "record"
    assert "rev was recorded as main: it names aaaaaaaaaaaa, which serves already" in plan_.describe(c, plan, False)


@pytest.mark.parametrize(("handover", "gen", "restarted"), [("overlap", "2", ["w"]), ("stop-first", "1", ["w"])])
def test_a_new_release_is_handed_over_as_the_strategy_says(root, handover, gen, restarted):
    manifest = {"rev": "main", "release": A, "venv": VENV, "generation": "1", "history": [{"release": A, "venv": VENV}]}
    c = ctx(root, manifest, handover=handover)
    plan = plan_.decide(c, serving(c), asked(sha=B, built=False))
    assert plan.action == "handover" and plan.switch and plan.gen == gen
    assert plan.changes["release"] == {"old": A, "new": B}
    assert plan.changes["programs"] == {"restarted": restarted}
    # The new generation's Celery node names and log are its own.
    assert f"w.g{gen}.log" in plan.conf


def test_an_env_change_is_a_new_supervisord_naming_the_variables_never_their_values(root):
    manifest = {"rev": "main", "release": A, "venv": VENV, "generation": "1"}
    before = ctx(root, manifest, env={"TOKEN": "old-secret"})
    after = ctx(root, manifest, env={"TOKEN": "new-secret", "EXTRA": "x"}, handover="stop-first")
    plan = plan_.decide(after, serving(before), asked())
    assert plan.action == "renew" and plan.gen == "2"
    assert plan.changes["env"] == ["EXTRA", "TOKEN"]
    assert "secret" not in repr(plan.changes)


def test_a_config_change_alone_reconfigures_the_serving_supervisord(root):
    manifest = {"rev": "main", "release": A, "venv": VENV, "generation": "1"}
    c = ctx(root, manifest)
    host = serving(c)
    more = kinds.Asked(
        sha=A,
        digest=VENV,
        sections={**SECTIONS, "program:x": {"command": "python x.py"}},
        sysfiles={},
        build_release=False,
        build_venv=False,
    )
    plan = plan_.decide(c, host, more)
    assert plan.action == "reconfigure" and plan.gen == "1" and not plan.switch
    assert plan.changes["programs"] == {"added": ["x"]}


def test_an_idle_program_is_started_and_a_held_one_is_not(root):
    manifest = {"rev": "main", "release": A, "venv": VENV, "generation": "1", "operator": {"holds": {}}}
    c = ctx(root, manifest)
    plan = plan_.decide(c, serving(c, idle=("w",)), asked())
    assert plan.changes["programs"] == {"started": ["w"]}
    held = ctx(root, {**manifest, "operator": {"holds": {"w": {"reason": "db", "by": "x", "at": "t"}}}})
    plan = plan_.decide(held, serving(c), asked())
    assert plan.changes["programs"] == {"held": ["w"]}
    assert "w held: db" in plan_.describe(held, plan, dry=True)
    assert plan.sections["program:w"]["autostart"] == "false"


def test_retention_keeps_what_serves_and_drains_and_prunes_the_rest(root):
    history = [{"release": A, "venv": VENV}, {"release": B, "venv": VENV2}]
    manifest = {"rev": "main", "release": B, "venv": VENV2, "generation": "2", "history": history}
    c = ctx(root, manifest, keep_releases=1)
    for sha in (A, B, C):
        (c.p["releases"] / sha).mkdir(parents=True)
    for digest in (VENV, VENV2):
        (c.p["venvs"] / digest).mkdir(parents=True)
    # C comes in; B serves now and drains after the overlap switch; A neither serves nor drains.
    plan = plan_.decide(c, serving(c, gen="2", sha=B, digest=VENV2), asked(sha=C, digest=VENV2, built=False))
    assert plan.prune == (c.p["releases"] / A, c.p["venvs"] / VENV)
    assert [h["release"] for h in plan.history] == [B, C]
    # With stop-first nothing drains: B goes too.
    c = ctx(root, manifest, keep_releases=1, handover="stop-first")
    plan = plan_.decide(c, serving(c, gen="2", sha=B, digest=VENV2), asked(sha=C, digest=VENV2, built=False))
    assert c.p["releases"] / B in plan.prune and [h["release"] for h in plan.history] == [C]


def test_a_release_left_half_built_for_lack_of_room_goes_once_another_is_asked(root):
    manifest = {"rev": "main", "release": A, "venv": VENV, "generation": "1", "history": [{"release": A, "venv": VENV}]}
    c = ctx(root, manifest)
    for sha in (A, B, C):
        (c.p["releases"] / sha).mkdir(parents=True)
    (c.p["venvs"] / VENV).mkdir(parents=True)
    # B had no room; C failed otherwise (kept for inspection, so not among the facts).
    host = serving(c, unbuilt=(B,))
    plan = plan_.decide(c, host, asked())
    assert plan.prune == (c.p["releases"] / B,) and plan.changes == {"pruned": [str(c.p["releases"] / B)]}
    # Asked again, it is built anew where it is, not pruned.
    plan = plan_.decide(c, host, asked(sha=B, built=False))
    assert c.p["releases"] / B not in plan.prune


def test_an_interrupted_applys_generation_is_stopped(root):
    manifest = {"rev": "main", "release": A, "venv": VENV, "generation": "1"}
    c = ctx(root, manifest)
    host = serving(c, orphans={"2": {"pid": 77, "start": 5, "state": "RUNNING"}}, taken=("1", "2"))
    plan = plan_.decide(c, host, asked())
    assert plan.changes["generations"] == {"stopped": [77]} and plan.action == "record"


def test_build_steps_are_listed_and_a_release_that_failed_them_is_not_tried_again(root):
    c = ctx(root, build=["npm ci", ["python", "manage.py", "collectstatic"]])
    plan = plan_.decide(c, kinds.OnHost(), asked(built=False, build_steps=tuple(c.cfg["build"])))
    assert plan.changes["build"] == ["npm ci", "python manage.py collectstatic"]
    assert "2 build step(s) would be run: npm ci; python manage.py collectstatic" in plan_.describe(c, plan, True)
    failed = asked(built=False, build_steps=tuple(c.cfg["build"]), build_failed="`npm ci` exited 1")
    with pytest.raises(CommandExecutionError, match=r"^deployments:app:build: release aaaaaaaaaaaa failed its build"):
        plan_.decide(c, kinds.OnHost(), failed)


def test_a_failed_build_is_remembered_for_its_steps_only(root):
    c = ctx(root, build=["npm ci"])
    marker = utils.saltfleet_paths.markers(c.p["releases"] / A)["failed"]
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"reason": "`npm ci` exited 1", "build": plan_.build_digest(("npm ci",))}))
    assert plan_.asked(c, A, VENV, SECTIONS, {}).build_failed == "`npm ci` exited 1"
    other = ctx(root, build=["npm ci", "make"])
    assert plan_.asked(other, A, VENV, SECTIONS, {}).build_failed is None
    marker.write_text("[not what saltfleet writes")
    assert plan_.asked(c, A, VENV, SECTIONS, {}).build_failed is None


def test_a_free_generation_is_the_lowest_unused():
    assert plan_.free_generation(()) == "1"
    assert plan_.free_generation(("1", "3")) == "2"
    assert plan_.free_generation(("1", "2")) == "3"


def test_every_handover_pillar_may_name_is_a_strategy():
    assert utils.saltfleet_handover.names() == ("overlap", "stop-first")
    _, errors = utils.saltfleet_schema.validate_host({"handover": "blue-green"})
    assert errors == ["saltfleet:handover: must be overlap or stop-first, got 'blue-green'"]
