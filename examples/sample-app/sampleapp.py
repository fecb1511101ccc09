"""A small Celery app that saltfleet deploys in its demo and tests.

Its broker and result store are folders (kombu's filesystem transport and
Celery's file result backend), so it needs no server: SAMPLEAPP_DATA names
the folder, shared by the workers and whoever sends them tasks.
"""

import os
import time
from pathlib import Path

from celery import Celery

VERSION = "1"

DATA = Path(os.environ.get("SAMPLEAPP_DATA", "/var/lib/sampleapp"))
for folder in ("queue", "control", "results", "processed"):
    (DATA / folder).mkdir(parents=True, exist_ok=True)

app = Celery("sampleapp")
app.conf.update(
    broker_url="filesystem://",
    broker_transport_options={
        "data_folder_in": str(DATA / "queue"),
        "data_folder_out": str(DATA / "queue"),
        "control_folder": str(DATA / "control"),
        # Delivered messages move here rather than to /tmp: a worker cannot
        # delete from a sticky /tmp a message another user (the sender) wrote.
        "store_processed": True,
        "processed_folder": str(DATA / "processed"),
    },
    result_backend=f"file://{DATA / 'results'}",
    task_track_started=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


@app.task(name="sampleapp.fetch")
def fetch(platform, seconds=0):
    """Pretend to fetch a platform's data; report which release did it."""
    time.sleep(seconds)
    return {"platform": platform, "version": VERSION, "pid": os.getpid()}
