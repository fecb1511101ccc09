"""
A private app repository reached over a real SSH server on 127.0.0.1 with a
deploy key and a pinned host key, both from pillar, converged through a real
salt-master and two salt-minions with the real `salt` CLI, the deployment
running as an unprivileged user.

The secret-handling standard under test: secrets come from pillar only, are
written 0600 for the one that needs them (root, who runs git), never appear
in a process's arguments, a log or the repo, and reach only the minions that
pillar targets.

The first deploy happens once (module fixture ``deployed``); every test
starts from that deployed host and leaves it as it found it.
"""

import copy
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml
from saltfactories.utils import random_string

from localfleet.config import saltfleet_utils, stop_deployments
from tests.apps import celery_client, run_task, sample_repo
from tests.conftest import sandbox_root, short_tmpdir, snapshot
from tests.integration import gitssh

NAME = "sf-private"
STATE_ID = f"saltfleet-deployment-{NAME}"
utils = saltfleet_utils()


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def keys():
    """The deploy key pair, generated for this run only (never written into the repository)."""
    deploy = gitssh.generate_key()
    text = gitssh.private_text(deploy)
    return {
        "key": deploy,
        "text": text,
        "fragments": gitssh.secret_fragments(text, gitssh.private_text(gitssh.generate_key())),
    }


@pytest.fixture(scope="module")
def sandbox(deploy_user):
    root = sandbox_root("sfk-", deploy_user)
    other_root = sandbox_root("sfk-b-", deploy_user)
    data = short_tmpdir("sfkd-", owner=deploy_user)
    for folder in ("queue", "control", "results", "processed"):
        (data / folder).mkdir()
        shutil.chown(data / folder, deploy_user.pw_uid, deploy_user.pw_gid)
    repo, shas = sample_repo(short_tmpdir("sfkr-"))
    yield {"root": root, "other_root": other_root, "data": data, "repo": repo, "shas": shas, "user": deploy_user}
    stop_deployments(root, timeout=30)
    for path in (root, other_root, data, repo.parent):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def git_server(sandbox, keys):
    with gitssh.GitSSHServer(sandbox["repo"], keys["key"], user="git") as server:
        yield server


@pytest.fixture(scope="module")
def pillar(sandbox, host_settings, keys, git_server):
    return {
        "saltfleet": {**host_settings, "root": str(sandbox["root"]), "user": sandbox["user"].pw_name},
        "deployments": {
            NAME: {
                "repo": git_server.url,
                "rev": "v1",
                "deploy_key": keys["text"],
                "known_hosts": git_server.known_hosts,
                "env": {"SAMPLEAPP_DATA": str(sandbox["data"])},
                "programs": {
                    "worker": {
                        "command": f"celery -A sampleapp worker -Q {NAME} -c 1 -n {NAME}@%%h",
                        "startsecs": 2,
                        "stopwaitsecs": 10,
                    }
                },
            }
        },
    }


@pytest.fixture(scope="module")
def other_pillar(sandbox):
    """The second minion's pillar: a host of the fleet, no deployment assigned."""
    return {"saltfleet": {"root": str(sandbox["other_root"]), "user": sandbox["user"].pw_name}}


def _minion(salt_master, prefix):
    # debug: whatever saltfleet and GitPython log about git runs lands in the log file.
    return salt_master.salt_minion_daemon(random_string(prefix), overrides={"log_level_logfile": "debug"})


@pytest.fixture(scope="module")
def minion(salt_master):
    factory = _minion(salt_master, "minion-key-")
    with factory.started(start_timeout=120):
        yield factory


@pytest.fixture(scope="module")
def other_minion(salt_master):
    factory = _minion(salt_master, "minion-nokey-")
    with factory.started(start_timeout=120):
        yield factory


@pytest.fixture(scope="module")
def fleet(salt_master, minion, other_minion, salt_cli, pillar_dir, other_pillar):
    """Both minions synced; pillar assigns the deployment to `minion` only."""
    for m in (minion, other_minion):
        ret = salt_cli.run("saltutil.sync_all", minion_tgt=m.id)
        assert ret.returncode == 0, ret

    class Fleet:
        outputs = []  # every salt CLI output of this module, checked for the key at the end

        def write_pillar(self, data):
            pillar_dir.mkdir(parents=True, exist_ok=True)
            top = {"base": {minion.id: ["keyed"], other_minion.id: ["unkeyed"]}}
            (pillar_dir / "top.sls").write_text(yaml.safe_dump(top))
            (pillar_dir / "keyed.sls").write_text(yaml.safe_dump(data))
            (pillar_dir / "unkeyed.sls").write_text(yaml.safe_dump(other_pillar))
            for m in (minion, other_minion):
                self.run("saltutil.refresh_pillar", "wait=True", tgt=m)

        def run(self, *args, tgt=minion, **kwargs):
            ret = salt_cli.run(*args, minion_tgt=tgt.id, **kwargs)
            self.outputs.append(ret)
            return ret

        def apply(self, data, test=False, tgt=minion, check=True):
            self.write_pillar(data)
            ret = self.run("state.apply", *(["test=True"] if test else []), tgt=tgt, _timeout=900)
            assert isinstance(ret.data, dict), ret
            states = {state["__id__"]: state for state in ret.data.values()}
            if check:
                assert all(s["result"] is not False for s in states.values()), states
            return ret, states

        def status(self):
            return self.run("deployment.status").data

    return Fleet()


@pytest.fixture(scope="module")
def tasks(sandbox):
    return celery_client(sandbox["data"])


@pytest.fixture(scope="module")
def deployed(fleet, pillar, sandbox, git_server, keys):
    """
    The host after its first deploy, and what that took: the dry run before
    it (on the fresh host), the real run, and the SSH clients seen meanwhile.
    """
    before = snapshot(sandbox["root"])
    dry_before = dry_dirs()
    served = len(git_server.served)
    dry_ret, dry = fleet.apply(pillar, test=True)
    after_dry = snapshot(sandbox["root"])
    dry_clients = ssh_clients(git_server, served)
    served, attempts = len(git_server.served), len(git_server.auth_attempts)
    real_ret, real = fleet.apply(pillar)
    return {
        "untouched_by_dry_run": before == after_dry,
        "dry_dirs_left": dry_dirs() - dry_before,
        "dry": (dry_ret, dry),
        "dry_clients": dry_clients,
        "real": (real_ret, real),
        "real_clients": ssh_clients(git_server, served),
        "auth_attempts": git_server.auth_attempts[attempts:],
    }


# ------------------------------------------------------------------- helpers


def paths(sandbox):
    return utils.saltfleet_paths.paths(sandbox["root"], sandbox["user"].pw_name, NAME)


def changes_of(states):
    return {sid: s["changes"] for sid, s in states.items()}


def leaks(text, fragments):
    """The fragments of the private key found in text."""
    return [f for f in fragments if f in text]


def files_holding(folder, fragments):
    """Files under folder whose bytes hold any fragment of the key."""
    needles = [f.encode() for f in fragments]
    found = []
    for dirpath, _, filenames in os.walk(folder):
        for entry in filenames:
            path = Path(dirpath, entry)
            if path.is_symlink() or not path.is_file():
                continue
            try:
                data = path.read_bytes()
            except OSError:
                continue
            if any(n in data for n in needles):
                found.append(path)
    return found


def ssh_clients(git_server, since=0):
    """argv of the ssh clients alive while the server served fetches (from index `since`)."""
    found = []
    for served in git_server.served[since:]:
        for proc in served["processes"]:
            argv = proc["argv"]
            if argv and Path(argv[0]).name == "ssh" and "git@127.0.0.1" in argv:
                found.append(argv)
    return found


def option(argv, name):
    """The values of `-o name=value` in an ssh argv."""
    return [a.split("=", 1)[1] for a in argv if a.startswith(f"{name}=")]


def dry_dirs():
    return set(Path(tempfile.gettempdir()).glob("saltfleet-dry-*"))


def worker_pids(p, sandbox):
    sock = utils.saltfleet_paths.generation(p, utils.saltfleet_supervisor.serving(p))["socket"]
    return {i["name"]: i["pid"] for i in utils.saltfleet_supervisor.process_info(sock, sandbox["user"].pw_uid)}


# --------------------------------------------------------------------- tests


def test_ssh_server_serves_the_repo_to_the_deploy_key_only(git_server, keys, sandbox, short_tmp):
    """The fixture is a real, strict git server: the deploy key reads, another key or command does not."""
    kh = short_tmp / "known_hosts"
    kh.write_text(git_server.known_hosts + "\n")
    results = {}
    for label, key in (("deploy", keys["key"]), ("stranger", gitssh.generate_key())):
        key_file = short_tmp / f"{label}_key"
        key_file.write_text(gitssh.private_text(key))
        key_file.chmod(0o600)
        ssh = f"ssh -i {key_file} -o IdentitiesOnly=yes -o BatchMode=yes -o UserKnownHostsFile={kh}"
        env = dict(os.environ, GIT_SSH_COMMAND=ssh, GIT_TERMINAL_PROMPT="0")
        results[label] = subprocess.run(
            ["git", "ls-remote", "--", git_server.url], env=env, capture_output=True, text=True, timeout=60, check=False
        )
    assert results["deploy"].returncode == 0, results["deploy"]
    assert f"{sandbox['shas']['v1']}\trefs/tags/v1" in results["deploy"].stdout
    assert results["stranger"].returncode != 0
    assert "Permission denied (publickey)" in results["stranger"].stderr

    ssh = ["ssh", "-i", str(short_tmp / "deploy_key"), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes"]
    shell = subprocess.run(
        [*ssh, "-o", f"UserKnownHostsFile={kh}", "-p", str(git_server.port), "git@127.0.0.1", "cat /etc/passwd"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shell.returncode != 0 and "root:" not in shell.stdout
    assert git_server.refused == ["cat /etc/passwd"]


def test_dry_run_on_fresh_host_reports_changes_and_writes_no_key(deployed, sandbox, keys):
    ret, states = deployed["dry"]
    state = states[STATE_ID]
    assert state["result"] is None, state
    assert state["changes"]["secrets"] == ["deploy_key", "known_hosts"]
    assert state["changes"]["release"] == {"old": None, "new": sandbox["shas"]["v1"]}
    assert state["changes"]["supervisord"] == {"old": "stopped", "new": "running"}
    assert "deploy_key, known_hosts would be written" in state["comment"]
    assert deployed["untouched_by_dry_run"], "test=True changed the host"
    assert deployed["dry_dirs_left"] == set(), "the dry run left its temporary copy of the key behind"
    assert not leaks(ret.stdout + ret.stderr, keys["fragments"])
    # The dry run really asked the private remote, through a throwaway copy of the key.
    assert deployed["dry_clients"], "the dry run never reached the SSH server"
    for argv in deployed["dry_clients"]:
        key_path = Path(argv[argv.index("-i") + 1])
        assert not key_path.is_relative_to(sandbox["root"])
        assert not key_path.exists(), "the dry run's key copy outlived the run"


def test_deploys_private_repo_with_key_written_0600(deployed, sandbox, keys, git_server, tasks):
    ret, states = deployed["real"]
    state = states[STATE_ID]
    assert state["result"] is True, state
    assert {sid: s["changes"] for sid, s in states.items()} == {
        sid: s["changes"] for sid, s in deployed["dry"][1].items()
    }, "test=True reported other changes than the real run made"
    assert run_task(tasks, NAME)["version"] == "1"
    p = paths(sandbox)
    assert (p["project"] / "sampleapp.py").read_text().count('VERSION = "1"') == 1
    for key, text in (("deploy_key", keys["text"]), ("known_hosts", git_server.known_hosts + "\n")):
        assert p[key].read_text() == text
        assert p[key].stat().st_mode & 0o777 == 0o600
        assert p[key].stat().st_uid == 0, "root's, who runs git"
    assert p["state"].stat().st_mode & 0o777 == 0o711
    # The host's fetch went through ssh with the key's *path* and the pinned host keys; the master's
    # ls-remote (resolving the rev for the fleet) through a throwaway copy that is gone after.
    host_clients = [a for a in deployed["real_clients"] if a[a.index("-i") + 1] == str(p["deploy_key"])]
    assert host_clients, "the deployment never fetched through the SSH server with its key"
    for argv in deployed["real_clients"]:
        assert option(argv, "StrictHostKeyChecking") == ["yes"]
        assert option(argv, "IdentitiesOnly") == ["yes"]
        if argv in host_clients:
            assert option(argv, "UserKnownHostsFile") == [str(p["known_hosts"])]
        else:
            key_path = Path(argv[argv.index("-i") + 1])
            assert not key_path.is_relative_to(sandbox["root"]) and not key_path.exists(), argv
    assert deployed["auth_attempts"] and all(a["user"] == "git" and a["accepted"] for a in deployed["auth_attempts"])
    assert not leaks(ret.stdout + ret.stderr, keys["fragments"])


def test_key_appears_in_no_return_log_config_or_process(
    deployed, fleet, pillar, sandbox, keys, git_server, minion, salt_master
):
    # Dry run and real run on the deployed host (the master resolved rev for the fleet: no fetch needed).
    _, dry_states = fleet.apply(pillar, test=True)
    _, real_states = fleet.apply(pillar)
    assert all(s["result"] is True for s in real_states.values()), real_states
    assert {sid: s["changes"] for sid, s in real_states.items()} == {sid: {} for sid in real_states}
    assert {sid: s["changes"] for sid, s in dry_states.items()} == {sid: {} for sid in dry_states}
    fragments = keys["fragments"]
    for ret in fleet.outputs:
        assert not leaks(ret.stdout + ret.stderr, fragments), ret.cmdline
    log_file = Path(minion.config["log_file"])
    assert "git" in log_file.read_text(errors="replace")
    assert not leaks(log_file.read_text(errors="replace"), fragments)
    assert files_holding(minion.config["root_dir"], fragments) == []
    assert not leaks(Path(salt_master.config["log_file"]).read_text(errors="replace"), fragments)
    assert files_holding(Path(salt_master.config["cachedir"]) / "jobs", fragments) == []
    # On the host: the key file, and nothing else (supervisord.conf, manifest, the checkout, logs).
    p = paths(sandbox)
    assert not leaks(p["conf"].read_text(), fragments)
    assert files_holding(sandbox["root"], fragments) == [p["deploy_key"]]
    # No process carried the key in its argv or environment while fetches ran.
    assert git_server.served and all(served["processes"] for served in git_server.served)
    for served_fetch in git_server.served:
        hidden = [proc["pid"] for proc in served_fetch["processes"] if proc["argv"] is None]
        assert hidden in ([], [1]), f"processes root could not read: {hidden}"
        for proc in served_fetch["processes"]:
            if proc["argv"] is None:
                continue
            assert not leaks("\0".join(proc["argv"]), fragments), proc["argv"]
            assert not leaks("\0".join(proc["environ"]), fragments), proc["pid"]
    git_ssh = [
        e.split("=", 1)[1]
        for served_fetch in git_server.served
        for proc in served_fetch["processes"]
        for e in proc["environ"] or []
        if e.startswith("GIT_SSH_COMMAND=") and str(p["deploy_key"]) in e
    ]
    assert git_ssh, "no git process with saltfleet's GIT_SSH_COMMAND was seen during a fetch"


def known_hosts_of_root():
    path = Path(os.path.expanduser("~root")) / ".ssh" / "known_hosts"
    return path.read_text() if path.exists() else None


def test_wrong_host_key_fails_clearly_and_keeps_serving(deployed, fleet, pillar, sandbox, keys, git_server):
    p = paths(sandbox)
    impostor = f"[127.0.0.1]:{git_server.port} {gitssh.public_line(gitssh.generate_key())}"
    bad = copy.deepcopy(pillar)
    bad["deployments"][NAME]["known_hosts"] = impostor
    serving = os.readlink(p["project"])
    conf, manifest = p["conf"].read_text(), p["manifest"].read_text()
    pids = worker_pids(p, sandbox)
    # The impostor's pin in pillar first: what the master resolved with the good pin before is not counted.
    fleet.write_pillar(bad)
    attempts = len(git_server.auth_attempts)
    served = len(git_server.served)
    learned = known_hosts_of_root()
    for test in (True, False):
        ret, states = fleet.apply(bad, test=test, check=False)
        state = states[STATE_ID]
        assert state["result"] is False, state
        comment = state["comment"]
        assert comment.startswith(
            f"deployments:{NAME}:known_hosts: the SSH host key of {git_server.url} does not match"
        )
        assert "Host key verification failed" in comment
        assert f"update deployments:{NAME}:known_hosts in pillar" in comment
        assert "@@@" not in comment and "\r" not in comment
        assert state["changes"] == {}
        assert not leaks(ret.stdout + ret.stderr, keys["fragments"])
    # The key was never offered to a host that could not prove it is the pinned one...
    assert len(git_server.auth_attempts) == attempts
    # ...ssh was told to check strictly, and learned no key on its own.
    assert ssh_clients(git_server, served) == [] or all(
        option(argv, "StrictHostKeyChecking") == ["yes"] for argv in ssh_clients(git_server, served)
    )
    assert known_hosts_of_root() == learned
    # Nothing that serves changed.
    assert os.readlink(p["project"]) == serving
    assert p["conf"].read_text() == conf
    assert p["manifest"].read_text() == manifest
    assert worker_pids(p, sandbox) == pids
    assert p["known_hosts"].stat().st_mode & 0o777 == 0o600
    # Pinning the right key again converges, and only the pin changes.
    _, states = fleet.apply(pillar)
    assert states[STATE_ID]["changes"] == {"secrets": ["known_hosts"]}
    assert p["known_hosts"].read_text() == git_server.known_hosts + "\n"
    assert worker_pids(p, sandbox) == pids


def test_rotated_pin_is_written_when_rev_is_the_serving_sha(deployed, fleet, pillar, sandbox, keys, git_server):
    """
    Pillar pins the SHA that serves (no git needed) and the operator rotates
    known_hosts: the new pin is written, 0600, the rev recorded (grains say
    which rev the host follows), and the next apply is quiet.
    """
    p = paths(sandbox)
    rotated = copy.deepcopy(pillar)
    rotated["deployments"][NAME]["rev"] = sandbox["shas"]["v1"]
    alias = f"[localhost]:{git_server.port} {gitssh.public_line(git_server.host_key)}"
    rotated["deployments"][NAME]["known_hosts"] = f"{git_server.known_hosts}\n{alias}\n"
    pids = worker_pids(p, sandbox)
    try:
        _, dry = fleet.apply(rotated, test=True)
        assert dry[STATE_ID]["result"] is None, dry[STATE_ID]
        recorded = {"rev": {"old": "v1", "new": sandbox["shas"]["v1"]}}
        assert dry[STATE_ID]["changes"] == {"secrets": ["known_hosts"], **recorded}
        assert p["known_hosts"].read_text() == git_server.known_hosts + "\n", "test=True wrote the pin"
        _, real = fleet.apply(rotated)
        assert real[STATE_ID]["changes"] == {"secrets": ["known_hosts"], **recorded}
        assert p["known_hosts"].read_text() == rotated["deployments"][NAME]["known_hosts"]
        assert p["known_hosts"].stat().st_mode & 0o777 == 0o600
        _, again = fleet.apply(rotated)
        assert {sid: s["changes"] for sid, s in again.items()} == {sid: {} for sid in again}
        assert worker_pids(p, sandbox) == pids, "rotating a pin restarts nothing"
    finally:
        fleet.apply(pillar)


def test_minion_pillar_does_not_target_gets_no_key(deployed, fleet, pillar, sandbox, keys, minion, other_minion):
    fleet.write_pillar(pillar)
    keyed = fleet.run("pillar.keys", f"deployments:{NAME}")
    assert "deploy_key" in keyed.data, keyed
    items = fleet.run("pillar.items", tgt=other_minion)
    assert isinstance(items.data, dict), items
    assert "deployments" not in items.data
    assert "deploy_key" not in items.stdout
    assert not leaks(items.stdout, keys["fragments"])
    _, states = fleet.apply(pillar, tgt=other_minion)
    assert all(s["result"] is True for s in states.values()), states
    assert not any(sid.startswith("saltfleet-deployment-") for sid in states)
    assert not list(sandbox["other_root"].rglob("deploy_key"))
    assert files_holding(sandbox["other_root"], keys["fragments"]) == []
    assert files_holding(other_minion.config["root_dir"], keys["fragments"]) == []
    assert fleet.run("deployment.status", tgt=other_minion).data == {}
    assert fleet.status()[NAME]["programs"] == {"worker": "RUNNING"}


def test_a_minion_cannot_read_another_minions_mine(deployed, fleet, minion, other_minion, salt_run_cli):
    assert fleet.run("mine.send", "deployment.status").data is True
    # The master keeps the row (fleet.inventory reads it from its cache)...
    cached = salt_run_cli.run("cache.fetch", "mine", minion.id)
    assert NAME in (cached.data or {}).get("deployment.status", {}), cached
    # ...and refuses it to every minion, the one that sent it included.
    for asker in (other_minion, minion):
        got = fleet.run("mine.get", minion.id, "deployment.status", tgt=asker)
        assert got.returncode == 0 and got.data == {}, got
