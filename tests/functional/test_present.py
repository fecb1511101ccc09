"""deployment.present through the fleet SLS: first deploy, no-op, upgrades, failures, retention."""

import copy
import os
import pwd
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from localfleet.daemons import BIN
from tests.conftest import gone, snapshot, wait_for
from tests.functional.conftest import report, tiny_app
from tests.unit.test_schema import HOSTILE

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
    conf, boot = os.readlink(state / "supervisord.conf"), os.readlink(state / "supervisord.boot")
    assert (conf, boot) == ("supervisord.1.conf", "supervisord.1.boot")
    # The config: root's, group root, readable by the deployment's user (an ACL entry) and by no other.
    assert owner_mode(state / conf) == (0, 0o640) and os.stat(state / conf).st_gid == 0
    assert readable(user, state / conf) and not readable(NOBODY, state / conf)
    # The boot script (it holds the env) and the keys: root's alone.
    assert owner_mode(state / boot) == (0, 0o700) and not readable(user, state / boot)
    assert owner_mode(state / "run") == (user.pw_uid, 0o700)
    # The mirror: root's, passable by the deployment's user alone.
    assert owner_mode(state / "repo.git") == (0, 0o750) and os.stat(state / "repo.git").st_gid == 0
    assert readable(user, state / "repo.git" / "HEAD") and not readable(NOBODY, state / "repo.git" / "HEAD")
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


NOBODY = pwd.getpwnam("nobody")


def readable(account, path):
    """Whether ``account`` (a passwd entry, with its own groups only) can read ``path``."""
    who = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    proc = subprocess.run(["cat", "--", str(path)], capture_output=True, check=False, **who)
    return proc.returncode == 0


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
    hold = out / "hold"
    hold.touch()
    deployment = tiny_app(tiny, out, env={"TINYAPP_OUT": str(out), "TINYAPP_HOLD": str(hold)})
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
    assert not (out / "a.stopped").exists(), "the old program's task was cut short"
    hold.unlink()
    wait_for(lambda: not host.loaders.modules.deployment.status("tiny")["tiny"]["draining"], 60, "the drain ended")
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
    serving = report(out)
    manifest, link = p["manifest"].read_text(), os.readlink(p["project"])
    conf, conf_text = os.readlink(p["conf"]), p["conf"].read_text()
    # The failing release comes with a program option changed: that is put back too.
    failing = copy.deepcopy(dict(deployment, rev=rev))
    failing["programs"]["a"]["stopwaitsecs"] = 7
    states = host.apply(host.pillar({"tiny": failing}))
    assert states[STATE]["result"] is False
    assert message in states[STATE]["comment"], states[STATE]["comment"]
    assert p["manifest"].read_text() == manifest
    assert os.readlink(p["project"]) == link
    assert (os.readlink(p["conf"]), p["conf"].read_text()) == (conf, conf_text), "the serving config is the old one"
    # A live program of the old release serves: with overlap the very one that served before
    # (never stopped); with stop-first the old release's, started again.
    now = report(out)
    assert not gone(now["pid"]), "no program of the old release runs"
    assert os.readlink(f"/proc/{now['pid']}/cwd") == str(p["releases"] / tiny["shas"]["v1"])
    if handover == "overlap":
        assert now["pid"] == serving["pid"], "the old release's program was stopped"
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


def test_every_hostile_value_is_refused_before_anything_changes(host, tiny, out):
    """The schema's hostile values (tests/unit/test_schema.py), each a deployment beside a serving one, in one apply."""
    good = tiny_app(tiny, out)
    host.apply(host.pillar({"tiny": good}))
    before = snapshot(host.root)
    cases = {f"hostile-{n}": case for n, case in enumerate(sorted(HOSTILE))}
    deployments = {"tiny": good}
    for name, case in cases.items():
        spec = HOSTILE[case][0]
        deployments[name] = {**good, **spec, "repo": good["repo"] if spec.get("repo") == "/r" else spec["repo"]}
    states = host.apply(host.pillar(deployments))
    for name, case in cases.items():
        state, message = states[f"saltfleet-deployment-{name}"], HOSTILE[case][1].replace(":fetcher:", f":{name}:")
        assert state["result"] is False and message in state["comment"], (case, state["comment"])
        assert state["changes"] == {}, case
    assert states[STATE]["result"] is True and states[STATE]["changes"] == {}
    assert snapshot(host.root) == before
    assert host.loaders.modules.deployment.status("tiny")["tiny"]["running"] == 1


@pytest.mark.parametrize("tool", ["uv", "supervisord", "python"])
def test_a_tool_the_user_owns_is_never_run_by_root(host, tiny, out, tool):
    """saltfleet:uv, saltfleet:supervisord or a deployment's python: a copy the user could replace."""
    copy_ = host.root / "home" / host.user.pw_name / tool
    shutil.copy(shutil.which(tool, path=str(BIN)), copy_)
    os.chown(copy_, host.user.pw_uid, host.user.pw_gid)
    before = snapshot(host.root)
    if tool == "python":
        pillar, key = host.pillar({"tiny": tiny_app(tiny, out, python=str(copy_))}), "deployments:tiny:python"
    else:
        pillar, key = host.pillar({"tiny": tiny_app(tiny, out)}, **{tool: str(copy_)}), f"saltfleet:{tool}"
    state = host.apply(pillar)[STATE]
    assert state["result"] is False, state
    assert state["comment"].startswith(f"{key}: ") or f"\n{key}: " in state["comment"], state["comment"]
    assert f"is owned by uid {host.user.pw_uid}, so root will not use" in state["comment"]
    assert snapshot(host.root) == before


def test_a_state_dir_on_a_path_the_user_owns_is_refused(host, tiny, out):
    """Root's state tree under a folder the user owns (they could swap it): nothing is written."""
    var = host.root / "var"
    var.mkdir()
    os.chown(var, host.user.pw_uid, host.user.pw_gid)
    before = snapshot(host.root)
    states = host.apply(host.pillar({"tiny": tiny_app(tiny, out)}))
    comment = states[STATE]["comment"]
    assert states[STATE]["result"] is False, states[STATE]
    assert f"{var} is owned by uid {host.user.pw_uid}, so root will not use" in comment, comment
    assert snapshot(host.root) == before


def test_keep_releases_prunes_old_releases_and_their_venvs_but_spares_a_draining_one(host, tiny, out):
    hold = out / "hold"
    hold.touch()
    p = host.paths("tiny")
    shas = tiny["shas"]

    def apply(rev, **env):
        deployment = tiny_app(tiny, out, rev=rev, keep_releases=1, env={"TINYAPP_OUT": str(out), **env})
        states = host.apply(host.pillar({"tiny": deployment}))
        assert states[STATE]["result"] is True, states[STATE]
        return states[STATE]["changes"].get("pruned", [])

    def drains(count):
        status = host.loaders.modules.deployment.status
        wait_for(lambda: len(status("tiny")["tiny"]["draining"]) == count, 60, f"{count} generation(s) draining")

    # include-reqs (a venv of its own) drains until the test removes hold: its task runs on.
    apply("include-reqs", TINYAPP_HOLD=str(hold))
    old_venv = {str(v) for v in p["venvs"].iterdir()}
    apply("v2")
    apply("v3")
    drains(1)
    # v2 is past keep_releases and drained: pruned. include-reqs still drains, v3 drains
    # from now on: both spared, and so is include-reqs' venv.
    pruned = apply("v1")
    assert str(p["releases"] / shas["v2"]) in pruned
    assert not {str(p["releases"] / shas[r]) for r in ("include-reqs", "v3")} & set(pruned), pruned
    assert not old_venv & set(pruned) and all(Path(v).is_dir() for v in old_venv)
    # Once nothing runs them any more, the next apply prunes them, and the venv.
    hold.unlink()
    drains(0)
    pruned = apply("v1")
    assert {str(p["releases"] / shas[r]) for r in ("include-reqs", "v3")} | old_venv == set(pruned)
    assert not any(Path(v).exists() for v in old_venv)
    assert sorted(r.name for r in p["releases"].iterdir()) == [shas["v1"]]


def test_the_master_is_told_once_after_a_change_and_not_on_a_no_op(host, tiny, out, other_app):
    pillar = host.pillar({"tiny": tiny_app(tiny, out), "other": other_app()})
    first = host.apply(pillar)
    report = first["saltfleet-report"]
    assert report["comment"] == "The master was told what changed (mine and grains)", report
    # Once, after both deployments converged.
    assert report["__run_num__"] > max(first[s]["__run_num__"] for s in first if s.startswith("saltfleet-deployment-"))
    again = host.apply(pillar)
    assert again["saltfleet-report"]["__state_ran__"] is False, again["saltfleet-report"]
