"""Sysfiles through the states: installed, removed when no longer shipped, names cron ignores refused, no sharing."""

import stat

from tests.conftest import snapshot
from tests.functional.conftest import tiny_app

CRON = "* * * * * sfdeploy true\n"


def test_a_file_no_longer_shipped_is_removed(host, tiny, out, testmode):
    host.ship("tiny", {"etc/cron.d/tiny": CRON, "usr/local/bin/tiny-report": "#!/bin/sh\necho hi\n"})
    pillar = host.pillar({"tiny": tiny_app(tiny, out)})
    assert host.apply(pillar)["saltfleet-deployment-tiny"]["result"] is True
    script = host.root / "usr" / "local" / "bin" / "tiny-report"
    assert (host.root / "etc" / "cron.d" / "tiny").read_text() == CRON
    assert stat.S_IMODE(script.stat().st_mode) == 0o755 and script.stat().st_uid == 0
    host.ship("tiny", {"etc/cron.d/tiny": CRON})
    states = host.apply(pillar, test=testmode)
    assert states["saltfleet-deployment-tiny"]["changes"] == {"sysfiles": {"removed": ["usr/local/bin/tiny-report"]}}
    assert script.exists() is testmode


def test_a_cron_name_cron_would_ignore_fails_and_changes_nothing(host, tiny, out):
    host.apply(host.pillar({"tiny": tiny_app(tiny, out)}))
    host.ship("tiny", {"etc/cron.d/tiny.cron": CRON})
    before = snapshot(host.root)
    state = host.apply(host.pillar({"tiny": tiny_app(tiny, out)}))["saltfleet-deployment-tiny"]
    assert state["result"] is False
    assert "etc/cron.d/tiny.cron would be ignored by cron" in state["comment"]
    assert snapshot(host.root) == before


def test_two_deployments_claiming_one_path_fail_clearly(host, tiny, out, other_app):
    host.ship("tiny", {"etc/cron.d/shared": CRON})
    host.ship("twin", {"etc/cron.d/shared": CRON})
    states = host.apply(host.pillar({"tiny": tiny_app(tiny, out, programs=["a"])}))
    assert states["saltfleet-deployment-tiny"]["result"] is True
    states = host.apply(host.pillar({"tiny": tiny_app(tiny, out), "twin": other_app(programs=["b"])}))
    twin = states["saltfleet-deployment-twin"]
    assert twin["result"] is False
    assert "deployments:twin:sysfiles: etc/cron.d/shared is already installed by 'tiny'" in twin["comment"]
    assert states["saltfleet-deployment-tiny"]["result"] is True


def test_every_host_gets_the_common_sysfiles(host, repo_root):
    host.set_pillar(host.pillar({}))
    first = host.loaders.states.deployment.sysfiles(name="common")
    assert first.result is True and first.changes == {"sysfiles": {"added": ["etc/logrotate.d/saltfleet"]}}
    shipped = repo_root / "deployments" / "common" / "sysfiles" / "etc" / "logrotate.d" / "saltfleet"
    assert (host.root / "etc" / "logrotate.d" / "saltfleet").read_text() == shipped.read_text()
    assert host.loaders.states.deployment.sysfiles(name="common").changes == {}
