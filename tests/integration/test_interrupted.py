"""
An upgrade whose apply dies half way (its job process SIGKILLed at a fault
point) converges on the next apply: exactly one generation of the deployment
consumes, it runs the new code, and no other supervisord of it is left.
"""

import time
from pathlib import Path

import pytest

from tests.apps import celery_client, run_task

NAME = "sf-worker"
STATE = f"saltfleet-deployment-{NAME}"


def worker(sample, data, rev):
    return {
        "repo": str(sample["repo"]),
        "rev": rev,
        "env": {"SAMPLEAPP_DATA": str(data)},
        "programs": {"worker": {"command": f"celery -A sampleapp worker -Q {NAME} -c 1 -n {NAME}@%%h", "startsecs": 3}},
    }


def supervisords(root):
    """pids of the supervisords running a config of this host's deployment."""
    state = str(Path(root) / "var" / "lib" / "saltfleet" / "deployments" / NAME)
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace")
            zombie = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except (OSError, IndexError):
            continue
        if "supervisord" in argv and state in argv and not zombie:
            found.append(int(proc.name))
    return found


@pytest.mark.parametrize("point", ["build", "started", "switched", "signalled"])
def test_an_upgrade_killed_at_any_step_converges_on_the_next_apply(point, host, sample, celery_data):
    tasks = celery_client(celery_data)
    host.apply(host.pillar({NAME: worker(sample, celery_data, "v1")}))
    assert run_task(tasks, NAME)["version"] == "1"
    fault = host.root / "var" / "lib" / "saltfleet" / "faults" / point
    fault.parent.mkdir(parents=True, exist_ok=True)
    fault.write_text("kill")
    upgrade = host.pillar({NAME: worker(sample, celery_data, "v2")})
    host.set_pillar(upgrade)
    # The job dies at the fault point: whatever the CLI then prints, the next apply must mend it.
    host.run("state.apply", _timeout=600)
    fault.unlink()
    # What the kill left: the fault fired where it says.
    recorded = host.status(NAME)[NAME]["release"]
    assert recorded == sample["shas"]["v1" if point in ("build", "started") else "v2"]
    if point in ("started", "switched"):
        assert len(supervisords(host.root)) == 2, "the new generation runs beside the old one"
    states = host.apply(upgrade)
    assert states[STATE]["result"] is True, states[STATE]
    deadline = time.monotonic() + 120
    while host.status(NAME)[NAME]["draining"] and time.monotonic() < deadline:
        time.sleep(0.5)
    status = host.status(NAME)[NAME]
    assert status["release"] == sample["shas"]["v2"]
    assert status["programs"] == {"worker": "RUNNING"} and status["draining"] == []
    assert len(supervisords(host.root)) == 1, "one supervisord of the deployment runs"
    for _ in range(3):
        assert run_task(tasks, NAME)["version"] == "2"
    again = host.apply(upgrade)
    assert again[STATE]["changes"] == {}
