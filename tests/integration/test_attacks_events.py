"""
Attacks on a rollout's listener from the broker's side. Root starts the
listener of ``deployment.task_events`` as the deployment's user, with what
root tells it (``saltfleet_taskevents.request``); anyone who can publish on
the app's broker can send it events under any node name. Here the listener
runs as the real deployment user against a private RabbitMQ, a test app of
the user's names its broker, and the test forges the events, as Celery's
own dispatcher sends them, under names of its choosing: it passes when the
forgeries change nothing the listener does to the app's workers.
"""

import json
import os
import subprocess
import sys
import uuid

import pytest
from celery import Celery
from kombu import Connection, Queue

from tests.conftest import short_tmpdir, wait_for
from tests.support.loaded import module, utils

HOST = "ev-host"
SERVING = f"w.g1@{HOST}"
# The node name the next generation's worker takes on this host (saltfleet_celery.per_generation).
NEXT = f"w.g2@{HOST}"

APP = """
import os
from celery import Celery
app = Celery("evapp", broker=os.environ["EV_BROKER"])
"""


@pytest.fixture
def places(deploy_user):
    """{app: the user's folder of the app, logs: the user's log folder, state: root's, with generation 1's config}."""
    app, logs = short_tmpdir("sfe-", owner=deploy_user), short_tmpdir("sfe-", owner=deploy_user)
    state = short_tmpdir("sfe-")
    (app / "evapp.py").write_text(APP)
    (state / "supervisord.1.conf").write_text("")
    yield {"app": app, "logs": logs, "state": state}
    for folder in (app, logs, state):
        subprocess.run(["rm", "-rf", str(folder)], check=False)


@pytest.fixture
def listener(places, broker, deploy_user):
    """Start the listener root would for generation 1's node, as the user: the request it was given."""
    taskevents = utils.saltfleet_taskevents
    told = taskevents.request(places, "watch-1", "evapp", {SERVING: "a" * 40}, 60, "minion-1")
    env = {"PATH": "/usr/bin:/bin", "EV_BROKER": broker, "HOME": str(places["app"])}
    proc = subprocess.Popen(
        [sys.executable, "-c", module("saltfleet_taskevents").LISTEN, json.dumps(told)],
        cwd=places["app"],
        env=env,
        user=deploy_user.pw_uid,
        group=deploy_user.pw_gid,
        extra_groups=[],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # Its first snapshot is written once its queue is bound: from then on it hears what is published.
        wait_for(lambda: os.path.exists(told["out"]) or proc.poll() is not None, 60, "the listener's first snapshot")
        assert proc.poll() is None, proc.stdout.read()
        yield told
    finally:
        proc.terminate()
        proc.wait(30)


def forge(broker, kind, names):
    """Publish event ``kind`` under each node name of ``names``, as a worker's own event dispatcher would."""
    app = Celery("forger", broker=broker)
    with app.connection_for_write() as conn:
        dispatcher = app.events.Dispatcher(conn, hostname=names[0], enabled=True)
        for name in names:
            dispatcher.hostname = name
            dispatcher.send(kind)
        dispatcher.close()


@pytest.fixture
def switched(broker):
    """A function giving every node name the listener has told to send task events so far (its broadcasts)."""
    app = Celery("observer", broker=broker)
    conn = Connection(broker)
    exchange = app.control.mailbox(conn).exchange
    queue = Queue(f"observer.{uuid.uuid4().hex}", exchange=exchange, exclusive=True, durable=False)
    simple = conn.SimpleQueue(queue)
    seen = set()

    def destinations():
        while True:
            try:
                message = simple.get(timeout=0.2)
            except simple.Empty:
                return seen
            body = message.decode()
            if body.get("method") == "enable_events":
                seen.update(body.get("destination") or [])
            message.ack()

    yield destinations
    simple.close()
    conn.release()


def test_forged_workers_online_never_get_events_switched_on(listener, broker, switched):
    """
    Names shaped like this host's later generations (numbers no generation
    here can take, digits of other scripts, thousands of digits), as many as
    a flood: none is sent ``enable_events``; the next generation's worker
    coming online after them gets its events switched on.
    """
    forged = [f"w.g{n}@{HOST}" for n in range(10, 1510)]
    forged += [f"w.g\u0663@{HOST}", f"w.g{'9' * 5000}@{HOST}", f"w.g\u00b2@{HOST}"]
    forge(broker, "worker-online", forged)
    forge(broker, "worker-online", [NEXT])
    wait_for(lambda: NEXT in switched(), 60, f"task events switched on for {NEXT}, the next generation's worker")
    told = switched() & set(forged)
    assert not told, f"task events switched on for {len(told)} forged nodes, e.g. {sorted(told)[:3]}"


def test_a_next_generation_online_before_the_listener_gets_its_events_switched_on(listener, switched):
    """Its worker-online went out before the listener bound its queue: root's list of names reaches it all the same."""
    wait_for(lambda: NEXT in switched(), 60, f"task events switched on for {NEXT} without its worker-online")
