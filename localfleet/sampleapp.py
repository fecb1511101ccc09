"""
The sample Celery app (examples/sample-app): where it lives, and the app
loaded in this process to send it tasks, and what its workers record
(the demo, the tests and the bench).
"""

import importlib.util
import json
import os
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
