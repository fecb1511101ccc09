"""
Celery-aware handovers against a real RabbitMQ (Debian's rabbitmq-server,
one private node for the module, each test in a virtual host of its own),
through a real salt-master and salt-minion, as the unprivileged deployment
user:

- a first deploy whose workers consume from RabbitMQ (the filesystem broker is
  what the other integration tests use);
- a steady stream of tasks across an upgrade and across a rollback: every
  result arrives, no task runs twice, the old generation takes no task sent
  after it was told to stop consuming;
- a release whose workers run but never consume: the handover fails, says
  why, and the old generation goes on consuming;
- a worker holding a long task during a handover: it takes no new task,
  finishes the long one, then exits, and shows as draining meanwhile;
- the broker restarted between the new generation's start and the old one's
  drain: one generation consumes every queue in the end, and every task
  published before, during and after has its result.

The sample app records every execution (task id, node, pid, version, start,
end) in its data folder; the workers' own logs say when each node was told to
stop consuming.
"""

import concurrent.futures
import datetime
import itertools
import json
import re
import shutil
import threading
import time
from pathlib import Path

import git
import psutil
import pytest

from localfleet.daemons import free_ports
from localfleet.sampleapp import executions
from tests.apps import SAMPLE_APP, celery_client, commit
from tests.conftest import gone, short_tmpdir, wait_for

NAME = "sf-handover"
QUEUES = ("a", "b")
# One line of a Celery worker's log: "[2026-12-02 14:51:25,123: INFO/MainProcess] message".
LOG_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): \w+/[\w-]+\] (.*)$")


def handover_repo(base):
    """
    A bare repo of the sample app: v1, v2 (tags: VERSION 1, 2) and two branches
    off v2 whose workers run but never consume: ``deaf`` reads its broker URL
    from SAMPLEAPP_DEAF_BROKER (pillar points it at a port nobody listens on),
    ``hung`` blocks in worker_init, before its worker consumes.
    """
    work = Path(base) / "sample-app"
    shutil.copytree(SAMPLE_APP, work, ignore=shutil.ignore_patterns("__pycache__"))
    repo = git.Repo.init(work, initial_branch="master")
    shas = {"v1": commit(work, "sample app v1", tag="v1")}
    app = work / "sampleapp.py"
    app.write_text(app.read_text().replace('VERSION = "1"', 'VERSION = "2"'))
    shas["v2"] = commit(work, "sample app v2", tag="v2")
    v2 = app.read_text()
    deaf = v2.replace('os.environ.get("SAMPLEAPP_BROKER")', 'os.environ.get("SAMPLEAPP_DEAF_BROKER")')
    hung = v2 + (
        "\n\nfrom celery.signals import worker_init\n\n\n"
        "@worker_init.connect\ndef _never_ready(**_):\n    time.sleep(3600)\n"
    )
    assert deaf != v2
    for branch, text in (("deaf", deaf), ("hung", hung)):
        repo.git.checkout("-b", branch, "v2")
        app.write_text(text)
        shas[branch] = commit(work, f"a release whose workers never consume ({branch})")
    repo.git.checkout("master")
    bare = Path(base) / "sample-app.git"
    repo.clone(bare, bare=True)
    return bare, shas


@pytest.fixture(scope="module")
def sample():
    base = short_tmpdir("sfr-")
    repo, shas = handover_repo(base)
    yield {"repo": repo, "shas": shas}
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def data(deploy_user):
    """The sample app's data folder (results, execution records), the workers' (the deployment user's)."""
    path = short_tmpdir("sfh-", owner=deploy_user)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def deployment(sample, data, broker, rev="v1", concurrency=2):
    """The sample app with a Celery worker per queue of QUEUES, its broker RabbitMQ."""
    return {
        "repo": str(sample["repo"]),
        "rev": rev,
        "env": {
            "SAMPLEAPP_DATA": str(data),
            "SAMPLEAPP_BROKER": broker,
            # Read only by the `deaf` release: nothing listens there.
            "SAMPLEAPP_DEAF_BROKER": f"amqp://guest:guest@127.0.0.1:{free_ports(1)[0]}//",
        },
        "programs": {
            queue: {
                "command": (
                    f"celery -A sampleapp worker -Q {NAME}.{queue} -c {concurrency} -l INFO -n {NAME}-{queue}@%%h"
                ),
                "startsecs": 2,
            }
            for queue in QUEUES
        },
    }


def send(app, queue, seconds=0.0, until=None):
    return app.send_task("sampleapp.fetch", args=(queue, seconds), kwargs={"until": until}, queue=f"{NAME}.{queue}")


def serving_generation(host):
    """The generation the manifest (root's, the one fact saltfleet trusts) says serves."""
    manifest = host.root / "var" / "lib" / "saltfleet" / "deployments" / NAME / "manifest.json"
    return json.loads(manifest.read_text())["generation"]


def worker_log(host, queue, gen):
    return host.root / "home" / host.user.pw_name / "log" / NAME / f"{queue}.g{gen}.log"


def log_lines(path):
    """[(epoch seconds, message)] of a Celery worker's log (its times are local, to the millisecond)."""
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        match = LOG_LINE.match(line)
        if match:
            stamp = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            lines.append((stamp, match.group(2)))
    return lines


def told_to_stop(host, queue, gen):
    """
    When the old generation's worker for ``queue`` was told to stop consuming
    it: its own log line for the cancel (logged just before it cancels), to the
    millisecond rounded up; None when it never was.
    """
    for stamp, message in log_lines(worker_log(host, queue, gen)):
        if message == f"Canceling queue {NAME}.{queue}":
            return stamp + 0.001
    return None


def stream(app, handover, interval=0.05, before=40, after=100):
    """
    Send tasks at a steady rate (one every ``interval`` s, round robin over
    QUEUES): ``before`` of them, then on while ``handover`` runs in a thread,
    then ``after`` more. Returns (its return, [(sent at, queue, result)],
    when it started, when it returned).
    """
    sent = []
    started = returned = None
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = None
        first = time.time()
        n = stop_at = 0
        while stop_at == 0 or n < stop_at:
            if n == before:
                started, future = time.time(), pool.submit(handover)
            if future is not None and stop_at == 0 and future.done():
                returned, stop_at = time.time(), n + after
            pause = first + n * interval - time.time()
            if pause > 0:
                time.sleep(pause)
            queue = QUEUES[n % len(QUEUES)]
            sent.append((time.time(), queue, send(app, queue, 0.05)))
            n += 1
        return future.result(), sent, started, returned


def check_stream(host, data, sent, old_gen, new_version, started, returned):
    """
    What a stream across one handover must show: every result arrived, each
    task ran once, and no task sent after an old worker was told to stop
    consuming ran there. Returns a line with the longest gap between two
    completed tasks during the handover.
    """
    results = {}
    for at, queue, result in sent:
        try:
            results[result.id] = result.get(timeout=300)
        except Exception as exc:  # what became of it, to tell a lost task from a slow one
            logs = host.root / "home" / host.user.pw_name / "log" / NAME
            seen = [
                f"{log.name}: {line}"
                for log in sorted(logs.glob("*.log"))
                for line in log.read_text(errors="replace").splitlines()
                if result.id in line
            ]
            raise AssertionError(
                f"task {result.id} sent to {queue} at {at:.3f} (handover {started:.3f}-{returned:.3f}): "
                f"{exc!r}, state {result.state}, executions {executions(data).get(result.id)}, in the logs: {seen}"
            ) from None
    runs = executions(data)
    twice = {task: recs for task, recs in runs.items() if task in results and len(recs) > 1}
    assert not twice, f"tasks that ran more than once: {twice}"
    assert set(results) <= set(runs), "every task sent has its execution record"
    after = [results[result.id]["version"] for at, _, result in sent if at > returned]
    assert after and set(after) == {new_version}, "every task sent after the handover ran in the new release"
    for queue in QUEUES:
        stop = told_to_stop(host, queue, old_gen)
        assert stop is not None, f"the old worker of {queue} (generation {old_gen}) was never told to stop consuming"
        assert stop <= returned, "the old workers stop consuming before the handover returns"
        old_node = f"{NAME}-{queue}.g{old_gen}@"
        late = [
            (result.id, runs[result.id][0]["node"])
            for at, q, result in sent
            if q == queue and at > stop and runs[result.id][0]["node"].startswith(old_node)
        ]
        assert not late, f"tasks sent after {old_node} was told to stop consuming, run there: {late}"
    # Two generations overlap, each with its own node names: Celery never saw one name twice.
    logs = host.root / "home" / host.user.pw_name / "log" / NAME
    lines = [line for log in logs.glob("*.log") for line in log.read_text(errors="replace").splitlines()]
    assert not [line for line in lines if "DuplicateNodenameWarning" in line]
    ends = sorted(recs[0]["end"] for task, recs in runs.items() if task in results)
    gaps = [b - a for a, b in itertools.pairwise(ends) if started <= b and a <= returned]
    return (
        f"{len(sent)} tasks across a handover of {returned - started:.1f} s: "
        f"longest gap between two completed tasks during it {max(gaps):.3f} s"
    )


# ----------------------------------------------------------------- tests


def test_a_first_deploy_consumes_from_rabbitmq(host, sample, data, broker, rabbitmq):
    app = celery_client(data, broker)
    states = host.apply(host.pillar({NAME: deployment(sample, data, broker)}))
    assert states[f"saltfleet-deployment-{NAME}"]["result"] is True
    result = send(app, "a").get(timeout=120)
    assert result["version"] == "1"
    assert result["node"].startswith(f"{NAME}-a.g")
    assert psutil.Process(result["pid"]).uids().real == host.user.pw_uid, "the worker runs as the deployment's user"
    # The queues live in RabbitMQ, each with its worker consuming it.
    vhost = broker.rsplit("/", 1)[1]
    listed = rabbitmq.ctl("list_queues", "-p", vhost, "name", "consumers", "--no-table-headers", "-s").stdout
    consumers = dict(line.split("\t") for line in listed.strip().splitlines())
    assert {consumers.get(f"{NAME}.{q}") for q in QUEUES} == {"1"}, listed
    workers = host.status(NAME)[NAME]["workers"]
    assert {node.split(".g")[0]: w["queues"] for node, w in workers.items()} == {
        f"{NAME}-{q}": [f"{NAME}.{q}"] for q in QUEUES
    }


def test_a_stream_of_tasks_across_an_upgrade_and_a_rollback(host, sample, data, broker, record_property):
    app = celery_client(data, broker)
    host.apply(host.pillar({NAME: deployment(sample, data, broker)}))
    assert send(app, "a").get(timeout=120)["version"] == "1"

    old = serving_generation(host)
    upgraded = host.pillar({NAME: deployment(sample, data, broker, rev="v2")})
    states, sent, started, returned = stream(app, lambda: host.apply(upgraded))
    assert states[f"saltfleet-deployment-{NAME}"]["changes"]["release"]["new"] == sample["shas"]["v2"]
    record_property("report", f"upgrade: {check_stream(host, data, sent, old, '2', started, returned)}")

    old = serving_generation(host)
    ret, sent, started, returned = stream(app, lambda: host.run("deployment.rollback", NAME, _timeout=900))
    assert ret.data["result"] is True, ret
    assert ret.data["release"] == sample["shas"]["v1"]
    record_property("report", f"rollback: {check_stream(host, data, sent, old, '1', started, returned)}")


@pytest.mark.parametrize(
    ("rev", "why"),
    [
        # Its broker URL is wrong: neither its workers nor Celery's control reach a broker.
        ("deaf", "Connection refused"),
        # Its workers run (past startsecs) but never consume: they do not answer.
        ("hung", "Celery: no answer"),
    ],
)
def test_a_release_whose_workers_never_consume_does_not_serve(host, sample, data, broker, rev, why):
    app = celery_client(data, broker)
    host.apply(host.pillar({NAME: deployment(sample, data, broker)}))
    old = serving_generation(host)
    states = host.apply(host.pillar({NAME: deployment(sample, data, broker, rev=rev)}), check=False)
    state = states[f"saltfleet-deployment-{NAME}"]
    assert state["result"] is False, state
    assert f"release {sample['shas'][rev][:12]} did not start" in state["comment"]
    assert why in state["comment"]
    assert f"{sample['shas']['v1'][:12]} keeps serving: its programs never stopped" in state["comment"]
    if rev == "hung":
        for queue in QUEUES:
            assert f"{NAME}-{queue}.g" in state["comment"], "the state names each node that did not answer"
    # The old generation still consumes every queue, and was never told to stop.
    assert serving_generation(host) == old
    for queue in QUEUES:
        result = send(app, queue).get(timeout=120)
        assert (result["version"], result["node"].split("@")[0]) == ("1", f"{NAME}-{queue}.g{old}")
        assert told_to_stop(host, queue, old) is None
    status = host.status(NAME)[NAME]
    assert status["draining"] == [], "the new generation was stopped"
    assert status["state"] == "up"


def test_a_worker_holding_a_long_task_finishes_it_takes_no_new_one_and_exits(host, sample, data, broker):
    app = celery_client(data, broker)
    host.apply(host.pillar({NAME: deployment(sample, data, broker, concurrency=1)}))
    old = serving_generation(host)
    release = data / "release-the-long-task"
    try:
        long = send(app, "a", seconds=900, until=str(release))
        wait_for(lambda: long.id in executions(data), 120, "the long task started")
        [record] = executions(data)[long.id]
        old_node = record["node"]
        # Queued behind it: the old worker, busy, must leave these to the new release.
        queued = [send(app, "a") for _ in range(5)]

        states = host.apply(host.pillar({NAME: deployment(sample, data, broker, rev="v2", concurrency=1)}))
        assert states[f"saltfleet-deployment-{NAME}"]["changes"]["release"]["new"] == sample["shas"]["v2"]
        status = host.status(NAME)[NAME]
        assert len(status["draining"]) == 1, status
        assert status["draining_tasks"] == {str(status["draining"][0]): 1}, status
        assert long.state == "STARTED"

        for result in [*queued, *(send(app, "a") for _ in range(5))]:
            assert result.get(timeout=120)["version"] == "2", "a task not started by the old worker goes to the new one"
        assert long.state == "STARTED", "the long task is still in the old worker's hands"

        def release_and_drain():
            release.touch()
            wait_for(lambda: host.status(NAME)[NAME]["draining"] == [], 120, "the old generation exiting")

        # Tasks keep coming while the old worker finishes the long one and exits: idle then, it must take none.
        _, meanwhile, _, _ = stream(app, release_and_drain, before=0, after=10)
        done = long.get(timeout=120)
        assert (done["version"], done["node"]) == ("1", old_node), "the old worker finished the long task"
        assert {result.get(timeout=120)["version"] for _, _, result in meanwhile} == {"2"}
        assert gone(status["draining"][0]), "the old generation's supervisord exited"
        assert gone(record["pid"]), "the old worker exited"
        ran_by_old = {task for task, recs in executions(data).items() for r in recs if r["node"] == old_node}
        since = {task for task, recs in executions(data).items() if recs[0]["start"] >= record["start"]}
        assert ran_by_old & since == {long.id}, "the old worker took no task after the long one"
        assert told_to_stop(host, "a", old) is not None
    finally:
        # The long task ends whatever happened: nothing outlives the test.
        release.touch()


def consuming(app):
    """{queue: {generations whose nodes consume it}} as the workers answer Celery's control now."""
    found = {}
    for node, queues in (app.control.inspect(timeout=2).active_queues() or {}).items():
        gen = re.search(r"\.g(\d+)@", node)
        for queue in queues or ():
            found.setdefault(queue["name"], set()).add(gen.group(1) if gen else node)
    return found


def test_a_broker_restart_during_a_handover_leaves_one_generation_consuming_and_every_task_a_result(
    host, sample, data, broker, rabbitmq, record_property
):
    app = celery_client(data, broker)
    host.apply(host.pillar({NAME: deployment(sample, data, broker)}))
    assert send(app, "a").get(timeout=120)["version"] == "1"
    old = serving_generation(host)
    fault = host.root / "var" / "lib" / "saltfleet" / "faults" / "started"
    fault.parent.mkdir(parents=True, exist_ok=True)
    fault.write_text("wait")
    # The producer's side rides the outage out: each publish is tried again until the broker is back.
    retry = {"max_retries": 120, "interval_start": 0.25, "interval_step": 0, "interval_max": 0.25}
    sent, sending = [], threading.Event()

    def produce():
        while not sending.is_set():
            queue = QUEUES[len(sent) % len(QUEUES)]
            args = (queue, 0.05)
            sent.append(app.send_task("sampleapp.fetch", args=args, queue=f"{NAME}.{queue}", retry_policy=retry))
            time.sleep(0.1)

    upgraded = host.pillar({NAME: deployment(sample, data, broker, rev="v2")})
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        producer = pool.submit(produce)
        try:
            applied = pool.submit(host.apply, upgraded, check=False)
            # The new generation runs and consumes (the handover waits at its fault point for the drain).
            wait_for(
                lambda: [len(gens) for gens in consuming(app).values()] == [2, 2], 300, "both generations consuming"
            )
            time.sleep(4)  # the handover's own readiness check answered too
            rabbitmq.ctl("stop_app")
            time.sleep(5)
            rabbitmq.ctl("start_app")
            fault.unlink()
            states = applied.result(timeout=900)
            time.sleep(5)
        finally:
            fault.unlink(missing_ok=True)
            sending.set()
        producer.result()
    state = states[f"saltfleet-deployment-{NAME}"]
    # It completed (v2 serves) or failed back (v1 serves): either way the manifest says which, and one
    # generation consumes every queue once the old one drained.
    serving = serving_generation(host)
    if state["result"] is True:
        assert serving != old and host.status(NAME)[NAME]["release"] == sample["shas"]["v2"], state
    else:
        assert serving == old and host.status(NAME)[NAME]["release"] == sample["shas"]["v1"], state
    wait_for(
        lambda: consuming(app) == {f"{NAME}.{q}": {serving} for q in QUEUES},
        180,
        f"generation {serving} alone consuming every queue",
    )
    wait_for(lambda: host.status(NAME)[NAME]["draining"] == [], 180, "the old generation exiting")
    after = [send(app, q) for q in QUEUES for _ in range(5)]
    version = "2" if state["result"] is True else "1"
    assert {r.get(timeout=120)["version"] for r in after} == {version}
    # Every task sent before, during and after the restart has its result (one may have run twice: taken
    # back from a worker that lost its connection, the sample app acknowledging late, or published again
    # when the broker's confirm was lost). The sample app publishes with confirms: without them a publish
    # written as the broker stops is dropped unseen, and its task has no result.
    missing = []
    for result in sent:
        try:
            result.get(timeout=300)
        except Exception as exc:  # what became of it, named
            missing.append(f"{result.id}: {exc!r}, state {result.state}, executions {executions(data).get(result.id)}")
    assert not missing, missing
    assert len(sent) > 100
    twice = sum(len(recs) > 1 for task, recs in executions(data).items() if task in {r.id for r in sent})
    outcome = "completed" if state["result"] is True else "failed back"
    said = "; ".join(state.get("warnings", [])) or "no warning"
    record_property("report", f"the handover {outcome} ({said}); {len(sent)} tasks, {twice} ran twice")
