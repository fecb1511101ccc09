"""deployment.present through the fleet SLS: first deploy, no-op, upgrades, failures, retention."""

import copy
import os
import stat
import time

import pytest

from tests.conftest import snapshot
from tests.functional.conftest import report, tiny_app

STATE = "saltfleet-deployment-tiny"


def changes_of(states):
    return {sid: s["changes"] for sid, s in states.items()}


def test_first_deploy_dry_run_tells_the_real_run(host, tiny, out, testmode):
    pillar = host.pillar({"tiny": tiny_app(tiny, out)})
    before = snapshot(host.root)
    dry = host.apply(pillar, test=True)
    assert snapshot(host.root) == before, "test=True changed the host"
    assert dry[STATE]["result"] is None
    assert set(dry[STATE]["changes"]) == {"release", "virtualenv", "supervisord", "sysfiles"}
    if testmode:
        return
    real = host.apply(pillar)
    assert real[STATE]["result"] is True, real[STATE]
    assert changes_of(real) == changes_of(dry)
    running = report(out)
    assert running["version"] == "1"
    assert running["user"] == host.user.pw_name
    assert running["cwd"] == str(host.paths("tiny")["releases"] / tiny["shas"]["v1"])


def test_layout_on_the_host_is_the_documented_one(host, tiny, out):
    """The README's layout, spelled out here rather than taken from the code under test."""
    states = host.apply(host.pillar({"tiny": tiny_app(tiny, out)}))
    assert all(s["result"] is True for s in states.values()), states
    root, user, sha = host.root, host.user, tiny["shas"]["v1"]
    home = root / "home" / user.pw_name
    state = root / "var" / "lib" / "saltfleet" / "deployments" / "tiny"

    def owner_mode(path):
        st = os.lstat(path)
        return st.st_uid, stat.S_IMODE(st.st_mode)

    assert owner_mode(state) == (0, 0o711)
    assert owner_mode(state / "manifest.json")[0] == 0
    conf = os.readlink(state / "supervisord.conf")
    assert conf.startswith("supervisord.") and owner_mode(state / conf) == (0, 0o640)
    assert os.stat(state / conf).st_gid == user.pw_gid
    assert owner_mode(state / "run") == (user.pw_uid, 0o700)
    assert owner_mode(state / "repo.git")[0] == 0
    assert os.readlink(home / "Projects-tiny") == f"Projects-tiny.releases/{sha}"
    assert owner_mode(home / "Projects-tiny.releases" / sha)[0] == user.pw_uid
    assert (home / "Projects-tiny" / "venv" / "bin" / "python").exists()
    venvs = list((home / "Projects-tiny.venvs").iterdir())
    assert len(venvs) == 1 and owner_mode(venvs[0])[0] == user.pw_uid
    assert (home / "log" / "tiny" / "a.g1.log").exists(), "each generation logs to its own file"
    assert owner_mode(root / "etc" / "cron.d" / "saltfleet-tiny") == (0, 0o644)
    # Nothing of root's is left in the user's tree, nothing of the user's in root's (run/ aside).
    for dirpath, dirnames, filenames in os.walk(home / "Projects-tiny.releases"):
        for entry in dirnames + filenames:
            assert os.lstat(os.path.join(dirpath, entry)).st_uid == user.pw_uid, entry
    for dirpath, dirnames, filenames in os.walk(state):
        if "/run" not in dirpath + "/":
            for entry in dirnames + filenames:
                if entry != "run":
                    assert os.lstat(os.path.join(dirpath, entry)).st_uid == 0, entry


def shim(folder, tool, real, log):
    """A root-owned wrapper that logs each call of ``tool`` (its arguments) and runs the real one."""
    path = folder / tool
    path.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec {real} "$@"\n')
    path.chmod(0o755)
    return path


def test_a_no_op_runs_no_installer_and_no_fetch(host, tiny, out, monkeypatch, short_tmp):
    import shutil

    calls = short_tmp / "calls"
    calls.touch(mode=0o666)
    calls.chmod(0o666)  # uv runs as the deployment's user
    uv = shim(short_tmp, "uv", shutil.which("uv", path=os.path.dirname(os.sys.executable)), calls)
    shim(short_tmp, "git", shutil.which("git"), calls)
    monkeypatch.setenv("PATH", f"{short_tmp}:{os.environ['PATH']}")
    pillar = host.pillar({"tiny": tiny_app(tiny, out, rev="master")}, uv=str(uv))
    assert host.apply(pillar)[STATE]["result"] is True
    assert "fetch" in calls.read_text() and "pip install" in calls.read_text(), "the shims saw the first deploy"
    calls.write_text("")
    again = host.apply(pillar)
    assert STATE in again and not any(changes_of(again).values()), changes_of(again)
    seen = calls.read_text().splitlines()
    assert not [c for c in seen if c.startswith(("fetch", "pip", "venv", "clone"))], seen
    assert [c for c in seen if c.startswith("ls-remote")], "a branch is still asked of the remote"


def test_upgrade_starts_the_new_release_beside_the_old_which_drains(host, tiny, out, testmode):
    deployment = tiny_app(tiny, out, env={"TINYAPP_OUT": str(out), "TINYAPP_LINGER": "3"})
    first = host.apply(host.pillar({"tiny": deployment}))
    assert first[STATE]["result"] is True, first[STATE]["comment"]
    old = report(out)
    upgraded = dict(deployment, rev="v2")
    dry = host.apply(host.pillar({"tiny": upgraded}), test=True)
    assert dry[STATE]["changes"] == {
        "release": {"old": tiny["shas"]["v1"], "new": tiny["shas"]["v2"]},
        "programs": {"restarted": ["a"]},
    }
    if testmode:
        assert report(out) == old
        return
    real = host.apply(host.pillar({"tiny": upgraded}))
    assert changes_of(real) == changes_of(dry)
    new = report(out)
    assert new["version"] == "2" and new["pid"] != old["pid"]
    # The old program got SIGTERM only once the new one ran, and drains in the background.
    status = host.loaders.modules.deployment.status("tiny")["tiny"]
    assert status["release"] == tiny["shas"]["v2"]
    assert len(status["draining"]) == 1
    assert "in the background (pid" in real[STATE]["comment"]
    deadline = time.monotonic() + 60
    while host.loaders.modules.deployment.status("tiny")["tiny"]["draining"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (out / "a.stopped").read_text().split() == [str(old["pid"])]


def test_stop_first_stops_the_old_program_before_the_new_starts(host, tiny, out):
    deployment = tiny_app(tiny, out, handover="stop-first", env={"TINYAPP_OUT": str(out), "TINYAPP_LINGER": "1"})
    first = host.apply(host.pillar({"tiny": deployment}))
    assert first[STATE]["result"] is True, first[STATE]["comment"]
    old = report(out)
    p = host.paths("tiny")
    serving = os.readlink(p["conf"])
    states = host.apply(host.pillar({"tiny": dict(deployment, rev="v2")}))
    assert states[STATE]["changes"].get("programs") == {"restarted": ["a"]}, states[STATE]
    assert os.readlink(p["conf"]) == serving, "the same supervisord restarted its program"
    stopped = (out / "a.stopped").stat().st_mtime
    assert (out / "a.json").stat().st_mtime >= stopped, "the new program started after the old one stopped"
    assert report(out)["version"] == "2" and (out / "a.stopped").read_text().split() == [str(old["pid"])]


def test_only_the_program_that_changed_restarts(host, tiny, out, testmode):
    deployment = tiny_app(tiny, out, programs=("a", "b"))
    first = host.apply(host.pillar({"tiny": deployment}))
    assert first[STATE]["result"] is True, first[STATE]["comment"]
    before = {name: report(out, name)["pid"] for name in ("a", "b")}
    changed = copy.deepcopy(deployment)
    changed["programs"]["b"]["stopwaitsecs"] = 5
    dry = host.apply(host.pillar({"tiny": changed}), test=True)
    assert dry[STATE]["changes"] == {"programs": {"changed": ["b"]}}
    if testmode:
        return
    real = host.apply(host.pillar({"tiny": changed}))
    assert changes_of(real) == changes_of(dry)
    assert report(out, "a")["pid"] == before["a"]
    assert report(out, "b")["pid"] != before["b"]


@pytest.mark.parametrize(
    ("rev", "handover", "message"),
    [
        ("no-such-branch", "overlap", "deployments:tiny:rev: 'no-such-branch' not found in"),
        ("broken-reqs", "overlap", "deployments:tiny:requirements: installing 'requirements.txt' failed"),
        ("crashing", "overlap", "did not start (a: "),
        ("crashing", "stop-first", "the previous config was put back, and its programs serve"),
    ],
)
def test_a_failed_release_never_serves_and_the_old_one_keeps_serving(host, tiny, out, rev, handover, message):
    deployment = tiny_app(tiny, out, handover=handover)
    # A program that dies at start is given up on at once, not after supervisord's three retries.
    deployment["programs"]["a"]["startretries"] = 0
    first = host.apply(host.pillar({"tiny": deployment}))
    assert first[STATE]["result"] is True, first[STATE]["comment"]
    p = host.paths("tiny")
    manifest, link = p["manifest"].read_text(), os.readlink(p["project"])
    states = host.apply(host.pillar({"tiny": dict(deployment, rev=rev)}))
    assert states[STATE]["result"] is False
    assert message in states[STATE]["comment"], states[STATE]["comment"]
    assert p["manifest"].read_text() == manifest
    assert os.readlink(p["project"]) == link
    assert report(out)["version"] == "1"
    status = host.loaders.modules.deployment.status("tiny")["tiny"]
    assert status["programs"] == {"a": "RUNNING"} and status["draining"] == []
    if rev == "broken-reqs":
        failed = p["releases"] / tiny["shas"][rev] / ".git" / "saltfleet-failed"
        assert "saltfleet-no-such-package" in failed.read_text(), "a release that failed to build is kept, marked"
    # Fixing pillar converges again, with nothing left of the failure running.
    assert host.apply(host.pillar({"tiny": deployment}))[STATE]["changes"] == {}


INVALID = {
    "unknown key": (
        lambda d: d["deployments"]["tiny"].update(reqirements="req.txt"),
        "deployments:tiny:reqirements: unknown key; did you mean 'requirements'?",
    ),
    "name escapes": (lambda d: d["deployments"].update({"../x": {"repo": "/r"}}), "'../x' is not allowed"),
    "rev not a string": (
        lambda d: d["deployments"]["tiny"].update(rev=1234),
        "deployments:tiny:rev: must be a str, got int 1234; quote it in pillar: rev: '1234'",
    ),
    "program opens a section": (
        lambda d: d["deployments"]["tiny"]["programs"]["a"].update(command="x\n[include]\nfiles=/etc/x"),
        "deployments:tiny:programs:a:command: must be one line",
    ),
    "host key typo": (lambda d: d["saltfleet"].update(uesr="x"), "saltfleet:uesr: unknown key; did you mean 'user'?"),
    "deployments not a mapping": (
        lambda d: d.update(deployments=["tiny"]),
        "deployments: must be a mapping of name to settings, got list",
    ),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_pillar_fails_cleanly_and_changes_nothing(host, tiny, out, case):
    pillar = host.pillar({"tiny": tiny_app(tiny, out)})
    host.apply(pillar)
    edit, message = INVALID[case]
    bad = copy.deepcopy(pillar)
    edit(bad)
    before = snapshot(host.root)
    states = host.apply(bad)
    failed = [s for s in states.values() if s["result"] is False]
    assert failed and all(message in s["comment"] for s in failed), [s["comment"] for s in states.values()]
    assert all(s["changes"] == {} for s in states.values())
    assert snapshot(host.root) == before
    assert host.loaders.modules.deployment.status("tiny")["tiny"]["running"] == 1


def test_keep_releases_prunes_old_releases_and_their_venvs_but_spares_a_draining_one(host, tiny, out):
    deployment = tiny_app(tiny, out, keep_releases=2, env={"TINYAPP_OUT": str(out), "TINYAPP_LINGER": "4"})
    p = host.paths("tiny")
    host.apply(host.pillar({"tiny": dict(deployment, rev="include-reqs")}))
    old_venv = {v.name for v in p["venvs"].iterdir()}
    host.apply(host.pillar({"tiny": dict(deployment, rev="v2")}))
    # include-reqs drains; v2 serves. A third release: include-reqs is past keep_releases...
    states = host.apply(host.pillar({"tiny": dict(deployment, rev="v3")}))
    pruned = states[STATE]["changes"].get("pruned", [])
    drained_release = str(p["releases"] / tiny["shas"]["include-reqs"])
    assert drained_release in pruned or (p["releases"] / tiny["shas"]["include-reqs"]).is_dir()
    # ...and once nothing runs it any more, the next apply prunes it and its venv.
    deadline = time.monotonic() + 60
    while host.loaders.modules.deployment.status("tiny")["tiny"]["draining"] and time.monotonic() < deadline:
        time.sleep(0.2)
    if drained_release not in pruned:
        states = host.apply(host.pillar({"tiny": dict(deployment, rev="v3")}))
        pruned = states[STATE]["changes"]["pruned"]
    assert drained_release in pruned
    assert {str(p["venvs"] / v) for v in old_venv} <= set(pruned)
    assert not (p["releases"] / tiny["shas"]["include-reqs"]).exists()
    assert not any((p["venvs"] / v).exists() for v in old_venv)
    kept = sorted(r.name for r in p["releases"].iterdir())
    assert kept == sorted([tiny["shas"]["v2"], tiny["shas"]["v3"]])


def test_the_master_is_told_once_after_a_change_and_not_on_a_no_op(host, tiny, out):
    pillar = host.pillar({"tiny": tiny_app(tiny, out), "other": tiny_app(tiny, out, programs=["o"])})
    first = host.apply(pillar)
    report = first["saltfleet-report"]
    assert report["comment"] == "The master was told what changed (mine and grains)", report
    # Once, after both deployments converged.
    assert report["__run_num__"] > max(first[s]["__run_num__"] for s in first if s.startswith("saltfleet-deployment-"))
    again = host.apply(pillar)
    assert again["saltfleet-report"]["__state_ran__"] is False, again["saltfleet-report"]
