"""A deployment dropped from pillar: stopped, its sysfiles, config and secrets gone; purged when asked."""

import time
from pathlib import Path

from tests.conftest import snapshot
from tests.functional.conftest import report, tiny_app

# Not a key, but a secret all the same: a deployment's deploy key goes when it does.
KEY = (Path(__file__).resolve().parents[1] / "fixtures" / "not-a-deploy-key").read_text()


def exited(pid, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                if handle.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


def test_dropping_a_deployment_stops_it_and_removes_its_files(host, tiny, out, testmode, other_app):
    pillar = host.pillar({"tiny": tiny_app(tiny, out, deploy_key=KEY), "other": other_app()})
    host.apply(pillar)
    p = host.paths("tiny")
    pid = report(out)["pid"]
    dropped = host.pillar({"other": pillar["deployments"]["other"]})
    before = snapshot(host.root)
    dry = host.apply(dropped, test=True)
    assert snapshot(host.root) == before
    removed = dry["saltfleet-deployment-tiny-removed"]
    assert removed["result"] is None
    assert removed["changes"]["supervisord"] == {"old": "running", "new": "stopped"}
    assert removed["changes"]["removed"] == [str(p["state"])]
    if testmode:
        return
    states = host.apply(dropped)
    assert {sid: s["changes"] for sid, s in states.items()} == {sid: s["changes"] for sid, s in dry.items()}
    assert states["saltfleet-deployment-tiny-removed"]["result"] is True
    assert exited(pid), "its program stopped"
    assert not p["state"].exists(), "config, key and manifest are gone"
    assert not (host.root / "etc" / "cron.d" / "saltfleet-tiny").exists()
    assert p["releases"].is_dir(), "without purge the releases stay"
    assert host.loaders.modules.deployment.list() == ["other"]
    again = host.apply(dropped)
    assert all(s["changes"] == {} for s in again.values())


def test_purge_removes_every_tree_and_then_reports_nothing(host, tiny, out):
    host.apply(host.pillar({"tiny": tiny_app(tiny, out, deploy_key=KEY)}))
    p = host.paths("tiny")
    assert p["deploy_key"].read_text() == KEY
    pid = report(out)["pid"]
    states = host.apply(host.pillar({}, purge_removed=True))
    removed = states["saltfleet-deployment-tiny-removed"]
    assert removed["result"] is True, removed
    assert sorted(removed["changes"]["removed"]) == sorted(
        str(x) for x in (p["state"], p["project"], p["releases"], p["venvs"], p["logs"])
    )
    assert exited(pid), "its program stopped before its trees went"
    assert (out / "a.stopped").read_text().split() == [str(pid)], "and it stopped gracefully (SIGTERM)"
    for key in ("state", "project", "releases", "venvs", "logs", "deploy_key"):
        assert not p[key].exists() and not p[key].is_symlink(), key
    again = host.apply(host.pillar({}, purge_removed=True))
    assert all(s["changes"] == {} for s in again.values())


def test_the_clean_sls_removes_every_deployment_saltfleet_installed(host, tiny, out, other_app):
    host.apply(host.pillar({"tiny": tiny_app(tiny, out), "other": other_app()}))
    ret = host.loaders.modules.state.sls("fleet.clean")
    states = {s["__id__"]: s for s in ret.raw.values()}
    assert set(states) == {"saltfleet-deployment-other-clean", "saltfleet-deployment-tiny-clean"}
    assert all(s["result"] is True and s["changes"]["removed"] for s in states.values())
    assert host.loaders.modules.deployment.list() == []
    assert not (host.root / "etc" / "cron.d" / "saltfleet-tiny").exists()
    assert exited(report(out)["pid"]) and exited(report(out, "o")["pid"])
