"""
Deployments of the sample Celery app converged through a real salt-master and
salt-minion with the real `salt` CLI, as an unprivileged user: workers that
consume tasks, upgrades that keep the task in flight, errors the CLI prints,
secrets that stay out of every return, log and argv, and the lock that keeps
an operator's command and a state.apply apart.

Each test sets up the host it needs (its own sandbox root); the daemons are
shared by the module.
"""

import contextlib
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from localfleet.sampleapp import executions
from tests.apps import celery_client, run_task
from tests.conftest import gone, wait_for

FETCHER, REPORTER = "sf-fetcher", "sf-reporter"
SECRET = "sf-marker-3f9c1d7e-not-for-any-log"


@pytest.fixture
def tasks(celery_data):
    return celery_client(celery_data)


def fetcher(sample, data, rev="v1", platforms=("alpha", "beta")):
    """The sample app from the template deployments/sf-fetcher/files/supervisord.conf.jinja: a worker per platform."""
    return {
        "repo": str(sample["repo"]),
        "rev": rev,
        "env": {"SAMPLEAPP_DATA": str(data), "SF_MARKER": SECRET},
        "context": {"platforms": list(platforms), "startsecs": 3},
    }


def reporter(sample, data, rev="v1", handover="stop-first"):
    """The sample app with its one worker in pillar."""
    return {
        "repo": str(sample["repo"]),
        "rev": rev,
        "handover": handover,
        "env": {"SAMPLEAPP_DATA": str(data)},
        "programs": {
            "report": {"command": f"celery -A sampleapp worker -Q {REPORTER} -c 1 -n {REPORTER}@%%h", "startsecs": 3}
        },
    }


def changes_of(states):
    return {sid: s["changes"] for sid, s in states.items()}


def owner_of(pid):
    return os.stat(f"/proc/{pid}").st_uid


def held_task(tasks, data, queue, logs=()):
    """A task that runs until the test creates the file returned (600 s at most), once it started: (task, file)."""
    release = data / "release"
    release.unlink(missing_ok=True)
    task = tasks.send_task("sampleapp.fetch", args=(queue, 600), kwargs={"until": str(release)}, queue=queue)
    wait_for(lambda: task.state == "STARTED", 60, f"a task on {queue} started", logs=logs)
    return task, release


@contextlib.contextmanager
def released_after(seconds, release):
    """Run the body while, ``seconds`` into it, the held task's file appears."""
    timer = threading.Timer(seconds, release.touch)
    timer.start()
    try:
        yield
    finally:
        timer.join()


def test_two_deployments_run_their_own_workers_as_the_user(
    host, sample, celery_data, tasks, second_user, second_uv_cache, second_celery_data
):
    # Each deployment its own user (the schema refuses two sharing one), and its own broker folder.
    second = {"user": second_user.pw_name, "uv_cache": str(second_uv_cache)}
    pillar = host.pillar(
        {FETCHER: fetcher(sample, celery_data), REPORTER: {**reporter(sample, second_celery_data), **second}}
    )
    dry = host.apply(pillar, test=True)
    states = host.apply(pillar)
    assert all(s["result"] for s in states.values()), states
    assert changes_of(states) == changes_of(dry), "the dry run told what the real run did"
    status = host.status()
    assert status[FETCHER]["programs"] == {"fetcher-alpha": "RUNNING", "fetcher-beta": "RUNNING"}
    nodes = status[FETCHER]["workers"]
    assert {n.split("@")[0]: w["queues"] for n, w in nodes.items()} == {
        f"{FETCHER}-alpha.g1": [f"{FETCHER}.alpha"],
        f"{FETCHER}-beta.g1": [f"{FETCHER}.beta"],
    }, "each Celery node answers, with its generation in its name, and consumes its queue"
    assert status[REPORTER]["programs"] == {"report": "RUNNING"}
    reports = celery_client(second_celery_data)
    for queue, client, user in (
        (f"{FETCHER}.alpha", tasks, host.user),
        (f"{FETCHER}.beta", tasks, host.user),
        (REPORTER, reports, second_user),
    ):
        result = run_task(client, queue)
        assert result["version"] == "1"
        assert owner_of(result["pid"]) == user.pw_uid, "the worker runs as its deployment's user"
    again = host.apply(pillar)
    assert changes_of(again) == {sid: {} for sid in again}
    # An operator stops one worker: status says down and its job fails, so `salt -b` and scripts can act.
    stopped = host.run("deployment.stop", FETCHER, "fetcher-beta")
    assert (stopped.returncode, stopped.data) == (0, {"stopped": ["fetcher-beta"]}), stopped
    down = host.run("deployment.status", FETCHER)
    assert down.returncode == 1 and down.data[FETCHER]["state"] == "down", down
    assert host.run("deployment.start", FETCHER, "fetcher-beta").returncode == 0
    up = host.run("deployment.status", FETCHER)
    assert up.returncode == 0 and up.data[FETCHER]["state"] == "up", up


def test_an_upgrade_keeps_the_task_in_flight_while_the_new_release_serves(host, sample, celery_data, tasks):
    pillar = host.pillar({FETCHER: fetcher(sample, celery_data)})
    host.apply(pillar)
    alpha_log = host.root / "home" / host.user.pw_name / "log" / FETCHER / "fetcher-alpha.g1.log"
    slow, release = held_task(tasks, celery_data, f"{FETCHER}.alpha", logs=[alpha_log])
    v1_beta = run_task(tasks, f"{FETCHER}.beta")["pid"]

    upgraded = host.pillar({FETCHER: fetcher(sample, celery_data, rev="v2", platforms=("alpha", "beta", "gamma"))})
    dry = host.apply(upgraded, test=True)
    real = host.apply(upgraded)
    state = real[f"saltfleet-deployment-{FETCHER}"]
    assert state["result"] is True, state
    assert changes_of(real) == changes_of(dry)
    assert state["changes"]["release"] == {"old": sample["shas"]["v1"], "new": sample["shas"]["v2"]}
    assert state["changes"]["programs"] == {"added": ["fetcher-gamma"], "restarted": ["fetcher-alpha", "fetcher-beta"]}
    assert "virtualenv" not in state["changes"], "requirements did not change: the venv is reused"
    # The apply returned without waiting for the task in v1's hands; v1 drains in the background.
    assert slow.state == "STARTED"
    assert len(host.status(FETCHER)[FETCHER]["draining"]) == 1
    # v1's workers stopped consuming before the apply returned: from now on v2 takes every task,
    # alpha's too while v1's alpha worker still finishes the slow one.
    status = host.status(FETCHER)[FETCHER]
    assert status["draining_tasks"] == {str(status["draining"][0]): 1}, status
    for queue in ("alpha", "beta", "gamma"):
        assert run_task(tasks, f"{FETCHER}.{queue}")["version"] == "2"
    assert slow.state == "STARTED"
    release.touch()
    assert slow.get(timeout=120)["version"] == "1", "the task in flight was finished by the old worker"
    logs = sorted((host.root / "home" / host.user.pw_name / "log" / FETCHER).glob("*.g1.log"))
    logs.append(host.root / "home" / host.user.pw_name / "log" / FETCHER / "drain.1.log")
    wait_for(lambda: host.status(FETCHER)[FETCHER]["draining"] == [], 120, "v1's supervisord exiting", logs=logs)
    assert gone(v1_beta)
    assert (
        Path(host.root) / "home" / host.user.pw_name / f"Projects-{FETCHER}.releases" / sample["shas"]["v1"]
    ).is_dir()


def test_stop_first_finishes_the_task_in_flight_before_the_new_program_starts(host, sample, celery_data, tasks):
    host.apply(host.pillar({REPORTER: reporter(sample, celery_data)}))
    slow, release = held_task(tasks, celery_data, REPORTER)
    # The task is still in hand when the handover begins, and ends 5 s into it.
    with released_after(5, release):
        states = host.apply(host.pillar({REPORTER: reporter(sample, celery_data, rev="v2")}))
    state = states[f"saltfleet-deployment-{REPORTER}"]
    assert state["result"] is True, state
    assert state["changes"]["programs"] == {"restarted": ["report"]}
    done = slow.get(timeout=60)
    assert done["version"] == "1"
    new_pid = run_task(tasks, REPORTER)["pid"]
    started = psutil.Process(new_pid).create_time()
    assert slow.date_done.timestamp() <= started, "the new program started after the task in flight finished"


def test_restart_lets_the_task_in_hand_finish_and_force_restart_does_not(host, sample, celery_data, tasks):
    host.apply(host.pillar({REPORTER: reporter(sample, celery_data)}))
    slow, release = held_task(tasks, celery_data, REPORTER)
    # deployment.restart waits for the task in hand (it ends 3 s into the restart), then starts the worker anew.
    with released_after(3, release):
        restarted = host.run("deployment.restart", REPORTER, _timeout=300)
    assert (restarted.returncode, restarted.data) == (0, {"restarted": ["report"]}), restarted
    assert slow.get(timeout=30)["version"] == "1", "the task in hand finished and its result is stored"
    new_pid = run_task(tasks, REPORTER)["pid"]
    assert new_pid != slow.result["pid"]
    assert psutil.Process(new_pid).create_time() >= slow.date_done.timestamp()
    # force_restart does not wait: the task in hand is cut off, its result never comes.
    cut, release = held_task(tasks, celery_data, REPORTER)
    forced = host.run("deployment.force_restart", REPORTER, _timeout=120)
    assert (forced.returncode, forced.data) == (0, {"restarted": ["report"]}), forced
    [killed, *_] = sorted(executions(celery_data)[cut.id], key=lambda record: record["start"])
    assert killed["end"] is None, "the task in hand was cut off"
    release.touch()  # a broker that delivers it again (acks_late) has it finish at once
    assert run_task(tasks, REPORTER)["pid"] != new_pid


def test_a_failing_call_prints_an_error_and_exits_non_zero(host):
    host.set_pillar(host.pillar({}))
    ret = host.run("deployment.restart", "nosuch")
    assert ret.returncode == 1
    # The hint is a command the operator types on the master.
    hint = f"`salt {host.minion.id} deployment.list` shows those that are"
    assert f"ERROR: deployment nosuch is not installed on this host; {hint}" in ret.stdout
    assert "Traceback" not in ret.stdout + ret.stderr
    assert "The minion function caused an exception" not in ret.stdout


def test_a_secret_in_env_appears_in_no_return_log_job_or_argv(host, sample, celery_data, tasks, salt_master):
    pillar = host.pillar({FETCHER: fetcher(sample, celery_data)})
    host.apply(pillar, test=True)
    host.apply(pillar)
    host.status()
    host.run("deployment.restart", FETCHER)
    assert run_task(tasks, f"{FETCHER}.alpha")["version"] == "1"
    for ret in host.outputs:
        assert SECRET not in ret.stdout + ret.stderr, ret.cmdline
    for log in (host.minion.config["log_file"], salt_master.config["log_file"]):
        assert Path(log).stat().st_size > 0
        assert SECRET not in Path(log).read_text(errors="replace"), log
    jobs = Path(salt_master.config["cachedir"]) / "jobs"
    assert any(jobs.rglob("*")), "the master keeps job returns"
    for path in jobs.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    # Every process's argv: the workers carry the secret in their environment only.
    seen = workers = 0
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                argv = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            seen += 1
            assert SECRET.encode() not in argv, argv
            environ = (proc / "environ").read_bytes() if b"celery" in argv else b""
            if str(host.root).encode() in environ:
                workers += 1
                assert SECRET.encode() in environ, "the worker has its env"
    assert seen > 20 and workers >= 2


def test_salt_run_prints_no_warning_to_the_operator(salt_master):
    """What an operator types, at salt-run's own log level: an inventory and nothing else."""
    salt_run = Path(sys.executable).with_name("salt-run")
    ret = subprocess.run(
        [salt_run, "-c", salt_master.config_dir, "fleet.inventory"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ret.returncode == 0, ret
    assert re.search(r"^\d+ minions?, \d+ up, \d+ down$", ret.stdout, re.M), ret.stdout
    assert "unclosed" not in ret.stdout + ret.stderr, ret.stderr
    assert "[WARNING" not in ret.stdout + ret.stderr, ret.stderr


def test_a_deployment_folder_added_a_moment_ago_fails_saying_how_to_refresh_the_masters_file_list(
    host, sample, celery_data, salt_run_cli, master_file_root
):
    name = "sf-added"
    spec = {"repo": str(sample["repo"]), "rev": "v1", "env": {"SAMPLEAPP_DATA": str(celery_data)}}
    pillar = host.pillar({name: spec})
    host.set_pillar(pillar)
    # The master lists its files now, and keeps the list fileserver_list_cache_time seconds.
    assert salt_run_cli.run("fileserver.file_list").returncode == 0
    conf = master_file_root / "deployments" / name / "files" / "supervisord.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text(f"[program:worker]\ncommand=celery -A sampleapp worker -Q {name} -c 1 -n {name}@%%h\n")
    ret = host.run("state.apply", _timeout=900)
    state = next(s for s in ret.data.values() if s["__id__"] == f"saltfleet-deployment-{name}")
    assert state["result"] is False, "the master listed the new folder at once: nothing was stale"
    assert "the master lists its files from a cache up to fileserver_list_cache_time seconds old" in state["comment"]
    assert "`salt-run fileserver.clear_file_list_cache` refreshes it, then apply again" in state["comment"]
    assert salt_run_cli.run("fileserver.clear_file_list_cache").returncode == 0
    state = host.apply(pillar)[f"saltfleet-deployment-{name}"]
    assert state["result"] is True and host.status(name)[name]["programs"] == {"worker": "RUNNING"}, state
