"""
Canary rollouts on a fleet that runs tasks: a salt-master and two
salt-minions on 127.0.0.1, each a sandbox of its own (the root its
deployment lives under), the sample app's Celery workers on both consuming
one queue of a private RabbitMQ (localfleet.rabbitmq: a broker that carries
Celery's events), as tests/integration/test_canary.py runs them.

- Throughput under analysis: the workers saturated by a backlog of the
  stream's tasks; the tasks completed per second (the sample app's execution
  records) in windows where an analysis watches the fleet (the listeners of
  ``deployment.task_events`` running, task events on, the hosts asked for
  their counts every window through saltfleet_jobs.publish, as the
  runner's analysis asks them) and in windows where nothing does,
  alternating, in this process.
- Time to roll back: ``salt-run fleet.deploy`` in steps (1 host, analyse, the
  rest) of a release whose tasks raise for 4 inputs in 10, a stream of tasks
  running through it. Afterwards, from the execution records: the moment the
  new release had served enough failing tasks to be judged (the first of its
  completions after which the exact one-sided binomial lower bound of its
  failure rate is above the limit, as saltfleet_analysis.judge decides), and the
  first task the old release started after it on the changed host, in a
  worker the rollback started; between the two, from the master's event
  bus, when the analysis began, when it decided and when the rollback went out.
"""

import datetime
import json
import math
import os
import shutil
import threading
import time
from pathlib import Path

import yaml

from bench import cpu
from bench.env import (
    BIN,
    USER,
    UV_CACHE,
    BenchError,
    git,
    run,
    serving_socket,
    sf,
    stop_supervisords,
    wait_programs_running,
)
from localfleet import procs
from localfleet.config import REPO
from localfleet.daemons import Master, start_minions
from localfleet.sampleapp import SAMPLE_APP, Stream, celery_app, executions

NAME = "canary"
HOSTS = ("m01", "m02")
CONCURRENCY = 2
# The stream (the integration test's): a task every STREAM_GAP s, each working TASK_SECONDS in a good release.
STREAM_GAP, TASK_SECONDS = 0.05, 0.02
STEPS = '[{hosts: 1}, {analyse: 30}, {hosts: "100%"}]'
WINDOW = 3
ANALYSIS = f"{{window: {WINDOW}}}"
GOOD, FLAKY = "good", "flaky"
# The flaky release's tasks raise for the inputs p<n> with n % FAIL_EVERY < FAIL_BELOW: 4 in 10.
FAIL_EVERY, FAIL_BELOW = 10, 4
# Where the flaky release raises: after its execution record is complete, before it returns.
RETURN = '    return {"platform": platform'
# Seconds after the listeners started (or ended) before a window is timed.
SETTLE = 2
# Seconds the stream runs before a rollout, and after it returned.
LEAD, TAIL = 3, 5


def fails(platform):
    """Whether the flaky release's task raises for input ``platform`` (the rule written into it)."""
    return int(platform[1:]) % FAIL_EVERY < FAIL_BELOW


def canary_repo(base):
    """A bare repo of the sample app: ``good`` (master) and ``flaky`` off it; (path, {name: sha})."""
    work = Path(base) / "canary-app"
    shutil.copytree(SAMPLE_APP, work, ignore=shutil.ignore_patterns("__pycache__"))
    app = work / "sampleapp.py"
    source = app.read_text()
    if RETURN not in source or 'VERSION = "1"' not in source:
        raise BenchError(f"the sample app changed: {app} has no {RETURN!r} for the flaky release")
    raises = (
        f"    if int(platform[1:]) % {FAIL_EVERY} < {FAIL_BELOW}:\n"
        f"        raise ValueError('{FAIL_BELOW} in {FAIL_EVERY}')\n"
    )
    git("init", "-q", "--initial-branch=master", cwd=work)
    shas = {}
    for name, text in (
        (GOOD, source.replace('VERSION = "1"', f'VERSION = "{GOOD}"')),
        (FLAKY, source.replace('VERSION = "1"', f'VERSION = "{FLAKY}"').replace(RETURN, raises + RETURN, 1)),
    ):
        if name != GOOD:
            git("checkout", "-q", "-b", name, shas[GOOD], cwd=work)
        app.write_text(text)
        git("add", "-A", cwd=work)
        git("commit", "-q", "-m", f"sample app, {name}", cwd=work)
        shas[name] = git("rev-parse", "HEAD", cwd=work)
    bare = Path(base) / "canary-app.git"
    git("clone", "-q", "--bare", str(work), str(bare))
    return bare, shas


def _epoch(stamp):
    return datetime.datetime.fromisoformat(stamp).timestamp()


class CanaryFleet:
    """The master, its two minions and their pillar: deployment NAME of the sample app on the broker at ``broker``."""

    def __init__(self, base, repo, broker, broker_base):
        self.base = Path(base)
        self.repo, self.broker, self.broker_base = repo, broker, broker_base
        self.data = self.base / "data"
        self.pillar_dir = self.base / "pillar"
        for folder in (self.data, self.pillar_dir):
            folder.mkdir(parents=True)
        self.master = Master(self.base, {"id": "bench-canary", "log_level_logfile": "warning"})
        self.master.config["pillar_roots"] = {"base": [str(self.pillar_dir)]}
        self.master.write()
        self.minions = {}
        self._mopts = None

    # ------------------------------------------------------------- daemons

    def start(self, timeout=600):
        self.master.start()
        self.minions = start_minions(self.master, {mid: self.base / "m" / mid for mid in HOSTS}, timeout=timeout)

    def stop(self):
        roots = [m.sandbox for m in self.minions.values()]
        for root in roots:
            stop_supervisords(root)
        procs.stop([pid for pid in (m.pid() for m in self.minions.values()) if pid], timeout=30)
        self.master.stop()
        leftovers = procs.processes_under(self.base)
        if leftovers:
            procs.stop(list(leftovers), timeout=30)

    @property
    def mopts(self):
        """The master's opts, as its runners get them (saltfleet_jobs.publish takes them)."""
        if self._mopts is None:
            import salt.config

            self._mopts = salt.config.master_config(str(self.master.etc / "master"))
        return self._mopts

    def root(self, minion):
        """The root of ``minion``'s deployment: saltfleet:root defaults to the minion's root_dir, its sandbox."""
        return self.minions[minion].sandbox

    def node(self, minion):
        """The Celery node name of ``minion``'s worker, as pillar gives it (before ``@``)."""
        return f"{NAME}-{minion}"

    def ran_on(self, record, minion):
        """Whether an execution record is from ``minion``'s worker (saltfleet names it ``<node>.g<generation>@...``)."""
        name = record["node"].split("@", 1)[0]
        return name == self.node(minion) or name.startswith(f"{self.node(minion)}.")

    # ------------------------------------------------------------- commands

    def salt(self, fun, *args, timeout=900):
        """The real `salt` CLI on both hosts; {minion: return}, raising unless both answered."""
        ret, proc = self.master.salt(",".join(HOSTS), fun, *args, timeout=timeout, list_tgt=True)
        missing = sorted(set(HOSTS) - set(ret or {}))
        if missing:
            raise BenchError(f"salt {fun}: no answer from {missing}:\n{(proc.stdout + proc.stderr)[-3000:]}")
        return ret

    def write_pillar(self, sha):
        """Each host's pillar: deployment NAME at ``sha``, a worker named after the host; the master reads it anew."""
        shutil.copyfile(REPO / "pillar" / "fleet.sls", self.pillar_dir / "fleet.sls")
        top = {"base": {"*": ["fleet"], **{mid: [f"host-{mid}"] for mid in HOSTS}}}
        (self.pillar_dir / "top.sls").write_text(yaml.safe_dump(top))
        for mid in HOSTS:
            # %% is supervisord's escape for a literal %: celery sees -n canary-m01@%h.
            command = f"celery -A sampleapp worker -Q {NAME} -c {CONCURRENCY} -n {self.node(mid)}@%%h"
            spec = {
                "repo": str(self.repo),
                "rev": sha,
                "env": {"SAMPLEAPP_DATA": str(self.data), "SAMPLEAPP_BROKER": self.broker},
                "programs": {"worker": {"command": command}},
            }
            pillar = {"saltfleet": {"user": USER, "uv_cache": str(UV_CACHE)}, "deployments": {NAME: spec}}
            (self.pillar_dir / f"host-{mid}.sls").write_text(yaml.safe_dump(pillar))
        self.salt("saltutil.refresh_pillar", "wait=True")

    def converge(self, sha):
        """Both hosts serve ``sha`` (state.apply), their workers RUNNING."""
        self.write_pillar(sha)
        for mid, states in self.salt("state.apply").items():
            ok = isinstance(states, dict) and states and all(s.get("result") is True for s in states.values())
            if not ok:
                raise BenchError(f"state.apply on {mid} failed: {json.dumps(states, default=str)[:3000]}")
        for mid in HOSTS:
            wait_programs_running(*serving_socket(self.root(mid), USER, NAME))

    def canary(self, sha):
        """`salt-run fleet.deploy` of ``sha`` in steps, the real CLI: its report."""
        argv = [BIN / "salt-run", "-c", self.master.etc, "--out=json", "-l", "quiet", "fleet.deploy", NAME]
        argv += [f"rev={sha}", f"steps={STEPS}", f"analysis={ANALYSIS}", "timeout=300"]
        proc = run(argv, check=False)
        try:
            return json.loads(proc.stdout)
        except ValueError:
            raise BenchError(
                f"fleet.deploy {NAME}: no report (exit {proc.returncode}):\n{proc.stdout[-3000:]}"
            ) from None

    def cpu_parts(self):
        """The parts a window's CPU is told by (bench.cpu): each claims its processes by pid and command line."""
        mine, base, rabbit = os.getpid(), str(self.base), str(self.broker_base)
        return {
            # Each under this fleet's folder (its venv, its logs), whoever else runs a deployment of that name.
            # The listeners' argument names the workers too: they come first.
            "listeners": lambda pid, argv: any(base in a and f"/log/{NAME}/events." in a for a in argv),
            # A worker's -n names its node (the pool's processes too).
            "workers": lambda pid, argv: (
                any(base in a for a in argv) and any(self.node(mid) in a for a in argv for mid in HOSTS)
            ),
            "rabbitmq": lambda pid, argv: any(rabbit in a for a in argv),
            "salt": lambda pid, argv: any(base in a for a in argv),
            "bench": lambda pid, argv: pid == mine,
        }

    # ------------------------------------------------------------- analysis's listeners

    def task_events(self, watch, **kwarg):
        """``deployment.task_events NAME watch=...`` on both hosts, published as the runner's analysis does."""
        _, returns = sf.saltfleet_jobs.publish(
            self.mopts, list(HOSTS), "deployment.task_events", [NAME], {"watch": watch, **kwarg}, max(10, 2 * WINDOW)
        )
        return returns

    def listeners(self):
        """{pid: command line} of the listeners running (their argument names a file in the deployment's logs)."""
        found = {}
        for mid in HOSTS:
            found.update(procs.processes_under(sf.saltfleet_paths.paths(self.root(mid), USER, NAME)["logs"]))
        return found

    def start_watch(self, watch, seconds, timeout=60):
        """Start the listeners of ``watch`` on both hosts; return once each wrote its first counts (events on)."""
        deadline = time.monotonic() + timeout
        while True:
            returns = self.task_events(watch, seconds=seconds)
            said = {mid: (returns.get(mid) or {}).get("ret") for mid in HOSTS}
            waiting = {mid: ret for mid, ret in said.items() if not isinstance(ret, dict) or ret.get("problems")}
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise BenchError(f"the listeners of {watch} did not report within {timeout} s: {waiting}")
            time.sleep(0.25)

    def stop_watch(self, watch, timeout=60):
        """Stop the listeners of ``watch``; return once none runs (each switched its events off as it ended)."""
        self.task_events(watch, stop=True)
        deadline = time.monotonic() + timeout
        while self.listeners():
            if time.monotonic() > deadline:
                raise BenchError(f"listeners still run {timeout} s after stop=True: {self.listeners()}")
            time.sleep(0.1)


class Bus(threading.Thread):
    """The master's event bus, read from this process: saltfleet's rollout lines and the runner's progress."""

    def __init__(self, opts):
        super().__init__(daemon=True)
        self.opts = opts
        self.events = []  # (tag, data)
        self.ready, self.done = threading.Event(), threading.Event()
        self.error = None

    def run(self):
        import salt.utils.event

        try:
            with salt.utils.event.get_master_event(self.opts, self.opts["sock_dir"], listen=True) as bus:
                bus.connect_pub()
                self.ready.set()
                while not self.done.is_set():
                    event = bus.get_event(wait=0.2, full=True)
                    tag = (event or {}).get("tag", "")
                    if tag.startswith("saltfleet/rollout/") or tag.endswith("/progress"):
                        self.events.append((tag, event["data"]))
        except Exception as exc:  # pylint: disable=broad-except
            self.error = exc
            self.ready.set()

    def __enter__(self):
        self.start()
        if not self.ready.wait(30) or self.error:
            raise BenchError(f"the master's event bus: {self.error or 'no connection within 30 s'}")
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.join(10)

    def first(self, match):
        """The epoch of the first event whose data ``match`` accepts; None when none did."""
        return next((_epoch(data["_stamp"]) for _, data in self.events if match(data)), None)


# ------------------------------------------------------------------ throughput


class Throughput:
    """The fleet's tasks completed per second, the workers saturated, in windows with and without an analysis."""

    def __init__(self, fleet, app, log):
        self.fleet, self.app, self.log = fleet, app, log
        self.sent = []

    def fill(self, count, seconds=0):
        """Send ``count`` tasks of ``seconds`` each to NAME's queue (the backlog); their ids."""
        ids = []
        for n in range(count):
            ids.append(self.app.send_task("sampleapp.fetch", args=(f"b{len(self.sent) + n}", seconds), queue=NAME).id)
        self.sent += ids
        return ids

    def backlog(self):
        """Messages ready in NAME's queue (none: the workers were not kept busy)."""
        with self.app.connection_for_write() as conn:
            return conn.default_channel.queue_declare(NAME, passive=True).message_count

    def purge(self):
        with self.app.connection_for_write() as conn:
            conn.default_channel.queue_purge(NAME)

    def rate(self, count, seconds):
        """Tasks completed per second over ``count`` tasks run through the fleet, waited for (warm-up, sizing)."""
        ids = set(self.fill(count, seconds))
        deadline = time.monotonic() + 300
        while True:
            runs = executions(self.fleet.data)
            ends = sorted(r[0]["end"] for task, r in runs.items() if task in ids and r[0]["end"])
            if len(ends) == len(ids):
                break
            if time.monotonic() > deadline:
                raise BenchError(f"{len(ids) - len(ends)} of {len(ids)} warm-up tasks did not run within 300 s")
            time.sleep(0.5)
        # Past the first tenth: the workers had every task at hand by then.
        skip = len(ends) // 10
        return (len(ends) - skip - 1) / (ends[-1] - ends[skip])

    def windows(self, pairs, seconds, task_seconds):
        """
        ``pairs`` of windows of ``seconds``: without, then with an analysis
        watching; before each pair, the backlog topped up to twice what the
        workers took in the busiest pair yet (or in a warm-up's time).
        Returns each window: {watched, start, end, cores: {part: cores it used}}.
        """
        rate = self.rate(200, task_seconds)
        # A pair: two windows, a settle before each, the listeners' start and end (~10 s).
        need = math.ceil(2 * rate * (2 * (seconds + SETTLE) + 10))
        self.log(f"    warm-up: {rate:.0f} tasks/s; tasks of {task_seconds * 1000:.0f} ms, {need}+ kept waiting")
        found = []
        for pair in range(pairs):
            left = self.backlog()
            if left < need:
                self.fill(need - left, task_seconds)
                left = need
            found.append(self._window(seconds))
            watch = f"bench-{pair}"
            self.fleet.start_watch(watch, seconds + 60)
            try:
                found.append(self._window(seconds, watch))
            finally:
                self.fleet.stop_watch(watch)
            after = self.backlog()
            if not after:
                self.purge()
                raise BenchError(f"the backlog ran dry in pair {pair + 1}: the workers were not kept busy")
            need = max(need, 2 * (left - after))
        self.purge()
        return found

    def _window(self, seconds, watch=None):
        """A window after SETTLE s; with ``watch``, the hosts asked every WINDOW s meanwhile, as an analysis does."""
        time.sleep(SETTLE)
        parts = self.fleet.cpu_parts()
        start, before = time.time(), cpu.snapshot(parts)
        while watch and time.time() + WINDOW < start + seconds:
            asked = time.monotonic()
            self.fleet.task_events(watch, seconds=seconds + 60)
            time.sleep(max(0.0, asked + WINDOW - time.monotonic()))
        time.sleep(max(0.0, start + seconds - time.time()))
        end, after = time.time(), cpu.snapshot(parts)
        return {"watched": bool(watch), "start": start, "end": end, "cores": cpu.cores(before, after, end - start)}

    def counted(self, windows):
        """Each window with its ``rate``, tasks completed per second, from the execution records' ends."""
        runs = executions(self.fleet.data)
        ends = [r["end"] for task in self.sent for r in runs.get(task, ()) if r["end"]]
        return [{**w, "rate": sum(w["start"] <= e < w["end"] for e in ends) / (w["end"] - w["start"])} for w in windows]


# ------------------------------------------------------------------ time to roll back


def rollback_run(fleet, app, shas):
    """
    One canary rollout of the flaky release, a stream running: in seconds,
    the total (judged -> serving again) and its parts: ``wait`` (judged ->
    the analysis began: the canary host's deploy had not returned yet),
    ``decide`` (-> the analysis decided), ``send`` (-> the rollback went
    out), ``serve`` (-> the old release took a task on the changed host);
    and what it saw.
    """
    with Bus(fleet.mopts) as bus, Stream(app, NAME, STREAM_GAP, TASK_SECONDS) as stream:
        time.sleep(LEAD)
        started = time.time()
        report = fleet.canary(shas[FLAKY])
        time.sleep(TAIL)
    if report.get("outcome") != "rolled back" or len(report.get("rolled back") or {}) != 1:
        raise BenchError(f"the flaky release was not rolled back from one host: {json.dumps(report)[:3000]}")
    [changed] = report["rolled back"]
    states = stream.states()
    lost = [task for task, state in states.items() if state not in Stream.DONE]
    if lost:
        raise BenchError(f"{len(lost)} tasks of the stream have no result after 180 s, e.g. {lost[0]}")
    inputs = {result.id: platform for platform, result in stream.sent}
    runs = executions(fleet.data)
    records = [r for task in inputs for r in runs.get(task, ())]
    for r in records:
        if r["version"] == FLAKY and (states[r["task"]] == "FAILURE") != fails(inputs[r["task"]]):
            raise BenchError(f"task {r['task']} ({inputs[r['task']]}) of the flaky release gave {states[r['task']]}")
    judged = judged_at(records, inputs, started)
    if judged is None:
        raise BenchError("the flaky release never served enough failing tasks to be judged")
    served = serving_again(fleet, records, changed, judged["at"])
    if served is None:
        raise BenchError(f"the old release ran no task on {changed} in a new worker after the flaky one was judged")
    decided = bus.first(lambda d: d.get("event") == "analysis" and d.get("decision") == "failed")
    sent = bus.first(lambda d: d.get("event") == "batch" and d.get("rollback"))
    returned = bus.first(lambda d: d.get("event") == "host" and d.get("rollback"))
    watching = bus.first(lambda d: "analysis 1: watching" in str(d.get("message", "")))
    counting = bus.first(lambda d: d.get("event") == "analysis" and _finished(d["new"]) + _finished(d["old"]) > 0)
    if None in (decided, sent, returned, watching, counting):
        raise BenchError(f"the master's bus lacks the analysis's or the rollback's lines: {bus.events[-20:]}")
    [analysis] = report["analysis"]
    began = max(judged["at"], watching)
    return {
        "total": served - judged["at"],
        # The parts, one after the other: they add up to the total.
        "wait": began - judged["at"],
        "decide": decided - began,
        "send": sent - decided,
        "serve": served - sent,
        # Beside them: the first window with counts (the listeners had started), after the analysis began;
        # deployment.rollback's return, after the rollback was sent.
        "counting": counting - watching,
        "returned": returned - sent,
        "judged": {**judged, "at": round(judged["at"] - started, 2)},
        "decided_on": {k: analysis["new"][k] for k in ("succeeded", "failed")},
        "decided_elapsed": analysis["elapsed"],
    }


def _finished(figures):
    return figures["succeeded"] + figures["failed"]


def serving_again(fleet, records, minion, judged):
    """
    When the old release took a task again on ``minion`` after ``judged``: the
    first task it started there in a worker that had run none before (the
    rollback's new generation; the old generation the canary replaced drains
    the tasks it held for a while after the canary serves).
    """
    old = [r for r in records if fleet.ran_on(r, minion) and r["version"] == GOOD]
    before = {r["node"] for r in old if r["start"] < judged}
    return min((r["start"] for r in old if r["start"] >= judged and r["node"] not in before), default=None)


def judged_at(records, inputs, since):
    """
    The first completion of the flaky release after which the exact one-sided
    binomial lower bound of its failure rate (its tasks so far, failed by its
    own rule) is above the limit against the old release (its tasks completed
    since ``since``), at the analysis's default confidence: {at, tasks, failed,
    low, limit}; None when it never is.
    """
    settings = sf.saltfleet_schema.analysis_settings({"window": WINDOW})
    new = sorted((r for r in records if r["version"] == FLAKY), key=lambda r: r["end"])
    old = sorted(r["end"] for r in records if r["version"] == GOOD and r["end"] >= since)
    failed = 0
    for n, record in enumerate(new, 1):
        failed += fails(inputs[record["task"]])
        done = sum(end <= record["end"] for end in old)
        # The old release fails none of its tasks.
        figures = {"succeeded": done, "failed": 0, "failure_rate": 0.0 if done else None}
        limit = sf.saltfleet_analysis.limit(figures, settings)
        low = sf.saltfleet_analysis.lower_bound(failed, n, settings["confidence"])
        if low > limit:
            return {"at": record["end"], "tasks": n, "failed": failed, "low": low, "limit": limit}
    return None


# ------------------------------------------------------------------ the scenario


def measure(bench, plan):
    """The canary scenario: ``plan`` {pairs, seconds, zero_pairs, rollbacks}; into ``bench``'s times."""
    from localfleet import rabbitmq

    if not rabbitmq.installed():
        raise BenchError("the canary scenario needs rabbitmq-server (task events): apt-get install rabbitmq-server")
    base = bench.ws.base / "c"
    base.mkdir()
    repo, shas = canary_repo(base)
    broker = rabbitmq.RabbitMQ()
    fleet = None
    try:
        url = broker.start().vhost("canary")
        fleet = CanaryFleet(base / "f", repo, url, broker.base)
        bench.step(f"canary: a master, {len(HOSTS)} minions, the sample app on RabbitMQ ({CONCURRENCY} workers each)")
        fleet.start()
        fleet.converge(shas[GOOD])
        app = celery_app(fleet.data, url)
        tput = Throughput(fleet, app, bench.log)
        for label, task_seconds, pairs in (
            ("stream", TASK_SECONDS, plan["pairs"]),
            ("zero", 0, plan["zero_pairs"]),
        ):
            if not pairs:
                continue
            bench.step(
                f"canary: throughput, tasks of {task_seconds * 1000:.0f} ms, {pairs} pair(s) of {plan['seconds']} s "
                "windows without/with an analysis watching"
            )
            windows = tput.counted(tput.windows(pairs, plan["seconds"], task_seconds))
            for plain, watched in zip(windows[::2], windows[1::2], strict=True):
                # Each watched window against the one just before it: the machine's drift cancels in the pair.
                bench.times.setdefault(f"canary_tput_{label}_ratio", []).append(
                    round(watched["rate"] / plain["rate"], 3)
                )
            for window in windows:
                side = "watched" if window["watched"] else "plain"
                bench.times.setdefault(f"canary_tput_{label}_{side}", []).append(round(window["rate"], 1))
                for part, used in window["cores"].items():
                    bench.times.setdefault(f"canary_cores_{label}_{side}_{part}", []).append(round(used, 3))
                said = ", ".join(f"{part} {used:.2f}" for part, used in window["cores"].items())
                bench.log(f"    {side}: {window['rate']:.1f} tasks/s; cores used: {said}")
        for n in range(plan["rollbacks"]):
            bench.step(f"canary: rollout {n + 1} of {plan['rollbacks']} of a release failing 4 inputs in 10, a stream")
            got = rollback_run(fleet, app, shas)
            for part in ("total", "wait", "decide", "send", "serve", "counting", "returned"):
                bench.record(f"canary_rollback_{part}", got[part])
            bench.times.setdefault("canary_rollback_judged_tasks", []).append(got["judged"]["tasks"])
            said = f"the analysis decided on {got['decided_on']} at {got['decided_elapsed']} s"
            bench.log(f"    judged at {got['judged']}; {said}")
    finally:
        if fleet is not None:
            fleet.stop()
        broker.stop()
