"""The operator verbs (`salt TARGET deployment.FUNC`) through the loaders: outcomes and clear errors."""

import json
import os
import threading

import pytest
from salt.exceptions import CommandExecutionError

from tests.conftest import wait_for
from tests.functional.conftest import report, tiny_app


@pytest.fixture
def deployed(host, tiny, out):
    host.apply(
        host.pillar(
            {"tiny": tiny_app(tiny, out, programs=["a", "b"], env={"TINYAPP_OUT": str(out), "TINYAPP_LINGER": "1"})}
        )
    )
    return host.loaders.modules.deployment


@pytest.mark.parametrize(
    ("call", "args"),
    [("restart", ["nosuch"]), ("stop", ["nosuch"]), ("status", ["nosuch"])],
)
def test_a_deployment_not_installed_is_an_error_that_says_so(host, call, args):
    host.set_pillar(host.pillar({}))
    with pytest.raises(
        CommandExecutionError, match=r"^deployment nosuch is not installed on this host; `salt \S+ deployment.list`"
    ):
        getattr(host.loaders.modules.deployment, call)(*args)


def test_status_lists_releases_and_programs(deployed, tiny):
    status = deployed.status()
    assert set(status) == {"tiny"}
    assert status["tiny"]["release"] == tiny["shas"]["v1"]
    assert status["tiny"]["programs"] == {"a": "RUNNING", "b": "RUNNING"}
    assert status["tiny"]["running"] == 2 and status["tiny"]["draining"] == []
    assert deployed.list() == ["tiny"]


def test_restart_is_graceful_and_can_name_one_program(deployed, out):
    before = {name: report(out, name)["pid"] for name in ("a", "b")}
    assert deployed.restart("tiny", "b") == {"restarted": ["b"]}
    assert report(out, "a")["pid"] == before["a"]
    assert report(out, "b")["pid"] != before["b"]
    # SIGTERM, and the program finished what it held (it lingers 1 s) before the new one started.
    assert (out / "b.stopped").read_text().split() == [str(before["b"])]
    assert (out / "b.json").stat().st_mtime >= (out / "b.stopped").stat().st_mtime
    assert deployed.restart("tiny") == {"restarted": ["a", "b"]}
    with pytest.raises(CommandExecutionError, match="deployment tiny has no program group 'c'; it has: a, b"):
        deployed.restart("tiny", "c")


def test_stop_stops_everything_and_the_next_apply_starts_it(deployed, host, tiny, out):
    pid = report(out)["pid"]
    assert deployed.stop("tiny") == {"stopped": ["a", "b"]}
    assert deployed.status("tiny")["tiny"]["supervisord"] == "stopped"
    assert (out / "a.stopped").read_text().split() == [str(pid)]
    with pytest.raises(CommandExecutionError, match="its supervisord is not running"):
        deployed.restart("tiny")
    states = host.apply(
        host.pillar(
            {"tiny": tiny_app(tiny, out, programs=["a", "b"], env={"TINYAPP_OUT": str(out), "TINYAPP_LINGER": "1"})}
        )
    )
    assert states["saltfleet-deployment-tiny"]["changes"] == {"supervisord": {"old": "stopped", "new": "running"}}
    assert report(out)["pid"] != pid


def test_stop_one_program_leaves_the_others_and_the_next_apply_starts_it(deployed, host, tiny, out):
    before = {name: report(out, name)["pid"] for name in ("a", "b")}
    assert deployed.stop("tiny", "b") == {"stopped": ["b"]}
    assert deployed.status("tiny")["tiny"]["programs"] == {"a": "RUNNING", "b": "STOPPED"}
    assert (out / "b.stopped").read_text().split() == [str(before["b"])]
    states = host.apply(
        host.pillar(
            {"tiny": tiny_app(tiny, out, programs=["a", "b"], env={"TINYAPP_OUT": str(out), "TINYAPP_LINGER": "1"})}
        )
    )
    assert states["saltfleet-deployment-tiny"]["changes"] == {"programs": {"started": ["b"]}}, states
    assert deployed.status("tiny")["tiny"]["programs"] == {"a": "RUNNING", "b": "RUNNING"}
    assert report(out, "a")["pid"] == before["a"]


def test_validate_reports_every_error(host):
    host.set_pillar({"saltfleet": {"uesr": "x"}, "deployments": {"a": {"rev": 1}}})
    errors = host.loaders.modules.deployment.validate()
    assert any(e.startswith("saltfleet:uesr: unknown key") for e in errors)
    assert any(e.startswith("deployments:a:repo: missing") for e in errors)


def test_an_operator_command_waits_for_a_state_apply_of_the_same_deployment(deployed, host, tiny, out):
    fault = host.root / "var" / "lib" / "saltfleet" / "faults" / "build"
    fault.parent.mkdir(parents=True)
    fault.write_text("wait")
    applied = {}
    deployment = tiny_app(
        tiny, out, rev="v2", programs=["a", "b"], env={"TINYAPP_OUT": str(out), "TINYAPP_LINGER": "1"}
    )

    def upgrade():
        applied.update(host.apply(host.pillar({"tiny": deployment})))

    def restart():
        restarted.update(host.loaders.modules.deployment.restart("tiny", "a"))

    restarted = {}
    upgrading = threading.Thread(target=upgrade)
    upgrading.start()
    release = host.paths("tiny")["releases"] / tiny["shas"]["v2"]
    wait_for((release / "app.py").exists, 60, "the upgrade's release checked out")
    restarting = threading.Thread(target=restart)
    restarting.start()
    # The apply holds the deployment (held at its build step): the restart waits for it, however long.
    restarting.join(5)
    assert restarting.is_alive() and not restarted, "the restart did not wait for the apply that held the deployment"
    fault.unlink()
    upgrading.join(120)
    restarting.join(120)
    assert applied["saltfleet-deployment-tiny"]["result"] is True
    assert restarted == {"restarted": ["a"]}
    # The restart came after the upgrade, on the new release: v2's a started twice (by the
    # upgrade, then by the restart), v2's b once; v1's a was never restarted.
    logs = host.paths("tiny")["logs"]
    started = {log.name: log.read_text().count(" started ") for log in logs.glob("[ab].g*.log")}
    assert started == {"a.g1.log": 1, "b.g1.log": 1, "a.g2.log": 2, "b.g2.log": 1}, started
    assert report(out, "a")["version"] == "2"


def env_app(tiny, out, rev="v1", **spec):
    return tiny_app(
        tiny,
        out,
        rev=rev,
        programs=["a", "b"],
        env={"TINYAPP_OUT": str(out), "TINYAPP_LINGER": "1", "API_TOKEN": "tok-8c1e55", "TINYAPP_SAY": "tok-8c1e55"},
        **spec,
    )


def test_update_code_deploys_a_rev_that_the_next_apply_keeps_and_says_so(host, tiny, out):
    pillar = host.pillar({"tiny": env_app(tiny, out)})
    host.apply(pillar)
    mod = host.loaders.modules.deployment
    result = mod.update_code("tiny", "v2")
    assert result["result"] is True, result
    assert result["release"] == tiny["shas"]["v2"]
    assert result["changes"]["release"] == {"old": tiny["shas"]["v1"], "new": tiny["shas"]["v2"]}
    assert report(out)["version"] == "2"
    kept = host.apply(pillar)["saltfleet-deployment-tiny"]
    assert kept["changes"] == {}
    assert "rev 'v2' set by deployment.update_code at" in kept["comment"] and "pillar says 'v1'" in kept["comment"]
    assert report(out)["version"] == "2"
    assert {k: v for k, v in mod.unpin("tiny").items() if k != "comment"} == {
        "rev": "v1",
        "pinned": False,
        "serving": tiny["shas"]["v2"],
    }
    back = host.apply(pillar)["saltfleet-deployment-tiny"]
    assert back["changes"]["release"]["new"] == tiny["shas"]["v1"]
    assert report(out)["version"] == "1"


def test_update_code_to_a_missing_rev_fails_and_pins_nothing(host, tiny, out):
    host.apply(host.pillar({"tiny": env_app(tiny, out)}))
    mod = host.loaders.modules.deployment
    result = mod.update_code("tiny", "no-such-branch")
    assert result["result"] is False and "'no-such-branch' not found" in result["comment"]
    again = host.apply(host.pillar({"tiny": env_app(tiny, out)}))["saltfleet-deployment-tiny"]
    assert again["changes"] == {} and "set by" not in again["comment"]
    with pytest.raises(CommandExecutionError, match="rev: '--upload-pack=x' is not a branch"):
        mod.update_code("tiny", "--upload-pack=x")


def test_releases_and_rollback(host, tiny, out):
    for rev in ("v1", "v2"):
        host.apply(host.pillar({"tiny": env_app(tiny, out, rev=rev)}))
    mod = host.loaders.modules.deployment
    kept = mod.releases("tiny")
    assert [(r["release"], r["complete"], r["serving"]) for r in kept] == [
        (tiny["shas"]["v1"], True, False),
        (tiny["shas"]["v2"], True, True),
    ]
    assert all(r["deployed"] for r in kept)
    result = mod.rollback("tiny")
    assert result["result"] is True and result["release"] == tiny["shas"]["v1"]
    assert report(out)["version"] == "1"
    assert mod.rollback("tiny", tiny["shas"]["v2"][:10])["release"] == tiny["shas"]["v2"]
    with pytest.raises(CommandExecutionError, match="'ffff' names 0 of the complete releases kept"):
        mod.rollback("tiny", "ffff")


def test_update_virtualenv_builds_a_new_one_and_hands_over_to_it(host, tiny, out):
    host.apply(host.pillar({"tiny": env_app(tiny, out)}))
    p = host.paths("tiny")
    before, pid = {v.name for v in p["venvs"].iterdir()}, report(out)["pid"]
    result = host.loaders.modules.deployment.update_virtualenv("tiny")
    assert result["result"] is True, result
    new = result["changes"]["virtualenv"]["new"]
    assert new not in before and (p["venvs"] / new / "bin" / "python").exists()
    assert report(out)["pid"] != pid
    wait_for(lambda: not host.loaders.modules.deployment.status("tiny")["tiny"]["draining"], 60, "the drain ended")
    # The old venv serves nothing any more: the next apply prunes it, and the one after has nothing to do.
    pruned = host.apply(host.pillar({"tiny": env_app(tiny, out)}))["saltfleet-deployment-tiny"]["changes"]
    assert pruned == {"pruned": [str(p["venvs"] / old) for old in before]}
    assert host.apply(host.pillar({"tiny": env_app(tiny, out)}))["saltfleet-deployment-tiny"]["changes"] == {}


def test_a_release_rolled_back_to_after_a_new_virtualenv_names_the_venv_it_runs_with(host, tiny, out):
    """~/Projects-NAME/venv, as users and their scripts know it, is the serving venv after any handover."""
    for rev in ("v1", "v2"):
        host.apply(host.pillar({"tiny": env_app(tiny, out, rev=rev)}))
    mod = host.loaders.modules.deployment
    assert mod.update_virtualenv("tiny")["result"] is True
    assert mod.rollback("tiny")["release"] == tiny["shas"]["v1"]
    p = host.paths("tiny")
    serving = json.loads(p["manifest"].read_text())["venv"]
    assert (p["project"] / "venv").resolve() == (p["venvs"] / serving).resolve()
    assert (p["project"] / "venv" / "bin" / "python").exists()


def test_a_hold_survives_state_apply_until_unhold(host, tiny, out):
    pillar = host.pillar({"tiny": env_app(tiny, out)})
    host.apply(pillar)
    mod = host.loaders.modules.deployment
    pid = report(out, "a")["pid"]
    held = mod.hold("tiny", "a", reason="db maintenance")
    assert held["result"] is True and held["changes"]["programs"] == {"held": ["a"]}, held
    assert (out / "a.stopped").read_text().split() == [str(pid)], "stopped gracefully"
    status = mod.status("tiny")["tiny"]
    assert status["programs"]["a"] == "STOPPED" and status["held"] == {"a": "db maintenance"}
    assert status["state"] == "up" and status["summary"].endswith("1 held")
    routine = host.apply(pillar)["saltfleet-deployment-tiny"]
    assert routine["changes"] == {} and "a held: db maintenance" in routine["comment"]
    assert mod.status("tiny")["tiny"]["programs"]["a"] == "STOPPED"
    with pytest.raises(CommandExecutionError, match=r"held \(db maintenance\); `salt \S+ deployment\.unhold tiny`"):
        mod.start("tiny", "a")
    released = mod.unhold("tiny")
    assert released["changes"]["programs"] == {"released": ["a"]}
    assert report(out, "a")["pid"] != pid and mod.status("tiny")["tiny"]["programs"]["a"] == "RUNNING"


def test_run_runs_in_the_serving_release_as_the_user_and_hides_env_values(host, tiny, out):
    host.apply(host.pillar({"tiny": env_app(tiny, out)}))
    mod = host.loaders.modules.deployment
    ret = mod.run("tiny", "sh", "-c", 'echo "$(id -un) $(pwd) $API_TOKEN $VIRTUAL_ENV"; exit 3')
    assert ret["retcode"] == 3
    user, cwd, token, venv = ret["stdout"].split()
    assert user == host.user.pw_name
    assert cwd == str(host.paths("tiny")["releases"] / tiny["shas"]["v1"])
    assert token == "<env:API_TOKEN>" and "tok-8c1e55" not in str(ret)
    assert venv.startswith(str(host.paths("tiny")["venvs"]))
    # One quoted argument, split as the shell would; words Salt took for keywords are refused, not dropped.
    assert mod.run("tiny", "env GREETING='hi there' sh -c 'echo $GREETING'")["stdout"] == "hi there\n"
    with pytest.raises(CommandExecutionError, match=r"deployment.run tiny: Salt read GREETING=hi as keyword arguments"):
        mod.run("tiny", "env", "sh", "-c", "echo $GREETING", GREETING="hi")


def test_a_secret_pillar_rotated_stays_hidden_while_the_running_release_still_has_it(host, tiny, out):
    """Until the next apply, the programs run (and their logs keep) the old value: output hides both."""
    host.apply(host.pillar({"tiny": env_app(tiny, out)}))
    rotated = env_app(tiny, out)
    rotated["env"].update(API_TOKEN="tok-new-41d2", TINYAPP_SAY="tok-new-41d2")
    host.set_pillar(host.pillar({"tiny": rotated}))
    mod = host.loaders.modules.deployment
    for said in (mod.logs("tiny", "a", 5), mod.supervisorctl("tiny", "tail", "a")):
        assert "tiny a version 1 started <env:API_TOKEN>" in said and "tok-8c1e55" not in said, said
    ret = mod.run("tiny", "sh", "-c", "echo $API_TOKEN")
    assert ret["stdout"] == "<env:API_TOKEN>\n", ret


def test_a_secret_rotated_out_is_gone_from_the_logs_once_its_generation_number_comes_back(host, tiny, out):
    """Generation numbers are reused (the lowest free one): the new one starts without the old one's logs."""
    old, new = "tok-old-7d1f3a", "tok-new-41d2c9"
    p = host.paths("tiny")

    def apply(rev, token):
        spec = env_app(tiny, out, rev=rev)
        spec["env"].update(API_TOKEN=token, TINYAPP_SAY=token)
        host.apply(host.pillar({"tiny": spec}))
        return os.readlink(p["conf"])

    def drained():
        return host.loaders.modules.deployment.status("tiny")["tiny"]["draining"] == []

    assert apply("v1", old) == "supervisord.1.conf"
    assert apply("v1", new) == "supervisord.2.conf"  # the env changed: a new generation
    wait_for(drained, 60, "generation 1 exited")
    assert apply("v2", new) == "supervisord.3.conf"  # generation 1's env file pruned
    wait_for(drained, 60, "generation 2 exited")
    assert apply("v3", new) == "supervisord.1.conf"
    mod = host.loaders.modules.deployment
    wait_for(lambda: "version 3 started" in mod.logs("tiny", "a", 50), 30, "generation 1 (again) logging")
    for said in (mod.logs("tiny", "a", 50), mod.supervisorctl("tiny", "tail", "a")):
        assert old not in said and "version 1 started" not in said, said


def test_logs_supervisorctl_and_force_restart(host, tiny, out):
    host.apply(host.pillar({"tiny": env_app(tiny, out)}))
    mod = host.loaders.modules.deployment
    # The app printed a secret to its log: what comes back, to the job cache, hides it.
    assert "tiny a version 1 started <env:API_TOKEN>" in mod.logs("tiny", "a", 5)
    tail = mod.supervisorctl("tiny", "tail", "a")
    assert "<env:API_TOKEN>" in tail and "tok-8c1e55" not in tail
    lines = dict(line.split(None, 1) for line in mod.supervisorctl("tiny", "status").splitlines())
    assert lines["a"].startswith("RUNNING") and lines["b"].startswith("RUNNING")
    for bad in (("reread",), ("status", "a;id")):
        with pytest.raises(CommandExecutionError, match=r"deployment\.supervisorctl tiny"):
            mod.supervisorctl("tiny", *bad)
    pid = report(out, "a")["pid"]
    assert mod.force_restart("tiny", "a") == {"restarted": ["a"]}
    assert report(out, "a")["pid"] != pid
    assert not (out / "a.stopped").exists(), "killed, not asked to stop"
    mod.supervisorctl("tiny", "stop", "b")
    status = mod.status("tiny")["tiny"]
    assert status["state"] == "down" and "b STOPPED" in status["summary"]
