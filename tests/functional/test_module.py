"""The operator verbs (`salt TARGET deployment.FUNC`) through the loaders: outcomes and clear errors."""

import threading
import time

import pytest
from salt.exceptions import CommandExecutionError

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
        CommandExecutionError, match=r"^deployment nosuch is not installed on this host; deployment.list"
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
    assert deployed.stop("tiny") == {"stopped": True}
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
    upgrade = threading.Thread(target=lambda: applied.update(host.apply(host.pillar({"tiny": deployment}))))
    upgrade.start()
    release = host.paths("tiny")["releases"] / tiny["shas"]["v2"]
    deadline = time.monotonic() + 60
    while not (release / "app.py").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    threading.Timer(3, fault.unlink).start()
    started = time.monotonic()
    restarted = host.loaders.modules.deployment.restart("tiny", "a")
    waited = time.monotonic() - started
    upgrade.join(120)
    assert waited >= 2.5, "the restart did not wait for the apply that held the deployment"
    assert applied["saltfleet-deployment-tiny"]["result"] is True
    assert restarted == {"restarted": ["a"]}
    # The restart came after the upgrade, on the new release.
    assert report(out, "a")["version"] == "2"
    assert report(out, "a")["pid"] != report(out, "b")["pid"]
