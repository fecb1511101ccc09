"""
The sample Celery app (examples/sample-app): where it lives, and the app
loaded in this process to send it tasks, and what its workers record
(the demo, the tests and the bench).
"""

import importlib.util
import json
import os
import threading
import time
import uuid

from localfleet.config import REPO

SAMPLE_APP = REPO / "examples" / "sample-app"


def celery_app(data, broker=None):
    """
    The sample app loaded afresh, its data folder ``data`` and its broker
    ``broker`` (None: the filesystem transport in ``data``); the environment
    is left as it was. The umask becomes 022: the workers run as the
    deployment's user and must read the messages this process writes.
    """
    keys = {"SAMPLEAPP_DATA": str(data), "SAMPLEAPP_BROKER": broker}
    saved = {key: os.environ.get(key) for key in keys}
    os.umask(0o022)
    try:
        for key, value in keys.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        spec = importlib.util.spec_from_file_location(f"sampleapp_{uuid.uuid4().hex}", SAMPLE_APP / "sampleapp.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return module.app


def executions(data):
    """{task id: [execution record, ...]}: every execution the workers recorded in ``data``."""
    found = {}
    for path in (data / "executions").glob("*.json"):
        record = json.loads(path.read_text())
        found.setdefault(record["task"], []).append(record)
    return found


class Stream:
    """
    ``sampleapp.fetch`` sent to ``queue`` every ``gap`` s from a thread while
    the ``with`` block runs, each working ``seconds``: a steady stream of
    tasks through a rollout. ``sent``: [(input, AsyncResult)], in order.
    """

    DONE = ("SUCCESS", "FAILURE")

    def __init__(self, app, queue, gap, seconds=0.0):
        self.app, self.queue, self.gap, self.seconds = app, queue, gap, seconds
        self.sent, self.running = [], threading.Event()
        self.thread = threading.Thread(target=self._send, daemon=True)

    def _send(self):
        started = time.monotonic()
        while self.running.is_set():
            platform = f"p{len(self.sent)}"
            result = self.app.send_task("sampleapp.fetch", args=(platform, self.seconds), queue=self.queue)
            self.sent.append((platform, result))
            time.sleep(max(0.0, started + len(self.sent) * self.gap - time.monotonic()))

    def __enter__(self):
        self.running.set()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running.clear()
        self.thread.join()

    def states(self, timeout=180):
        """{task id: its state} of every task sent, each waited for until it is done or ``timeout`` s have passed."""
        deadline = time.monotonic() + timeout
        found = {}
        for _, result in self.sent:
            while result.state not in self.DONE and time.monotonic() < deadline:
                time.sleep(0.1)
            found[result.id] = result.state
        return found

    def lost(self, timeout=180):
        """The ids of the tasks sent that have no result (succeeded or failed) within ``timeout`` s."""
        return [task for task, state in self.states(timeout).items() if state not in self.DONE]

    def last_versions(self, count=10):
        """The sample app's versions that ran the last ``count`` tasks sent (each waited for)."""
        results = [result.get(timeout=120, propagate=False) for _, result in self.sent[-count:]]
        return {r["version"] for r in results if isinstance(r, dict)}
