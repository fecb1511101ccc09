"""
A rollout over the whole fan-out fleet (50 minions in full mode), a Celery
task stream running through it: ``salt-run fleet.deploy NAME rev=REV
batch=20%`` against Salt's own batching of the same change, ``salt -b 20%
'*' state.apply`` with pillar's rev moved on, alternating, in this process.

Every minion gets deployment NAME, the sample app with one Celery worker
consuming queue NAME of a private RabbitMQ (each node named after its
minion: the sandboxes share one hostname). A thread sends a task to NAME
every STREAM_GAP s from before the first rollout to after the last; each
must have its result at the end (none lost). Each fleet.deploy must leave
every host ``deployed`` in the ledger (``fleet.history``).
"""

import json
import time

import yaml

from bench.env import BIN, BenchError, run
from localfleet.sampleapp import Stream, celery_app

NAME = "fr"
STREAM_GAP = 0.1
BATCH = "20%"


def _pillar(url, rev, data, broker):
    """Deployment NAME for every minion, its worker's node named after the minion (Jinja: grains['id'])."""
    command = f"celery -A sampleapp worker -Q {NAME} -c 1 -n {NAME}-{{{{ grains['id'] }}}}@%%h"
    spec = {
        "repo": url,
        "rev": rev,
        "env": {"SAMPLEAPP_DATA": str(data), "SAMPLEAPP_BROKER": broker},
        "programs": {"worker": {"command": command}},
    }
    return json.dumps({"deployments": {NAME: spec}})


def measure(bench, fleet, shas, pairs):
    """``pairs`` pairs of rollouts of NAME over every minion of ``fleet``: salt -b, then fleet.deploy."""
    from localfleet import rabbitmq

    if not rabbitmq.installed():
        raise BenchError("the rollout scenario needs rabbitmq-server: apt-get install rabbitmq-server")
    size = len(fleet.minions)
    data = bench.ws.base / "rollout-data"
    data.mkdir()
    broker = rabbitmq.RabbitMQ()
    try:
        url = broker.start().vhost("rollout")
        pillar_file = fleet.pillar_dir / "rollout.sls"

        def pillar(rev):
            pillar_file.write_text(_pillar(fleet.git.url, rev, data, url))
            fleet.salt("*", "saltutil.refresh_pillar", "wait=True")

        top = fleet.pillar_dir / "top.sls"
        tops = yaml.safe_load(top.read_text())
        tops["base"]["*"].append("rollout")
        top.write_text(yaml.safe_dump(tops))
        bench.step(f"rollout: deployment {NAME} (a Celery worker each, RabbitMQ) on {size} minion(s)")
        pillar("v1")
        fleet.apply()
        app = celery_app(data, url)
        app.send_task("sampleapp.fetch", args=("warm-up", 0), queue=NAME).get(timeout=300)
        revs = iter(f"v{n}" for n in range(2, 2 + 2 * pairs))
        with Stream(app, NAME, STREAM_GAP, 0.02) as stream:
            for n in range(pairs):
                said = f"salt -b {BATCH} '*' state.apply, then fleet.deploy batch={BATCH}"
                bench.step(f"rollout {n + 1} of {pairs}: {said}")
                rev = next(revs)
                pillar(rev)
                bench.record(f"rollout_salt_b_{size}", _salt_batched(fleet, size)[0])
                rev = next(revs)
                seconds, _ = _fleet_deploy(fleet, rev)
                bench.record(f"rollout_fleet_deploy_{size}", seconds)
                _check_ledger(fleet, shas[rev], size)
                # Back to following pillar's rev: the next salt -b moves it on.
                fleet.salt("*", "deployment.unpin", NAME)
        missing = stream.lost(300)
        bench.times.setdefault(f"rollout_tasks_{size}", []).append(len(stream.sent))
        if missing:
            raise BenchError(f"{len(missing)} of {len(stream.sent)} tasks sent during the rollouts have no result")
        bench.log(f"    {len(stream.sent)} tasks sent through the rollouts: every one has its result")
    finally:
        broker.stop()


def _timed(argv, what):
    """(seconds, its JSON output, exit code) of one run of a real CLI."""
    started = time.perf_counter()
    proc = run(argv, check=False)
    seconds = time.perf_counter() - started
    try:
        return seconds, json.loads(proc.stdout), proc.returncode
    except ValueError:
        raise BenchError(f"{what}: no JSON (exit {proc.returncode}): {(proc.stdout + proc.stderr)[-3000:]}") from None


def _salt_batched(fleet, size):
    """salt -b BATCH '*' state.apply: (seconds, returns), each state succeeded on every minion."""
    # The timeout fleet.deploy gets: Salt's default (5 s) is also how long the batch's first ping waits,
    # and a loaded host answering later is left out of the rollout altogether.
    argv = [BIN / "salt", "-c", fleet.etc, "-b", BATCH, "-t", "600", "--out=json", "--static", "-l", "quiet"]
    argv += ["*", "state.apply"]
    seconds, ret, _ = _timed(argv, "salt -b")
    bad = {
        m: states
        for m, states in ret.items()
        if not (isinstance(states, dict) and all(s.get("result") is True for s in states.values()))
    }
    if len(ret) != size or bad:
        raise BenchError(f"salt -b: {len(ret)} of {size} answered; failed: {json.dumps(bad, default=str)[:3000]}")
    return seconds, ret


def _fleet_deploy(fleet, rev):
    """salt-run fleet.deploy NAME rev=REV batch=BATCH: (seconds, its report), the rollout complete."""
    argv = [BIN / "salt-run", "-c", fleet.etc, "--out=json", "-l", "quiet", "fleet.deploy", NAME]
    seconds, report, code = _timed([*argv, f"rev={rev}", f"batch={BATCH}", "timeout=600"], "fleet.deploy")
    if code or report.get("outcome") != "complete":
        raise BenchError(f"fleet.deploy {NAME} rev={rev}: {json.dumps(report)[:3000]}")
    return seconds, report


def _check_ledger(fleet, sha, size):
    """The ledger's last rollout of NAME: every host deployed on ``sha``."""
    argv = [BIN / "salt-run", "-c", fleet.etc, "--out=json", "-l", "quiet", "fleet.history", NAME, "limit=1"]
    [entry] = json.loads(run(argv).stdout)
    hosts = entry.get("hosts") or {}
    wrong = {m: row for m, row in hosts.items() if row != {"outcome": "deployed", "release": sha}}
    if len(hosts) != size or wrong:
        raise BenchError(f"the ledger's rollout {entry.get('id')}: {len(hosts)} of {size} hosts; not deployed: {wrong}")
