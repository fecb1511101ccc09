"""
Deployments converged through a real salt-master and salt-minion with the real
`salt` CLI: checkout, virtualenv, own supervisord with Celery workers that
consume tasks, sysfiles, upgrade, failures that keep the old release serving,
invalid pillar, dry runs, removal.

The tests in this module build on one another (one sandbox host, one master),
in file order.
"""

import copy
import getpass
import os
import shutil
import subprocess
import time

import psutil
import pytest

from localfleet.config import saltfleet_utils
from tests.conftest import short_tmpdir, snapshot
from tests.apps import celery_client, run_task, sample_repo
from tests.integration.conftest import write_pillar

sf = saltfleet_utils()
USER = getpass.getuser()
FETCHER, REPORTER = "sf-fetcher", "sf-reporter"


@pytest.fixture(scope="module")
def sandbox(repo_root):
    root = short_tmpdir("sf-")
    data = short_tmpdir("sfd-")
    repo, shas = sample_repo(short_tmpdir("sfr-"))
    yield {"root": root, "data": data, "repo": repo, "shas": shas}
    for name, manifest in sf.installed(root).items():
        p = sf.paths(root, manifest["user"], name)
        sf.stop_generations(p, timeout=30)
    for path in (root, data, repo.parent):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def pillar(sandbox, repo_root):
    return {
        "saltfleet": {"root": str(sandbox["root"]), "user": USER, "uv_cache": str(repo_root / ".cache" / "uv")},
        "deployments": {
            FETCHER: {
                "repo": str(sandbox["repo"]),
                "rev": "v1",
                "env": {"SAMPLEAPP_DATA": str(sandbox["data"])},
                "context": {"platforms": ["alpha", "beta"], "startsecs": 8},
            },
            REPORTER: {
                "repo": str(sandbox["repo"]),
                "rev": "v1",
                "handover": "stop-first",
                "env": {"SAMPLEAPP_DATA": str(sandbox["data"])},
                "programs": {
                    "report": {
                        "command": f"celery -A sampleapp worker -Q {REPORTER} -c 1 -n {REPORTER}@%%h",
                        "stopwaitsecs": 60,
                    }
                },
            },
        },
    }


@pytest.fixture(scope="module")
def host(salt_master, salt_minion, salt_cli, pillar_dir, pillar, sandbox):
    """The minion with saltfleet's modules synced, and a way to apply pillar to it."""
    ret = salt_cli.run("saltutil.sync_all", minion_tgt=salt_minion.id)
    assert ret.returncode == 0, ret

    class Host:
        minion = salt_minion
        root = sandbox["root"]

        def apply(self, data, test=False):
            write_pillar(pillar_dir, data)
            # deployment.status and friends read the minion's in-memory pillar.
            salt_cli.run("saltutil.refresh_pillar", "wait=True", minion_tgt=salt_minion.id)
            args = ["state.apply"] + (["test=True"] if test else [])
            ret = salt_cli.run(*args, minion_tgt=salt_minion.id, _timeout=900)
            assert isinstance(ret.data, dict), ret
            return {state["__id__"]: state for state in ret.data.values()}

        def status(self):
            ret = salt_cli.run("deployment.status", minion_tgt=salt_minion.id)
            return ret.data

    return Host()


@pytest.fixture(scope="module")
def tasks(sandbox):
    return celery_client(sandbox["data"])


def state_of(states, name):
    return states[f"saltfleet-deployment-{name}"]


def paths(sandbox, name):
    return sf.paths(sandbox["root"], USER, name)


def changes_of(states):
    return {sid: s["changes"] for sid, s in states.items()}


def program_pids(p):
    return {i["name"]: i["pid"] for i in sf.process_info(p["socket"])}


def exited(pid):
    """True once pid has exited: gone, or a zombie this machine's init has not reaped yet."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_drained(host, name):
    """Wait for the supervisords of a deployment's earlier releases to finish their tasks and exit."""
    draining = [psutil.Process(pid) for pid in host.status()[name]["draining"]]
    _, alive = psutil.wait_procs(draining, timeout=90)
    assert not alive
    assert host.status()[name]["draining"] == []


def test_two_deployments_run_their_own_workers(host, pillar, sandbox, tasks):
    before = snapshot(sandbox["root"])
    dry = host.apply(pillar, test=True)
    assert snapshot(sandbox["root"]) == before, "test=True changed the host"
    states = host.apply(pillar)
    assert all(s["result"] for s in states.values()), states
    assert changes_of(states) == changes_of(dry), "the dry run told what the real run did"
    status = host.status()
    assert status[FETCHER]["programs"] == {"fetcher-alpha": "RUNNING", "fetcher-beta": "RUNNING"}
    assert status[REPORTER]["programs"] == {"report": "RUNNING"}
    assert status[FETCHER]["release"] == sandbox["shas"]["v1"]

    # Each worker consumes the tasks of its own queue.
    assert run_task(tasks, f"{FETCHER}.alpha")["version"] == "1"
    assert run_task(tasks, f"{FETCHER}.beta")["version"] == "1"
    assert run_task(tasks, REPORTER)["version"] == "1"

    # Nothing shared: sockets, pidfiles, logs and venvs are per deployment.
    f, r = paths(sandbox, FETCHER), paths(sandbox, REPORTER)
    for key in ("socket", "pidfile", "logs", "venvs", "conf"):
        assert f[key] != r[key]
        assert f[key].exists() and r[key].exists()
    assert int(f["pidfile"].read_text()) != int(r["pidfile"].read_text())
    assert (f["logs"] / "fetcher-alpha.log").exists()
    assert (r["logs"] / "report.log").exists()
    assert not str(f["socket"]).startswith("/tmp/supervisor")

    # The checkout is the app at the pinned revision, the path the seed's users know.
    assert (f["project"] / "sampleapp.py").read_text().count('VERSION = "1"') == 1
    assert (f["project"] / "venv" / "bin" / "celery").exists()

    # Secrets-bearing config is 0600; sysfiles landed under the sandbox root.
    assert f["conf"].stat().st_mode & 0o777 == 0o600
    cron = sandbox["root"] / "etc" / "cron.d" / FETCHER
    assert cron.stat().st_mode & 0o777 == 0o644
    assert f"{USER} {f['project']}/venv/bin/celery" in cron.read_text()
    assert (sandbox["root"] / "etc" / "logrotate.d" / "saltfleet").exists()


def test_second_apply_reports_no_changes(host, pillar):
    states = host.apply(pillar)
    assert all(s["result"] is True for s in states.values()), states
    assert changes_of(states) == {sid: {} for sid in states}


def test_upgrade_dry_run_matches_real_run_and_task_in_flight_completes(host, pillar, sandbox, tasks):
    upgraded = copy.deepcopy(pillar)
    upgraded["deployments"][FETCHER]["rev"] = "v2"
    upgraded["deployments"][FETCHER]["context"]["platforms"] = ["alpha", "beta", "gamma"]
    before = snapshot(sandbox["root"])
    dry = host.apply(upgraded, test=True)
    assert snapshot(sandbox["root"]) == before, "test=True changed the host"
    assert state_of(dry, FETCHER)["result"] is None
    assert state_of(dry, REPORTER)["result"] is True and state_of(dry, REPORTER)["changes"] == {}

    # A slow task is in the hands of the v1 worker while v2 takes over.
    slow = tasks.send_task("sampleapp.fetch", args=("alpha", 40), queue=f"{FETCHER}.alpha")
    deadline = time.monotonic() + 30
    while slow.state != "STARTED" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert slow.state == "STARTED"
    p = paths(sandbox, FETCHER)
    v1_supervisord = int(p["pidfile"].read_text())

    real = host.apply(upgraded)
    assert state_of(real, FETCHER)["result"] is True, state_of(real, FETCHER)
    assert changes_of(real) == changes_of(dry)
    fetcher = state_of(real, FETCHER)["changes"]
    assert fetcher["release"] == {"old": sandbox["shas"]["v1"], "new": sandbox["shas"]["v2"]}
    assert fetcher["programs"] == {"added": ["fetcher-gamma"], "restarted": ["fetcher-alpha", "fetcher-beta"]}
    assert "virtualenv" not in fetcher, "requirements did not change: the venv is reused"
    assert f"in the background (pid {v1_supervisord})" in state_of(real, FETCHER)["comment"]

    # The apply returned once v2 was RUNNING, without waiting for the task in v1's hands:
    # v1's supervisord drains in the background while v2 consumes the same queues.
    assert int(p["pidfile"].read_text()) != v1_supervisord
    # What cron's @reboot line starts (supervisord.conf) is the generation that serves.
    assert os.readlink(p["conf"]) == f"supervisord.{sf.generation(p)}.conf"
    assert host.status()[FETCHER]["draining"] == [v1_supervisord]
    # A Celery worker told to stop takes no new task once its event loop
    # notices (within its 2 s drain cycle); from then on v2 alone consumes.
    time.sleep(5)
    assert run_task(tasks, f"{FETCHER}.alpha")["version"] == "2"
    assert run_task(tasks, f"{FETCHER}.gamma")["version"] == "2"
    assert slow.state == "STARTED", "v2 served alpha while v1 still worked on its task"
    assert slow.get(timeout=90)["version"] == "1", "the task in flight was finished by the old worker"
    # Its task done, the old supervisord exits by itself.
    wait_drained(host, FETCHER)
    assert (p["releases"] / sandbox["shas"]["v1"]).is_dir(), "the previous release is kept"
    pillar["deployments"][FETCHER] = upgraded["deployments"][FETCHER]


def test_stop_first_handover_restarts_in_place(host, pillar, sandbox, tasks):
    p = paths(sandbox, REPORTER)
    supervisord = int(p["pidfile"].read_text())
    before = program_pids(p)
    upgraded = copy.deepcopy(pillar)
    upgraded["deployments"][REPORTER]["rev"] = "v2"
    states = host.apply(upgraded)
    reporter = state_of(states, REPORTER)
    assert reporter["result"] is True, reporter
    assert reporter["changes"]["programs"] == {"restarted": ["report"]}
    # The same supervisord restarted its program: the old one stopped before the new one started.
    assert int(p["pidfile"].read_text()) == supervisord
    assert program_pids(p)["report"] != before["report"]
    assert host.status()[REPORTER]["draining"] == []
    assert run_task(tasks, REPORTER)["version"] == "2"
    pillar["deployments"][REPORTER] = upgraded["deployments"][REPORTER]


@pytest.mark.parametrize(
    ("rev", "message"),
    [
        ("no-such-branch", f"deployments:{FETCHER}:rev: 'no-such-branch' not found in"),
        ("broken-reqs", f"deployments:{FETCHER}:requirements: installing 'requirements.txt' failed"),
        ("crashing", "did not start (fetcher-"),
    ],
)
def test_failed_release_keeps_previous_serving(host, pillar, sandbox, tasks, rev, message):
    p = paths(sandbox, FETCHER)
    serving = os.readlink(p["project"])
    supervisord, pids = int(p["pidfile"].read_text()), program_pids(p)
    bad = copy.deepcopy(pillar)
    bad["deployments"][FETCHER]["rev"] = rev
    states = host.apply(bad)
    fetcher = state_of(states, FETCHER)
    assert fetcher["result"] is False
    assert message in fetcher["comment"]
    assert state_of(states, REPORTER)["result"] is True, "one deployment failing does not stop another"
    assert os.readlink(p["project"]) == serving
    # The serving programs never stopped, and nothing of the failed release is left running.
    assert program_pids(p) == pids
    assert sf.generations(p) == {sf.generation(p): supervisord}
    assert host.status()[FETCHER]["running"] == 3
    assert run_task(tasks, f"{FETCHER}.beta")["version"] == "2"
    if rev == "crashing":
        assert f"rolled back to {sandbox['shas']['v2'][:12]}, which keeps serving" in fetcher["comment"]
    if rev in sandbox["shas"]:
        failed = p["releases"] / sandbox["shas"][rev]
        assert (failed / ".git" / "saltfleet-failed").exists(), "a failed release is kept for inspection"


def test_fixing_pillar_converges(host, pillar, sandbox, tasks):
    rollback = copy.deepcopy(pillar)
    rollback["deployments"][FETCHER]["rev"] = "v1"
    states = host.apply(rollback)
    fetcher = state_of(states, FETCHER)
    assert fetcher["result"] is True, fetcher
    assert fetcher["changes"]["release"]["new"] == sandbox["shas"]["v1"]
    assert "virtualenv" not in fetcher["changes"]
    wait_drained(host, FETCHER)
    assert run_task(tasks, f"{FETCHER}.gamma")["version"] == "1"
    states = host.apply(pillar)
    assert state_of(states, FETCHER)["changes"]["release"]["new"] == sandbox["shas"]["v2"]
    wait_drained(host, FETCHER)
    assert run_task(tasks, f"{FETCHER}.gamma")["version"] == "2"


def _bad(pillar, edit):
    data = copy.deepcopy(pillar)
    edit(data)
    return data


INVALID = {
    "unknown key": (
        lambda d: d["deployments"][FETCHER].update(reqirements="req.txt"),
        f"deployments:{FETCHER}:reqirements: unknown key; did you mean 'requirements'?",
    ),
    "name escapes": (lambda d: d["deployments"].update({"../x": {"repo": "/r"}}), "'../x' is not allowed"),
    "name is a slash": (lambda d: d["deployments"].update({"/": {"repo": "/r"}}), "'/' is not allowed"),
    "name with space": (lambda d: d["deployments"].update({"a b": {"repo": "/r"}}), "'a b' is not allowed"),
    "missing repo": (lambda d: d["deployments"].update({"norepo": {"rev": "v1"}}), "deployments:norepo:repo: missing"),
    "rev not a string": (
        lambda d: d["deployments"][FETCHER].update(rev=1234),
        f"deployments:{FETCHER}:rev: must be a str, got int 1234; quote it in pillar: rev: '1234'",
    ),
    "host key typo": (lambda d: d["saltfleet"].update(uesr="x"), "saltfleet:uesr: unknown key; did you mean 'user'?"),
    "deployments not a mapping": (
        lambda d: d.update(deployments=[FETCHER]),
        "deployments: must be a mapping of name to settings, got list",
    ),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_pillar_fails_cleanly_and_changes_nothing(host, pillar, sandbox, case):
    edit, message = INVALID[case]
    before = snapshot(sandbox["root"])
    states = host.apply(_bad(pillar, edit))
    failed = [s for s in states.values() if s["result"] is False]
    assert failed, states
    assert all(message in s["comment"] for s in failed), [s["comment"] for s in failed]
    assert all(s["changes"] == {} for s in states.values())
    assert snapshot(sandbox["root"]) == before
    assert host.status()[FETCHER]["running"] == 3


def test_supervisord_comes_back_after_a_reboot(host, pillar, sandbox, tasks):
    """No systemd here: the boot entry is a cron.d @reboot line; run it as cron would after a crash."""
    p = paths(sandbox, REPORTER)
    boot = sandbox["root"] / "etc" / "cron.d" / f"saltfleet-{REPORTER}"
    lines = boot.read_text().splitlines()
    assert boot.stat().st_mode & 0o777 == 0o644
    reboot = [line for line in lines if line.startswith("@reboot ")]
    assert len(reboot) == 1 and reboot[0].endswith(f"supervisord -c {p['conf']}")
    env = dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith(("#", "@")))

    supervisord = psutil.Process(int(p["pidfile"].read_text()))
    for proc in [*supervisord.children(recursive=True), supervisord]:
        proc.kill()
    psutil.wait_procs([supervisord], timeout=10)
    assert not sf.supervisord_running(p["socket"])

    user, command = reboot[0].split()[1], reboot[0].split()[2:]
    assert user == USER
    subprocess.run(command, env=env, check=True, cwd="/")
    assert sf.wait_running(p["socket"]) == {}
    assert run_task(tasks, REPORTER)["version"] == "2"
    states = host.apply(pillar)
    assert changes_of(states) == {sid: {} for sid in states}


def test_removing_a_deployment_stops_it_and_removes_its_sysfiles(host, pillar, sandbox):
    p = paths(sandbox, FETCHER)
    pid = int(p["pidfile"].read_text())
    dropped = copy.deepcopy(pillar)
    del dropped["deployments"][FETCHER]
    dry = host.apply(dropped, test=True)
    assert sf.supervisord_running(p["socket"])
    states = host.apply(dropped)
    assert changes_of(states) == changes_of(dry)
    removed = states[f"saltfleet-deployment-{FETCHER}-removed"]
    assert removed["result"] is True, removed
    assert removed["changes"]["supervisord"] == {"old": "running", "new": "stopped"}
    assert not sf.supervisord_running(p["socket"])
    assert exited(pid), "supervisord exited"
    assert not (sandbox["root"] / "etc" / "cron.d" / FETCHER).exists()
    assert not (sandbox["root"] / "etc" / "cron.d" / f"saltfleet-{FETCHER}").exists()
    assert not p["state"].exists(), "its config and secrets are gone"
    assert p["releases"].is_dir(), "without purge the releases stay"
    assert FETCHER not in host.status()
    assert host.status()[REPORTER]["running"] == 1
    again = host.apply(dropped)
    assert changes_of(again) == {sid: {} for sid in again}
