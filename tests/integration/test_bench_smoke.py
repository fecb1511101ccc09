"""
The benchmark runs and prints its table (`python -m bench --smoke`: one run of
the smallest set of every scenario). Nothing here is about speed: the bench
itself reports its targets; this only keeps it from rotting.
"""

import json
import subprocess
import sys

from localfleet.config import REPO

SCENARIOS = (
    "salt-call --local test.ping",
    "fresh host, 1 deployment(s)",
    "no-op re-apply, 1 deployment(s), vs built-ins",
    "no-op re-apply, 1 deployment(s), vs 1 test.nop states",
    "new revision of 1 of 1 deployments",
    "fan-out no-op: salt '*' state.apply, 1 minion(s)",
    "git server requests in a fan-out no-op, 1 minion(s)",
    "fleet.inventory over 1 minion(s)",
    "fleet page first load, 1 minion(s)",
    "rollout progress on the fleet page, 1 minion(s)",
    "task latency p99 during a handover",
)


def test_smoke_bench_prints_its_table(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--json-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]
    header = next(line for line in out.splitlines() if line.startswith("scenario"))
    for column in ("baseline medians", "saltfleet", "ratio", "target", "met"):
        assert column in header
    for scenario in SCENARIOS:
        assert scenario in out, f"{scenario!r} missing from the table:\n{out[-4000:]}"
    result = json.loads((tmp_path / "latest.json").read_text())
    assert result["mode"] == "smoke"
    assert result["errors"] == {}
    assert result["machine"]["cores"] >= 1
    measured = {"startup", "floor_fresh_1", "sf_fresh_1", "builtins_noop_1", "master_noop_1", "handover_deploy_p99"}
    assert measured | {"page_load_1", "page_event_1"} <= set(result["times"])
