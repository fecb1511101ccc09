"""
A full disk during a build. The deployment user's files live on a small
filesystem of their own (a tmpfs the test mounts, as root, over the user's
home in the sandbox) that runs out of room while a new release is checked
out, while its virtualenv is built, while the serving release's virtualenv is
rebuilt, or while a build step runs. Each time the apply fails naming the
deployment and the lack of room, the old release serves on (the same
processes), root's tree is as it was, what was half built is marked failed,
and the next apply with room removes it and converges.
"""

import json
import os
import subprocess
import threading

import pytest

from localfleet.config import stop_deployments
from tests.conftest import gone, snapshot, wait_for
from tests.functional.conftest import report, tiny_app

STATE = "saltfleet-deployment-tiny"
# Room for a release or two of the tiny app, its venvs and logs; far less than a build step below writes.
SMALL, LARGE = "8m", "96m"
BIG_MIB = 32


class Disk:
    """The deployment user's filesystem: filled as the user (their own files), grown by root as an operator would."""

    def __init__(self, home, user):
        self.home, self.user = home, user

    def fill(self):
        """A file of the user's takes every block left: the next write of anything in the home fails."""
        as_user(self.user, "sh", "-c", 'dd if=/dev/zero of="$1" bs=64k 2>/dev/null; exit 0', "sh", self.home / "fill")
        assert os.statvfs(self.home).f_bavail == 0, "the user's filesystem still has room"

    def grow(self):
        """The operator gives the user's filesystem more room (the user's own file stays)."""
        subprocess.run(["mount", "-o", f"remount,size={LARGE}", str(self.home)], check=True)
        assert os.statvfs(self.home).f_bavail * os.statvfs(self.home).f_frsize > 2 * BIG_MIB << 20


@pytest.fixture
def disk(host):
    """The user's home, a tmpfs of SMALL of the user's, mounted in the sandbox; unmounted whatever happens."""
    home = host.root / "home" / host.user.pw_name
    mode = oct(os.stat(home).st_mode & 0o7777)[2:]
    options = f"size={SMALL},mode={mode},uid={host.user.pw_uid},gid={host.user.pw_gid}"
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "saltfleet-test-home", str(home)], check=True)
    try:
        yield Disk(home, host.user)
    finally:
        try:
            # The programs run in the release on it: stopped first, so the filesystem is let go.
            stop_deployments(host.root, timeout=30)
        finally:
            if subprocess.run(["umount", str(home)], check=False).returncode:
                subprocess.run(["umount", "-l", str(home)], check=True)


def as_user(user, *argv):
    return subprocess.run(
        argv, user=user.pw_uid, group=user.pw_gid, extra_groups=[], cwd="/", capture_output=True, check=True
    )


def roots_tree(host):
    """Root's tree in the sandbox (the registry: manifests, configs, the mirror; its etc), the test's fault aside."""
    tree = {}
    for top in ("var", "etc"):
        tree.update(snapshot(host.root / top))
    return {path: entry for path, entry in tree.items() if "/var/lib/saltfleet/faults" not in path}


def serving_now(host, out):
    """What serves: the program's own report, and the deployment's status."""
    status = host.loaders.modules.deployment.status("tiny")["tiny"]
    return report(out), status["release"], status["programs"]


def assert_failed_for_lack_of_room(state, secret=None):
    comment = state["comment"]
    assert state["result"] is False, state
    head = comment.split("\n", 1)[0]
    assert "deployments:tiny" in head and "no space left on device" in head.lower(), comment
    if secret:
        assert secret not in repr(state)


def assert_old_serves_on(host, out, before, tree):
    """The release serving before the failure serves on, the very same process, and root's tree is unchanged."""
    now = serving_now(host, out)
    assert now == before, "the serving release or its program changed"
    assert not gone(now[0]["pid"]), "the serving program is gone"
    assert roots_tree(host) == tree, "root's tree changed"


def assert_half_built_marked(host):
    """Every release folder is complete, or marked failed (and then not complete): none looks usable half built."""
    p = host.paths("tiny")
    for release in p["releases"].iterdir():
        markers = host.sf.saltfleet_paths.markers(release)
        assert markers["complete"].exists() != markers["failed"].exists(), f"{release.name} is neither or both"


def test_no_room_for_the_checkout(host, tiny, out, disk):
    pillar = host.pillar({"tiny": tiny_app(tiny, out, rev="v1")})
    assert host.apply(pillar)[STATE]["result"] is True
    before, tree = serving_now(host, out), roots_tree(host)
    disk.fill()

    upgrade = host.pillar({"tiny": tiny_app(tiny, out, rev="v2")})
    state = host.apply(upgrade)[STATE]
    assert_failed_for_lack_of_room(state)
    assert_old_serves_on(host, out, before, tree)
    assert_half_built_marked(host)

    disk.grow()
    again = host.apply(upgrade)[STATE]
    assert again["result"] is True, again
    assert report(out)["version"] == "2"
    assert host.loaders.modules.deployment.status("tiny")["tiny"]["release"] == tiny["shas"]["v2"]
    assert_half_built_marked(host)


def test_no_room_for_the_virtualenv_of_a_new_release(host, tiny, out, disk):
    assert host.apply(host.pillar({"tiny": tiny_app(tiny, out, rev="v1")}))[STATE]["result"] is True
    before, tree = serving_now(host, out), roots_tree(host)
    fault = host.root / "var" / "lib" / "saltfleet" / "faults" / "build"
    fault.parent.mkdir(parents=True)
    fault.write_text("wait")
    # include-reqs has requirements of its own: a venv of its own is built once it is checked out.
    upgrade = host.pillar({"tiny": tiny_app(tiny, out, rev="include-reqs")})
    result = {}
    thread = threading.Thread(target=lambda: result.update(host.apply(upgrade)))
    thread.start()
    p = host.paths("tiny")
    release = p["releases"] / tiny["shas"]["include-reqs"]
    try:
        wait_for((release / "app.py").exists, 60, "the new release checked out")
        disk.fill()
    finally:
        fault.unlink()
        thread.join(120)
    assert not thread.is_alive(), "the apply did not end"
    assert_failed_for_lack_of_room(result[STATE])
    assert_old_serves_on(host, out, before, tree)
    assert_half_built_marked(host)
    assert host.sf.saltfleet_paths.markers(release)["failed"].exists(), "the half-built release is not marked"

    # The operator moves on to another release, with room: the half-built one goes, as the user.
    disk.grow()
    moved = host.apply(host.pillar({"tiny": tiny_app(tiny, out, rev="v2")}))[STATE]
    assert moved["result"] is True, moved
    assert report(out)["version"] == "2"
    assert not release.exists(), "the release the full disk left half built is still there"
    assert str(release) in moved["changes"].get("pruned", []), moved["changes"]
    # And the release that had no room builds and serves now.
    again = host.apply(upgrade)[STATE]
    assert again["result"] is True, again
    assert report(out)["cwd"] == str(release)
    assert_half_built_marked(host)


def test_no_room_to_rebuild_the_serving_releases_virtualenv(host, tiny, out, disk):
    pillar = host.pillar({"tiny": tiny_app(tiny, out, rev="v1")})
    assert host.apply(pillar)[STATE]["result"] is True
    p = host.paths("tiny")
    release = p["releases"] / tiny["shas"]["v1"]
    before, inode = serving_now(host, out), os.stat(release).st_ino
    disk.fill()

    result = host.loaders.modules.deployment.update_virtualenv("tiny")
    assert_failed_for_lack_of_room(result)
    assert serving_now(host, out) == before and not gone(before[0]["pid"])
    # The serving release was built whole and stays so: only its new venv had no room.
    [kept] = host.loaders.modules.deployment.releases("tiny")
    assert kept["serving"] and kept["complete"], kept
    assert_half_built_marked(host)

    disk.grow()
    again = host.apply(pillar)[STATE]
    assert again["result"] is True, again
    assert "virtualenv" in again["changes"] and "release" not in again["changes"], again["changes"]
    assert os.stat(release).st_ino == inode, "the serving release was checked out again under its programs"
    assert report(out)["pid"] != before[0]["pid"] and report(out)["cwd"] == str(release)


WRITE_BIG = f'echo "uploading with $API_TOKEN" >&2; dd if=/dev/zero of=big bs=1M count={BIG_MIB}'
STEPS = {
    # dd leaves what it wrote when the disk fills; many tools remove their partial output as they fail.
    "leaves-its-output": WRITE_BIG,
    "removes-its-output": f"{WRITE_BIG} || {{ rm -f big; exit 1; }}",
}


@pytest.mark.parametrize("step", sorted(STEPS))
def test_no_room_for_a_build_step(host, tiny, out, disk, step):
    token = "tok-0f3e9b2a7c41"
    env = {"TINYAPP_OUT": str(out), "API_TOKEN": token}
    assert host.apply(host.pillar({"tiny": tiny_app(tiny, out, rev="v1", env=env)}))[STATE]["result"] is True
    before, tree = serving_now(host, out), roots_tree(host)
    steps = [f'echo ran >> "$TINYAPP_OUT/steps"; {STEPS[step]}']
    upgrade = host.pillar({"tiny": tiny_app(tiny, out, rev="v2", env=env, build=steps)})

    state = host.apply(upgrade)[STATE]
    assert_failed_for_lack_of_room(state, secret=token)
    assert "`echo ran" in state["comment"], "the comment does not say which step had no room"
    assert_old_serves_on(host, out, before, tree)
    assert_half_built_marked(host)
    release = host.paths("tiny")["releases"] / tiny["shas"]["v2"]
    failed = host.sf.saltfleet_paths.markers(release)["failed"]
    assert failed.exists(), "the half-built release is not marked"
    assert token not in failed.read_text()

    # With room, the next apply removes what the full disk left and runs the steps again.
    disk.grow()
    again = host.apply(upgrade)[STATE]
    assert again["result"] is True, again
    assert (out / "steps").read_text().splitlines() == ["ran", "ran"]
    assert report(out)["version"] == "2" and report(out)["cwd"] == str(release)
    assert not failed.exists() and (release / "big").stat().st_size == BIG_MIB << 20
    assert_half_built_marked(host)
    assert json.loads(host.paths("tiny")["manifest"].read_text())["release"] == tiny["shas"]["v2"]
