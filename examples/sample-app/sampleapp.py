"""A small Celery app that saltfleet deploys in its demo and tests.

Its broker and result store are folders by default (kombu's filesystem
transport and Celery's file result backend), so it needs no server:
SAMPLEAPP_DATA names the folder, shared by the workers and whoever sends them
tasks. SAMPLEAPP_BROKER, when set, is a broker URL instead (RabbitMQ:
``amqp://user:password@host:5672/vhost``); results stay in the folder.

Each execution of a task leaves a record in SAMPLEAPP_DATA/executions/ (one
JSON file per execution: task id, node, pid, version, start and end), so a
caller can tell which worker ran a task, and that none ran twice.

SAMPLEAPP_BEAT_QUEUES (queue names, comma-separated)
gives ``celery beat`` a schedule: ``fetch`` of each queue's platform (the
name's last dot-separated part) sent to that queue every
SAMPLEAPP_BEAT_SECONDS (1 by default), a steady stream of quick tasks. The
schedule is kept in memory (nothing written) and a fetch no worker took
within a few seconds expires.
"""

import json
import os
import time
import uuid
from pathlib import Path

from celery import Celery
from kombu.transport import filesystem
from kombu.utils.json import dumps

VERSION = "1"

DATA = Path(os.environ.get("SAMPLEAPP_DATA", "/var/lib/sampleapp"))
BROKER = os.environ.get("SAMPLEAPP_BROKER")
EXECUTIONS = DATA / "executions"


def _folders(*names):
    DATA.mkdir(parents=True, exist_ok=True)
    owner = DATA.stat()
    for name in names:
        folder = DATA / name
        if not folder.is_dir():
            folder.mkdir(exist_ok=True)
            # A sender running as root makes the folder for the workers, who own the data folder.
            if os.geteuid() == 0 and owner.st_uid != 0:
                os.chown(folder, owner.st_uid, owner.st_gid)


class _Channel(filesystem.Channel):
    def _put(self, queue, payload, **kwargs):
        # kombu writes a message file in place: a worker polling meanwhile can take
        # it half written, fail to parse it and die, and the message is lost. Write
        # it under a name no queue reads, then rename it in whole.
        name = f"{round(time.monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        part = os.path.join(self.data_folder_out, f".{name}.part")
        with open(part, "w") as f:
            f.write(dumps(payload))
        os.replace(part, os.path.join(self.data_folder_out, name))


class _Transport(filesystem.Transport):
    """kombu's filesystem transport, each message written whole."""

    Channel = _Channel


app = Celery("sampleapp")
app.conf.update(
    result_backend=f"file://{DATA / 'results'}",
    task_track_started=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    # A worker holds only the tasks it runs, acknowledged when done: told to
    # stop consuming (a handover), it has none waiting behind them, so the
    # next release takes every task not yet started.
    worker_prefetch_multiplier=1,
    task_acks_late=True,
)
if BROKER:
    _folders("results", "executions")
    app.conf.broker_url = BROKER
    # A publish waits for the broker's confirm: one written as the broker
    # stops is otherwise lost unseen, and only one that raises is retried.
    app.conf.broker_transport_options = {"confirm_publish": True}
else:
    _folders("queue", "control", "results", "processed", "executions")
    app.conf.update(
        broker_url="filesystem://",
        broker_transport=_Transport,
        broker_transport_options={
            "data_folder_in": str(DATA / "queue"),
            "data_folder_out": str(DATA / "queue"),
            "control_folder": str(DATA / "control"),
            # Delivered messages move here rather than to /tmp: a worker cannot
            # delete from a sticky /tmp a message another user (the sender) wrote.
            "store_processed": True,
            "processed_folder": str(DATA / "processed"),
            # The folders are polled: every 0.1 s rather than kombu's 1 s, so a
            # task, or a control message such as a ping, waits no second for it.
            "polling_interval": 0.1,
        },
    )

BEAT_QUEUES = [queue.strip() for queue in os.environ.get("SAMPLEAPP_BEAT_QUEUES", "").split(",") if queue.strip()]
if BEAT_QUEUES:
    _every = float(os.environ.get("SAMPLEAPP_BEAT_SECONDS", "1"))
    app.conf.beat_scheduler = "celery.beat:Scheduler"
    app.conf.beat_schedule = {
        f"fetch to {queue}": {
            "task": "sampleapp.fetch",
            "schedule": _every,
            "args": [queue.rpartition(".")[2]],
            "options": {"queue": queue, "expires": max(5.0, 5 * _every), "ignore_result": True},
        }
        for queue in BEAT_QUEUES
    }


def _record(path, record):
    """Write an execution record whole (a reader never sees half of one)."""
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(record))
    part.replace(path)


@app.task(name="sampleapp.fetch", bind=True)
def fetch(self, platform, seconds=0, until=None):
    """
    Pretend to fetch a platform's data for ``seconds`` (or, with ``until``,
    until that file exists, ``seconds`` at most); report which release and
    worker did it.
    """
    record = {
        "task": self.request.id,
        "node": self.request.hostname,
        "pid": os.getpid(),
        "version": VERSION,
        "start": time.time(),
        "end": None,
    }
    path = EXECUTIONS / f"{self.request.id}.{os.getpid()}.{time.time_ns()}.json"
    _record(path, record)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (until and Path(until).exists()):
        time.sleep(min(0.1, seconds))
    record["end"] = time.time()
    _record(path, record)
    return {"platform": platform, "version": VERSION, "pid": os.getpid(), "node": self.request.hostname}
