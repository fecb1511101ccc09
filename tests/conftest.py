"""Fixtures shared by every test: the repository, the master settings, sandboxes."""

import hashlib
import importlib.metadata
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from localfleet.config import REPO, master_config

# uv's cache is shared by every sandbox of a run (and by `make demo`).
os.environ.setdefault("UV_CACHE_DIR", str(REPO / ".cache" / "uv"))


@pytest.hookimpl(hookwrapper=True)
def pytest_sessionstart(session):
    """salt-factories' log server binds every interface by default; nothing here listens beyond loopback."""
    log_server = session.config.pluginmanager.get_plugin("saltfactories-log-server")
    if log_server is not None:
        log_server.log_host = "127.0.0.1"
    yield


def pytest_terminal_summary(terminalreporter):
    """What tests measured for people to read (``record_property("report", ...)``), after the run's summary."""
    lines = [
        f"{report.nodeid}: {value}"
        for report in terminalreporter.stats.get("passed", [])
        for name, value in report.user_properties
        if name == "report"
    ]
    if lines:
        terminalreporter.section("measured")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def event_listener():
    """salt-factories' event listener, on loopback only."""
    from saltfactories.plugins.event_listener import EventListener

    listener = EventListener()
    listener.host = "127.0.0.1"
    listener.address = f"tcp://127.0.0.1:{listener.port}"
    with listener:
        yield listener


@pytest.fixture(scope="session")
def repo_root():
    return REPO


@pytest.fixture(scope="session")
def saltfleet_master_config():
    """Overrides for a salt-factories master: saltfleet's file, pillar and module dirs."""
    return master_config()


# The non-root users deployments run as in the tests, as `ubuntu` does on a real host: a second
# one for a second deployment of one host (a deployment's user is the unit of its isolation).
DEPLOY_USER, SECOND_USER = "sfdeploy", "sfdeploy2"


def gone(pid):
    """True when pid no longer runs (a zombie waits for its parent, init here, to reap it: it runs no more)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for(check, timeout, what, logs=(), interval=0.5):
    """``check()``'s first true result within ``timeout`` s; else fail with ``what`` and the tails of ``logs``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            tails = "".join(f"\n--- {log}:\n{log.read_text(errors='replace')[-2000:]}" for log in logs if log.exists())
            pytest.fail(f"{what} within {timeout} s{tails}")
        time.sleep(interval)


def short_tmpdir(prefix, owner=None):
    """
    A directory with a short path (supervisord's unix socket paths must stay
    under 108 bytes), readable by everyone, or owned by ``owner`` (a passwd entry).
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    if owner is not None:
        os.chown(path, owner.pw_uid, owner.pw_gid)
    return path


def broker_folder(owner, prefix="sfd-"):
    """The sample app's broker and result folders, which ``owner``'s workers and the test share."""
    data = short_tmpdir(prefix, owner=owner)
    for folder in ("queue", "control", "results", "processed"):
        (data / folder).mkdir()
        shutil.chown(data / folder, owner.pw_uid, owner.pw_gid)
    return data


def test_user(name):
    """A real unprivileged user, made when missing (a system account, kept: other test runs may use it)."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        # Two test processes (pytest-xdist) may both find it missing: the one that loses the race finds it made.
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/bin/sh", name], check=False)
    return pwd.getpwnam(name)


@pytest.fixture(scope="session")
def deploy_user():
    """The user whose deployments the tests converge."""
    return test_user(DEPLOY_USER)


@pytest.fixture(scope="session")
def second_user():
    """The user of a second deployment on one host."""
    return test_user(SECOND_USER)


@pytest.fixture(scope="session")
def user_uv_cache(deploy_user):
    """uv's cache of the deployment user, shared by every sandbox of the run (the user builds the venvs)."""
    path = short_tmpdir("sf-uv-", owner=deploy_user)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def second_uv_cache(second_user):
    """uv's cache of the second user."""
    path = short_tmpdir("sf-uv-", owner=second_user)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _as_user(user, argv):
    """``argv`` run as ``user`` (passwd entry) with only the user's own group, as saltfleet runs them."""
    return subprocess.run(
        argv, user=user.pw_uid, group=user.pw_gid, extra_groups=[], cwd="/", capture_output=True, text=True, check=False
    )


@pytest.fixture(scope="session")
def host_tools(deploy_user):
    """
    uv and supervisord as a host has them: root's, in a folder every user may
    read (/usr/local/bin on a real host), wherever the checkout lies. The
    deployment's user runs uv, and supervisord goes on importing after it
    drops to that user: neither may live in a checkout other users cannot
    enter (a clone in root's 0700 home).
    """
    python = os.path.realpath(sys.executable)
    if _as_user(deploy_user, [python, "-c", ""]).returncode:
        pytest.exit(
            f"{python} (the venv's Python) cannot be run by other users, whom the deployments run as; "
            "make the venv from a Python outside any private home: make clean test VENV_PYTHON=/usr/bin/python3.11",
            returncode=4,
        )
    base = short_tmpdir("sf-tools-")
    bin_dir = base / "bin"
    bin_dir.mkdir()
    uv = shutil.copy2(Path(sys.executable).parent / "uv", bin_dir / "uv")
    venv = base / "supervisor"
    subprocess.run([uv, "venv", "-q", "-p", python, venv], check=True, capture_output=True)
    package = f"supervisor=={importlib.metadata.version('supervisor')}"
    install = [uv, "pip", "install", "-q", "-p", venv / "bin" / "python", package]
    if subprocess.run([*install, "--offline"], capture_output=True, check=False).returncode:
        subprocess.run(install, check=True, capture_output=True)
    tools = {"uv": str(uv), "supervisord": str(venv / "bin" / "supervisord")}
    for tool in tools.values():
        ran = _as_user(deploy_user, [tool, "--version"])
        assert ran.returncode == 0, f"{tool} does not run as {deploy_user.pw_name}: {ran.stderr}"
    yield tools
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def host_settings(deploy_user, user_uv_cache, host_tools):
    """Pillar ``saltfleet`` of every test host but its root: the deployment user, uv's cache, the host's tools."""
    return {"user": deploy_user.pw_name, "uv_cache": str(user_uv_cache), **host_tools}


def sandbox_root(prefix, user):
    """A host root for deployments: root's, with the user's home in it (the user's, as useradd -m makes it)."""
    root = short_tmpdir(prefix)
    home = root / "home" / user.pw_name
    home.mkdir(parents=True)
    os.chown(home, user.pw_uid, user.pw_gid)
    return root


@pytest.fixture
def short_tmp():
    path = short_tmpdir("sf-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def snapshot(root):
    """Every path under root with its owner, mode and content digest (link targets for links)."""
    tree = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for entry in sorted(dirnames + filenames):
            path = os.path.join(dirpath, entry)
            st = os.lstat(path)
            if os.path.islink(path):
                tree[path] = (st.st_uid, "link", os.readlink(path))
            elif os.path.isfile(path):
                with open(path, "rb") as fh:
                    tree[path] = (st.st_uid, oct(st.st_mode), hashlib.sha256(fh.read()).hexdigest())
            else:
                tree[path] = (st.st_uid, oct(st.st_mode), None)
    return tree
