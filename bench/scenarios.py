"""The bench's scenarios, each timed run recorded under a measurement key."""

import os
import time

import yaml

from bench import canary, handover, rollout
from bench.env import BIN, BenchError, Workspace, median, run, stop_supervisords, timed
from bench.fleet import Fleet
from bench.local import BuiltinsHost, LocalHost, SaltfleetHost, deployment_names, raw_floor
from bench.page import PageBench
from localfleet import rabbitmq
from localfleet.daemons import FleetError
from localfleet.sampleapp import celery_app

# Seconds between a fresh apply and the no-op ones timed after it.
SETTLE = 5

MODES = {
    # runs: timed runs per measurement (the median is reported); counts: deployments per host
    # (saltfleet; floor: the raw floor's; builtins: Salt's built-ins'); fanout: minion counts;
    # sf_noop_1: also time saltfleet's no-op on 1 deployment.
    "full": {
        "runs": 3,
        "counts": (1, 5),
        "floor": (1, 5),
        "builtins": (1, 5),
        "fanout": (1, 10, 25, 50),
        "sf_noop_1": True,
        "handover_tasks": 300,
        # pairs of windows of seconds (without, with an analysis) for the stream's tasks and for tasks of
        # no work; canary rollouts rolled back.
        "canary": {"pairs": 6, "zero_pairs": 4, "seconds": 6, "rollbacks": 3},
        # pairs of rollouts over the largest fan-out fleet (salt -b, fleet.deploy), a task stream running
        "rollout_pairs": 2,
    },
    # Every target but fan-out and built-ins, in under 5 minutes on 2 cores.
    "quick": {
        "runs": 3,
        "counts": (1, 5),
        "floor": (1, 5),
        "builtins": (),
        "fanout": (),
        "sf_noop_1": False,
        "handover_tasks": 300,
        "canary": {"pairs": 3, "zero_pairs": 0, "seconds": 5, "rollbacks": 1},
        "rollout_pairs": 0,
    },
    # One run of every code path (the test suite's smoke test).
    "smoke": {
        "runs": 1,
        "counts": (1,),
        "floor": (1,),
        "builtins": (1,),
        "fanout": (1,),
        "sf_noop_1": False,
        "handover_tasks": 100,
        # None: two minions, RabbitMQ and rollouts take minutes, not the seconds a smoke run has.
        "canary": None,
        "rollout_pairs": 0,
    },
}


class Bench:
    def __init__(self, mode, runs=None, fanout=None, log=print, keep=False, heartbeat=True):
        self.mode = mode
        self.plan = dict(MODES[mode])
        if runs:
            self.plan["runs"] = runs
        if fanout is not None:
            self.plan["fanout"] = tuple(fanout)
        self.log = log
        self.keep = keep
        self.plan["heartbeat"] = heartbeat
        self.times = {}  # measurement key -> [seconds, ...]
        self.details = {}  # measurement key -> [{state id: duration in ms}, ...]
        self.notes = []
        self.errors = {}
        self.ws = None

    # ------------------------------------------------------------- helpers

    def record(self, key, seconds, states=None):
        self.times.setdefault(key, []).append(round(seconds, 3))
        if states:
            # Salt's own duration of each state (ms): where a run's time went, for the JSON.
            self.details.setdefault(key, []).append({sid: s.get("duration") for sid, s in states.items()})
        self.log(f"    {key}: {seconds:.2f} s")

    def measure(self, key, fn, *args, runs=None, **kwargs):
        result = None
        for _ in range(runs or self.plan["runs"]):
            seconds, result = timed(fn, *args, **kwargs)
            self.record(key, seconds)
        return result

    def median(self, key):
        return median(self.times.get(key))

    def step(self, text):
        self.log(f"==> {text}  (load average {', '.join(f'{x:.1f}' for x in _loadavg())})")

    def guarded(self, name, fn):
        """Run a scenario; a failure is reported in the table, the other scenarios still run."""
        try:
            fn()
        except FleetError as exc:
            self.errors[name] = str(exc)
            self.log(f"!!! {name} failed: {exc}")

    # ------------------------------------------------------------- scenarios

    def run(self, only=()):
        """Every scenario of the plan, or those named in ``only`` (SCENARIOS' names)."""
        wanted = {
            "warm-up": True,
            "start-up": True,
            "floor": True,
            "saltfleet": True,
            "built-ins": bool(self.plan["builtins"]),
            "fan-out": bool(self.plan["fanout"]),
            "handover": bool(self.plan["handover_tasks"]),
            "canary": bool(self.plan["canary"]),
        }
        self.ws = Workspace(keep=self.keep)
        try:
            self.log(f"workspace {self.ws.base}")
            for name, fn in self.scenarios().items():
                if wanted[name] and (not only or name in only):
                    self.guarded(name, fn)
        finally:
            self.ws.close()
        return self

    def scenarios(self):
        return {
            "warm-up": self.warm_up,
            "start-up": self.startup,
            "floor": self.floor,
            "saltfleet": self.saltfleet,
            "built-ins": self.builtins,
            "fan-out": self.fanout,
            "handover": self.handover,
            "canary": self.canary,
        }

    def warm_up(self):
        """One untimed fresh deployment: uv's cache, the page cache and Salt's bytecode are warm after it."""
        self.step("warm-up (untimed): one saltfleet deployment, one raw floor deployment")
        host = SaltfleetHost(self.ws.sandbox(), self.ws.repo, self.ws.data, deployment_names(1, "wu"))
        host.converge()
        raw_floor(self.ws.sandbox(), self.ws.repo, self.ws.data, deployment_names(1, "wu"))
        stop_supervisords(self.ws.base)

    def startup(self):
        self.step("salt-call --local test.ping: Salt's own start-up")
        host = SaltfleetHost(self.ws.sandbox(), self.ws.repo, self.ws.data, [])
        host.ping()
        self.measure("startup", host.ping)

    def floor(self):
        for count in self.plan["floor"]:
            self.step(f"raw shell floor: {count} deployment(s), one after another")
            for _ in range(self.plan["runs"]):
                root = self.ws.sandbox()
                seconds, _ = timed(raw_floor, root, self.ws.repo, self.ws.data, deployment_names(count))
                self.record(f"floor_fresh_{count}", seconds)
                stop_supervisords(root)

    def saltfleet(self):
        biggest = max(self.plan["counts"])
        for count in self.plan["counts"]:
            self.step(f"saltfleet fresh: {count} deployment(s) through salt-call --local")
            host = None
            for _ in range(self.plan["runs"]):
                if host is not None:
                    stop_supervisords(host.root)
                host = SaltfleetHost(self.ws.sandbox(), self.ws.repo, self.ws.data, deployment_names(count))
                seconds, states = timed(host.converge)
                self.record(f"sf_fresh_{count}", seconds, states)
            # The last fresh host goes on: nothing changed, then a new revision of one of its deployments.
            if count == biggest or self.plan["sf_noop_1"]:
                self.noop(host, count)
            if count == biggest:
                self.new_revision(host, count)
            stop_supervisords(host.root)

    def noop(self, host, count):
        self.step(f"saltfleet no-op: {count} deployment(s), nothing changed, beside {count} test.nop states")
        # Salt's floor for the same shape: an apply of one test.nop state per deployment.
        nops = {f"nop-{n + 1}": {"test.nop": []} for n in range(count)}
        floor = LocalHost(self.ws.sandbox(), self.ws.repo, self.ws.data, sls=yaml.safe_dump(nops))
        floor.apply()
        settle()
        for _ in range(self.plan["runs"]):
            # Salt's start-up and floor again beside each no-op: the machine's load drifts between scenarios.
            seconds, _ = timed(host.ping)
            self.record(f"startup_beside_noop_{count}", seconds)
            self.record(f"salt_nop_local_{count}", timed(floor.apply)[0])
            seconds, states = timed(host.converge)
            changed = host.changes(states)
            if changed:
                raise BenchError(f"a no-op apply changed something: {changed}")
            self.record(f"sf_noop_{count}", seconds, states)

    def new_revision(self, host, count):
        name = host.names[0]
        self.step(f"saltfleet new revision of {name} on a host with {count} (a revision never deployed before)")
        for n in range(self.plan["runs"]):
            rev = f"v{n + 2}"
            seconds, states = timed(host.converge, {name: rev})
            changed = host.changes(states)
            touched = sorted(k for k in changed if k.startswith("saltfleet-deployment-"))
            if touched != [f"saltfleet-deployment-{name}"] or "release" not in changed[touched[0]]:
                raise BenchError(f"the new revision of {name} touched {touched}: {changed}")
            self.record(f"sf_newrev_1of{count}", seconds, states)

    def builtins(self):
        for count in self.plan["builtins"]:
            self.step(f"Salt built-ins: {count} deployment(s) through salt-call --local (fresh, then no-op)")
            host = None
            fresh_runs = self.plan["runs"] if self.mode == "full" else 1
            for n in range(fresh_runs):
                host = BuiltinsHost(self.ws.sandbox(), self.ws.repo, self.ws.data, deployment_names(count))
                seconds, _ = timed(host.converge)
                self.record(f"builtins_fresh_{count}", seconds)
                if n < fresh_runs - 1:
                    stop_supervisords(host.root)

            def again(host=host):
                states = host.converge()
                changed = [sid for sid, s in states.items() if s["changes"]]
                if changed:
                    raise BenchError(f"a no-op apply of the built-ins changed {changed}")

            settle()
            self.measure(f"builtins_noop_{count}", again)
            stop_supervisords(host.root)

    def fanout(self):
        fleet = Fleet(self.ws.base / "f", self.ws.repo, heartbeat=self.plan["heartbeat"])
        page = PageBench(fleet, self.log)
        try:
            self.step("fan-out: salt-master on 127.0.0.1, salt-api beside it (the fleet page)")
            page.configure()
            fleet.start_master()
            self.guarded("page", page.start)
            self.measure("saltrun_startup", _salt_run_startup, fleet)
            client = fleet.runner_client()
            try:
                self._fanout_sizes(fleet, client, page)
                if self.plan["rollout_pairs"]:
                    pairs = self.plan["rollout_pairs"]
                    self.guarded("rollout", lambda: rollout.measure(self, fleet, self.ws.shas, pairs))
            finally:
                fleet.close_runner_client(client)
            if "page" not in self.errors:
                self.guarded("page", lambda: self.page_progress(fleet, page))
        finally:
            page.stop()
            fleet.stop()

    def page_first_load(self, page, size):
        self.step(f"fan-out: the fleet page's first load with {size} minion(s), beside fleet.overview via salt-api")
        page.first_load(size)  # untimed: the browser's cache holds the page's files, as a returning operator's does
        for _ in range(self.plan["runs"]):
            self.record(f"page_floor_{size}", page.floor())
            self.record(f"page_overview_{size}", page.overview())
            filled, static = page.first_load(size)
            self.record(f"page_load_{size}", filled)
            self.record(f"page_static_{size}", static)

    def page_progress(self, fleet, page):
        size = len(fleet.minions)
        host = sorted(fleet.minions)[0]
        self.step(f"fan-out: rollout progress on the fleet page, a one-host fleet.deploy among {size} minion(s)")
        for n in range(self.plan["runs"]):
            shown, plain = page.progress(f"v{n + 2}", host)
            self.record(f"page_event_{size}", shown)
            self.record(f"page_event_plain_{size}", plain)

    def _fanout_sizes(self, fleet, client, page):
        for size in self.plan["fanout"]:
            more = size - len(fleet.minions)
            self.step(f"fan-out: {more} more minion(s), {size} in all, 2 idle deployments each")
            started = time.monotonic()
            new = fleet.add_minions(more)
            self.log(f"    minions up and synced in {time.monotonic() - started:.1f} s")
            seconds, _ = timed(fleet.apply, "list", new)
            self.record(f"master_fresh_new_{more}", seconds)
            self.step(f"fan-out: salt '*' state.apply, no-op, {size} minion(s), beside Salt's own (one test.nop)")
            for _ in range(self.plan["runs"]):
                asked = fleet.git.requests()
                self.record(f"master_noop_{size}", timed(fleet.apply)[0])
                self.times.setdefault(f"git_requests_noop_{size}", []).append(fleet.git.requests() - asked)
                self.record(f"salt_nop_{size}", timed(fleet.apply_nop)[0])
            self.step(f"fan-out: salt-run fleet.inventory over {size} minion(s)")
            self.measure(f"inventory_cli_{size}", fleet.inventory_cli)
            fleet.inventory_in_process(client)
            self.measure(f"inventory_runner_{size}", fleet.inventory_in_process, client)
            if "page" not in self.errors:
                self.guarded("page", lambda size=size: self.page_first_load(page, size))

    def handover(self):
        """
        Task latency during a handover: the same steady stream at rest, then while
        a new release takes over, against RabbitMQ when it is installed.
        """
        count = self.plan["handover_tasks"]
        broker = rabbitmq.RabbitMQ() if rabbitmq.installed() else None
        self.plan["handover_broker"] = (
            "RabbitMQ" if broker else "the sample app's filesystem broker (rabbitmq-server is not installed)"
        )
        self.step(f"handover: {count} tasks at {handover.RATE}/s at rest, then during an upgrade")
        host = None
        try:
            url = broker.start().url() if broker else None
            data = self.ws.base / "handover-data"
            data.mkdir()
            name = "hv1"
            env = {"SAMPLEAPP_BROKER": url} if url else {}
            host = SaltfleetHost(self.ws.sandbox(), self.ws.repo, data, [name], env=env, concurrency=2)
            host.converge()
            app = celery_app(data, url)
            handover.stream(app, name, data, handover.LEAD)  # untimed: connections and workers warm
            for n in range(self.plan["runs"]):
                for key, result in (
                    ("rest", handover.stream(app, name, data, count)),
                    ("deploy", handover.stream(app, name, data, count, lambda n=n: host.converge({name: f"v{n + 2}"}))),
                ):
                    self.record(f"handover_{key}_p50", handover.percentile(result["latencies"], 50))
                    self.record(f"handover_{key}_p99", handover.percentile(result["latencies"], 99))
                    self.record(f"handover_{key}_gap", result["gap"])
                    self.times.setdefault(f"handover_{key}_tasks", []).append(result["tasks"])
        finally:
            if host is not None:
                stop_supervisords(host.root)
            if broker is not None:
                broker.stop()

    def canary(self):
        """
        Canary rollouts on two hosts that run tasks: the fleet's throughput while
        an analysis watches it against none, and the time a bad release takes to
        be rolled back once it could be judged.
        """
        canary.measure(self, self.plan["canary"])


def settle(seconds=SETTLE):
    """Let Celery workers that just reached RUNNING finish booting: a routine re-apply meets a quiet host."""
    time.sleep(seconds)


def _salt_run_startup(fleet):
    run([BIN / "salt-run", "-c", fleet.etc, "-l", "quiet", "test.arg"])


def _loadavg():
    try:
        return os.getloadavg()
    except OSError:
        return (0.0, 0.0, 0.0)
