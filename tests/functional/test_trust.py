"""
The trust boundary, attacked as the deployment's user: nothing the user (or
the app's repository) controls makes root write, delete or read where the
user could not, and the deployment keeps serving.
"""

import contextlib
import grp
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import threading
import time

import pytest

from tests.conftest import gone, short_tmpdir, wait_for
from tests.functional.conftest import report, tiny_app

STATE = "saltfleet-deployment-tiny"


@pytest.fixture
def victim():
    """Root's own files, which the deployment's user can neither read nor change."""
    folder = short_tmpdir("sfv-")
    secret = folder / "secret"
    secret.write_text("ROOT-ONLY-SECRET\n")
    secret.chmod(0o600)
    digests = folder / "digests"
    for name in ("0123456789abcdef", "fedcba9876543210"):
        (digests / name).mkdir(parents=True)
        (digests / name / "keep").write_text("mine\n")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def state_of(folder):
    return {
        str(path.relative_to(folder)): (
            os.lstat(path).st_uid,
            stat.S_IMODE(os.lstat(path).st_mode),
            path.read_bytes() if path.is_file() else None,
        )
        for path in sorted(folder.rglob("*"))
    }


def as_user(user, *argv):
    subprocess.run(argv, user=user.pw_uid, group=user.pw_gid, check=True, capture_output=True)


def serving(host, out):
    status = host.loaders.modules.deployment.status("tiny")["tiny"]
    return status["programs"] == {"a": "RUNNING"} and report(out)["user"] == host.user.pw_name


def test_a_link_planted_in_the_release_while_it_builds_hands_root_nothing(host, tiny, out, victim):
    host.apply(host.pillar({"tiny": tiny_app(tiny, out)}))
    before = state_of(victim)
    fault = host.root / "var" / "lib" / "saltfleet" / "faults" / "build"
    fault.parent.mkdir(parents=True)
    fault.write_text("wait")
    result = {}
    # include-reqs has requirements of its own: a new venv is built after the links are planted.
    upgrade = threading.Thread(
        target=lambda: result.update(host.apply(host.pillar({"tiny": tiny_app(tiny, out, rev="include-reqs")})))
    )
    upgrade.start()
    p = host.paths("tiny")
    release = p["releases"] / tiny["shas"]["include-reqs"]
    wait_for((release / "app.py").exists, 60, "the new release checked out")
    as_user(host.user, "ln", "-s", str(victim / "secret"), str(release / "planted"))
    as_user(host.user, "ln", "-s", str(victim / "digests"), str(release / "planted-dir"))
    as_user(host.user, "ln", "-s", str(victim / "digests"), str(p["releases"] / ("0" * 40)))
    as_user(host.user, "ln", "-s", str(victim / "digests"), str(p["venvs"] / ("0" * 16)))
    fault.unlink()
    upgrade.join(120)
    assert result[STATE]["result"] is True, result[STATE]
    assert "virtualenv" in result[STATE]["changes"], "a venv was built after the links were planted"
    assert state_of(victim) == before
    assert report(out)["cwd"] == str(release)


@pytest.mark.parametrize(
    ("rev", "message"),
    [
        ("link-reqs", "deployments:tiny:requirements: 'requirements.txt' is a symlink in the repository"),
        (
            "escaping-reqs",
            "deployments:tiny:requirements: 'requirements.txt' includes '/etc/shadow', outside the repository",
        ),
    ],
)
def test_requirements_that_reach_out_of_the_release_are_refused_unread(host, tiny, out, rev, message):
    host.apply(host.pillar({"tiny": tiny_app(tiny, out)}))
    state = host.apply(host.pillar({"tiny": tiny_app(tiny, out, rev=rev)}))[STATE]
    assert state["result"] is False
    assert message in state["comment"]
    assert "root:" not in state["comment"], "a line of /etc/shadow reached the comment"
    assert not (host.paths("tiny")["releases"] / tiny["shas"][rev]).exists(), "nothing was checked out"
    assert serving(host, out) and report(out)["version"] == "1"


def test_a_venvs_dir_swapped_for_a_link_is_never_pruned_through(host, tiny, out):
    deployment = tiny_app(tiny, out, keep_releases=1, handover="stop-first")
    host.apply(host.pillar({"tiny": deployment}))
    p = host.paths("tiny")
    # The user moves their venvs into a folder of their own that also holds other data under
    # names like saltfleet's digests, and points the venvs name at it.
    other = p["home"] / "other"
    as_user(host.user, "mv", str(p["venvs"]), str(other))
    as_user(host.user, "mkdir", str(other / "0123456789abcdef"))
    as_user(host.user, "ln", "-s", str(other), str(p["venvs"]))
    before = sorted(v.name for v in other.iterdir())
    # A release with a venv of its own: v1's release and venv are past keep_releases.
    state = host.apply(host.pillar({"tiny": dict(deployment, rev="include-reqs")}))[STATE]
    assert state["result"] is True, state
    assert state["changes"]["pruned"] == [str(p["releases"] / tiny["shas"]["v1"])], state["changes"]
    assert set(before) <= {v.name for v in other.iterdir()}, "a folder was deleted through the link"
    assert serving(host, out)


def test_purge_never_follows_a_log_dir_swapped_for_a_link(host, tiny, out, victim):
    host.apply(host.pillar({"tiny": tiny_app(tiny, out)}))
    p = host.paths("tiny")
    host.loaders.modules.deployment.stop("tiny")
    before = state_of(victim)
    as_user(host.user, "rm", "-rf", str(p["logs"]))
    as_user(host.user, "ln", "-s", str(victim / "digests"), str(p["logs"]))
    removed = host.apply(host.pillar({}, purge_removed=True))["saltfleet-deployment-tiny-removed"]
    assert removed["result"] is True, removed
    assert str(p["logs"]) not in removed["changes"]["removed"]
    assert state_of(victim) == before
    assert not p["releases"].exists() and not p["state"].exists()


def test_a_socket_swapped_for_someone_elses_is_refused(host, tiny, out, short_tmp):
    host.apply(host.pillar({"tiny": tiny_app(tiny, out)}))
    p = host.paths("tiny")
    sock = host.sf.saltfleet_paths.generation(p, host.sf.saltfleet_supervisor.serving(p))["socket"]
    # A socket root listens on (another service's), which the user points the deployment's name at.
    roots = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    roots.bind(str(short_tmp / "root.sock"))
    roots.listen(8)
    try:
        as_user(host.user, "mv", str(sock), str(sock) + ".moved")
        as_user(host.user, "ln", "-s", str(short_tmp / "root.sock"), str(sock))
        state = host.apply(host.pillar({"tiny": tiny_app(tiny, out, rev="v2")}))[STATE]
        roots.settimeout(0.5)
        received = b""
        with contextlib.suppress(TimeoutError):
            while True:
                conn, _ = roots.accept()
                received += conn.recv(65536)
    finally:
        roots.close()
        # The deployment's own socket back: the fixture stops its supervisord through it.
        as_user(host.user, "mv", "-fT", str(sock) + ".moved", str(sock))
    assert state["result"] is False
    assert state["comment"].startswith("deployments:tiny: ") and "not the deployment's user" in state["comment"], state
    assert received == b"", "root sent its XML-RPC to a socket the user pointed it at"
    assert report(out)["version"] == "1", "the old release keeps serving"


def test_a_socket_that_never_answers_fails_the_apply_within_the_timeout(host, tiny, out):
    host.apply(host.pillar({"tiny": tiny_app(tiny, out, programs=["a", "b"])}))
    # What an apply takes on this machine now (the no-op): the bound below is that plus the timeout.
    started = time.monotonic()
    host.apply(host.pillar({"tiny": tiny_app(tiny, out, programs=["a", "b"])}))
    baseline = time.monotonic() - started
    p = host.paths("tiny")
    sock = host.sf.saltfleet_paths.generation(p, host.sf.saltfleet_supervisor.serving(p))["socket"]
    as_user(host.user, "mv", str(sock), str(sock) + ".moved")
    silent = subprocess.Popen(
        [
            "python3",
            "-c",
            "import socket,sys,time; s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(8)\n"
            "conns=[]\nwhile True: conns.append(s.accept())",
            str(sock),
        ],
        user=host.user.pw_uid,
        group=host.user.pw_gid,
    )
    try:
        wait_for(sock.exists, 10, "the silent listener bound the socket", interval=0.05)
        changed = tiny_app(tiny, out, programs=["a", "b"])
        changed["programs"]["b"]["stopwaitsecs"] = 3
        started = time.monotonic()
        state = host.apply(host.pillar({"tiny": changed}))[STATE]
        took = time.monotonic() - started
    finally:
        silent.kill()
        as_user(host.user, "mv", "-fT", str(sock) + ".moved", str(sock))
    assert state["result"] is False
    assert state["comment"].startswith("deployments:tiny: "), state
    timeout = int(re.search(r"did not answer within (\d+) s", state["comment"]).group(1))
    # One question timed out, then the state gave up: not a timeout per question, nor a retry loop.
    bound = 2 * baseline + timeout + 5
    assert took < bound, f"the apply took {took:.0f} s: a no-op takes {baseline:.0f} s, the timeout is {timeout} s"


def test_the_boot_line_brings_the_serving_release_back_as_cron_runs_it(host, tiny, out):
    host.apply(host.pillar({"tiny": tiny_app(tiny, out)}))
    # An upgrade first: the release that serves at the reboot is another generation's than the first.
    upgraded = host.apply(host.pillar({"tiny": tiny_app(tiny, out, rev="v2")}))
    assert upgraded[STATE]["result"] is True, upgraded[STATE]
    p = host.paths("tiny")
    serving = host.sf.saltfleet_supervisor.serving(p)
    assert serving != "1"
    wait_for(lambda: not host.loaders.modules.deployment.status("tiny")["tiny"]["draining"], 60, "the v1 drain ended")
    boot = host.root / "etc" / "cron.d" / "saltfleet-tiny"
    lines = boot.read_text().splitlines()
    reboot = [line for line in lines if line.startswith("@reboot ")]
    assert len(reboot) == 1
    env = dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith(("#", "@")))
    user, command = reboot[0].split()[1], reboot[0].split()[2:]
    # A reboot: every process of the deployment is gone. Its supervisord leads a session of its
    # own, with its programs in it (not every process of the user: other tests' deployments run
    # as the same user meanwhile).
    old = report(out)["pid"]
    supervisord = int(host.sf.saltfleet_paths.generation(p, serving)["pidfile"].read_text())
    assert os.getsid(supervisord) == supervisord
    subprocess.run(["pkill", "-KILL", "-s", str(supervisord)], check=True)
    wait_for(lambda: gone(old) and gone(supervisord), 10, "the deployment's processes killed")
    (out / "a.json").unlink()
    # cron runs the line as the user it names, with the file's environment and / as its directory.
    account = __import__("pwd").getpwnam(user)
    subprocess.run(command, env=env, cwd="/", user=account.pw_uid, group=account.pw_gid, check=True)
    wait_for((out / "a.json").exists, 30, "the program started by the boot line")
    assert report(out)["user"] == host.user.pw_name and report(out)["version"] == "2"
    status = host.loaders.modules.deployment.status
    wait_for(lambda: status("tiny")["tiny"]["programs"] == {"a": "RUNNING"}, 30, "the program RUNNING")
    status = status("tiny")["tiny"]
    assert status["supervisord"] == "running", status
    assert status["release"] == tiny["shas"]["v2"]
    assert host.sf.saltfleet_supervisor.serving(p) == serving
    again = host.apply(host.pillar({"tiny": tiny_app(tiny, out, rev="v2")}))
    assert again[STATE]["changes"] == {}


def test_what_root_starts_for_the_user_has_the_users_groups_alone(host, tiny, out):
    """A minion started from sudo or a login shell may carry root's groups (0, disk): none of them reach the user."""
    host.apply(host.pillar({"tiny": tiny_app(tiny, out)}))
    p = host.paths("tiny")
    disk = grp.getgrnam("disk").gr_gid
    log, probe = p["logs"] / "groups.log", short_tmpdir("sfg-", owner=host.user) / "groups"
    saved = os.getgroups()
    os.setgroups([0, disk])
    try:
        ran = host.sf.saltfleet_user.run(host.user.pw_name, ["id", "-G"], p["home"])
        host.sf.saltfleet_user.spawn(host.user.pw_name, ["sh", "-c", f"id -G > {probe}"], p["home"], log)
    finally:
        os.setgroups(saved)
    own = sorted(os.getgrouplist(host.user.pw_name, host.user.pw_gid))
    assert sorted(map(int, ran.stdout.split())) == own
    wait_for(lambda: probe.exists() and probe.read_text().strip(), 10, "the spawned process's groups")
    assert sorted(map(int, probe.read_text().split())) == own


def test_root_never_enters_the_users_tree_for_them(host, tiny, out, short_tmp):
    """
    The release swapped for a link to a folder only root may enter: started in
    there, the user's command would read what it holds by relative paths.
    """
    host.apply(host.pillar({"tiny": tiny_app(tiny, out)}))
    closed = short_tmp / "closed"
    closed.mkdir(mode=0o700)
    (closed / "inside").write_text("ROOT-DIR-SECRET\n")
    (closed / "inside").chmod(0o644)
    release = host.paths("tiny")["releases"] / tiny["shas"]["v1"]
    as_user(host.user, "mv", str(release), str(release) + ".away")
    as_user(host.user, "ln", "-s", str(closed), str(release))
    try:
        ran = host.loaders.modules.deployment.run("tiny", "cat inside")
    finally:
        as_user(host.user, "rm", str(release))
        as_user(host.user, "mv", str(release) + ".away", str(release))
    assert "ROOT-DIR-SECRET" not in ran["stdout"], ran
    assert ran["retcode"] != 0 and "can't cd to" in ran["stderr"], ran


def test_a_deployments_config_and_mirror_are_no_one_elses(host, tiny, out):
    """Not readable by another account of the user's primary group (users shared by many), nor by others."""
    host.apply(host.pillar({"tiny": tiny_app(tiny, out, env={"TINYAPP_OUT": str(out), "API_TOKEN": "tok-77c1"})}))
    p = host.paths("tiny")
    nobody = pwd.getpwnam("nobody")
    neighbour = {"user": nobody.pw_uid, "group": host.user.pw_gid, "extra_groups": []}

    def reads(*argv):
        return subprocess.run(argv, capture_output=True, text=True, check=False, **neighbour)

    assert reads("cat", str(p["conf"])).returncode != 0
    assert reads("git", "clone", "-q", "--bare", str(p["mirror"]), "/tmp/neighbour.git").returncode != 0
    assert not os.path.exists("/tmp/neighbour.git")
    for path in p["state"].iterdir():
        assert "tok-77c1" not in (reads("cat", str(path)).stdout or ""), path


def test_removal_deletes_the_users_part_as_the_user_however_deep(host, tiny, out):
    host.apply(host.pillar({"tiny": tiny_app(tiny, out)}))
    p = host.paths("tiny")
    nest = "import os, sys\nos.chdir(sys.argv[1])\nfor _ in range(1500):\n    os.mkdir('d')\n    os.chdir('d')\n"
    as_user(host.user, "python3", "-c", nest, str(p["run"]))
    states = host.apply(host.pillar({}))
    removed = states["saltfleet-deployment-tiny-removed"]
    assert removed["result"] is True, removed
    assert not p["state"].exists()
    assert host.loaders.modules.deployment.list() == []
