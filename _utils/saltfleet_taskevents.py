"""
What a deployment's Celery workers on this host did with their tasks, from
Celery's own events, for a rollout's analysis (``deployment.task_events``).

A watch is one listener per app of the deployment: a process of the user's
(in the serving release, with its venv and env, as Celery's control runs)
that switches task events on for this host's nodes of the deployment, binds
a queue of its own to the app's event exchange, and keeps counting until its
deadline or until it is stopped, writing what it counted so far to a file in
the deployment's log folder every half second. It switches the events off
again when it ends.

What it writes is the user's word, read as such: the file is read without
following a link and bounded, every count checked for its type, only the
nodes of this host's own generations are taken, each counted for the
release root's records say that generation runs (so a draining generation's
tasks count for the release it drains), and task names are scrubbed of the
env's values, made one printable line (an operator's terminal shows them),
cut and capped in number. A snapshot with anything wrong counts for nothing.
Run times are kept as a histogram of
buckets growing by ``GROWTH`` from ``FLOOR`` seconds: mergeable across hosts,
bounded whatever the number of tasks.

Root keeps each listener's pid and start (its own record, in the
deployment's state folder) to stop that process, and no other, later.
"""

import contextlib
import hashlib
import json
import os
import re
import signal

import salt.loader.context

__virtualname__ = "saltfleet_taskevents"

OUTCOMES = ("succeeded", "failed", "retried")
BUCKETS, FLOOR, GROWTH = 200, 1e-4, 1.1
SNAPSHOT_MAX = 1 << 20
NAME_MAX, NAMES_MAX = 200, 100
OTHER = "(other)"
COUNT_MAX = 10**9
# Generations started while one listener watches whose workers it takes on (a canary's handover, a rollback).
LATER = 3

# What runs as the user: listen to the app's task events for this host's nodes, write what was counted.
LISTEN = r"""
import json, math, os, signal, socket, sys, time
from celery.app.utils import find_app
from celery.events import get_exchange
from kombu import Queue, binding
request = json.loads(sys.argv[1])
app = find_app(request["app"])
nodes, out = set(request["nodes"]), request["out"]
# The nodes a generation started while it listens can take (root's list): each counts from its first event on.
later = set(request["later"])
deadline = time.monotonic() + request["seconds"]
counts, names, offline, stop = {}, {}, set(), []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
OUTCOME = {"task-succeeded": "succeeded", "task-failed": "failed", "task-retried": "retried"}

def bucket(seconds):
    low, growth, top = request["floor"], request["growth"], request["buckets"] - 1
    return max(0, min(top, int(math.log(max(seconds, low) / low, growth))))

def count(event):
    node, kind = event.get("hostname"), event.get("type")
    if node not in nodes:
        if node not in later:
            return
        # A new generation's worker: its task events go on as it comes online.
        nodes.add(node)
        switch(True, [node])
    if kind == "worker-offline":
        offline.add(node)
    elif kind == "task-received" and len(names) < 100000:
        names[event.get("uuid")] = str(event.get("name"))
    elif kind in OUTCOME:
        outcome = OUTCOME[kind]
        name = names.get(event.get("uuid")) if outcome == "retried" else names.pop(event.get("uuid"), None)
        empty = {"succeeded": 0, "failed": 0, "retried": 0, "runtime": {}}
        row = counts.setdefault(node, {}).setdefault(name or "", empty)
        row[outcome] += 1
        runtime = event.get("runtime")
        if outcome == "succeeded" and isinstance(runtime, (int, float)):
            key = str(bucket(runtime))
            row["runtime"][key] = row["runtime"].get(key, 0) + 1

def receive(message):
    # Celery names the sending node in each event message's headers: another host's events are never decoded.
    sender = (message.headers or {}).get("hostname")
    if sender is not None and sender not in nodes and sender not in later:
        return
    try:
        body = message.decode()
    except Exception:
        return
    for event in body if isinstance(body, list) else [body]:
        if isinstance(event, dict):
            count(event)

def write(done=False):
    part = f"{out}.part"
    with open(part, "w") as handle:
        handle.write(json.dumps({"nodes": counts, "offline": sorted(offline), "done": done}))
    os.replace(part, out)

def switch(on, which=None):
    # Root's names of a later generation too: one that came online before this listener bound its queue.
    try:
        (app.control.enable_events if on else app.control.disable_events)(destination=sorted(which or nodes | later))
    except Exception as exc:
        print(f"switching task events {'on' if on else 'off'} failed: {exc!r}", flush=True)

with app.connection_for_read() as conn:
    exchange = get_exchange(conn, name=app.conf.event_exchange)
    # Only the events counted (task.multi: a worker's buffered task events, in one message), never the heartbeats.
    keys = ("task.multi", "task.received", "task.succeeded", "task.failed", "task.retried")
    keys += ("worker.online", "worker.offline")
    queue = Queue(request["queue"], bindings=[binding(exchange, routing_key=key) for key in keys], auto_delete=True,
                  durable=False, expires=request["expires"], message_ttl=request["expires"])
    with conn.Consumer(queue, on_message=receive, no_ack=True, accept=["json"]):
        switch(True)
        write()
        print(f"listening to the task events of {sorted(nodes)} on {request['queue']}", flush=True)
        written = switched = time.monotonic()
        while time.monotonic() < deadline and not stop:
            with __import__("contextlib").suppress(socket.timeout, TimeoutError):
                conn.drain_events(timeout=0.25)
            now = time.monotonic()
            if now - written >= 0.5:
                write()
                written = now
            if now - switched >= 5:
                # A node that restarted since came back with its events off.
                switch(True)
                switched = now
switch(False)
write(done=True)
print("task events switched off; done", flush=True)
"""


def __virtual__():
    return __virtualname__


def _utils(name):
    # Salt's utils loader packs no __utils__ into utils modules: the loader in context holds them.
    loader = salt.loader.context.loader_ctxvar.get()
    return loader.pack.get("__utils__", loader)[name]


def _token(text):
    return hashlib.sha256(str(text).encode()).hexdigest()[:16]


def _record_path(p, watch):
    return p["state"] / f"watch.{_token(watch)}.json"


def _snapshot_path(p, watch, app):
    return p["logs"] / f"events.{_token(watch)}.{_token(app)}.json"


def nodes_by_release(p, generations):
    """
    {app: {node: release}} of the Celery workers of ``generations``
    ({gen: release}, root's records), from root's config of each generation.
    """
    found = {}
    sections_of = _utils("saltfleet_supervisor_conf.sections_of")
    for gen, release in generations.items():
        conf = _utils("saltfleet_paths.generation")(p, gen)["conf"]
        if not release or not conf.exists():
            continue
        for app, expected in _utils("saltfleet_celery.by_app")(
            _utils("saltfleet_celery.workers_in")(sections_of(conf.read_text()))
        ).items():
            found.setdefault(app, {}).update(dict.fromkeys(expected, release))
    return found


def later(p, nodes):
    """
    The node names the workers of ``nodes`` take in a generation started
    after them (a handover while a listener watches), at most ``LATER``
    such generations: ``NAME.g<gen>@HOST`` (``saltfleet_celery.per_generation``)
    for each generation number one can be given (``saltfleet_plan.free_generation``:
    the lowest one no config or running generation holds). Only these ever
    join a listener's nodes, whatever names the broker's events carry.
    """
    stems, gens = set(), set(_utils("saltfleet_supervisor.known_generations")(p))
    for node in nodes:
        # The name is cut at its first "@" (per_generation): NAME holds none, HOST may.
        match = re.fullmatch(r"([^@]*\.g)([1-9][0-9]*)(@.*)", node)
        if match:
            stems.add((match[1], match[3]))
            gens.add(match[2])
    numbers = [str(n) for n in range(1, len(gens) + LATER + 1)]
    return sorted({head + n + tail for head, tail in stems for n in numbers} - set(nodes))


def listening(p, watch):
    """Whether the listeners of ``watch`` root started still run."""
    record = _utils("saltfleet_files.read_json")(_record_path(p, watch), {})
    alive = _utils("saltfleet_supervisor.alive")
    return any(alive(r) for r in record.values()) if isinstance(record, dict) else False


def request(p, watch, app, nodes, seconds, queue_id):
    """What root tells the listener of ``app`` (``LISTEN``'s argument) watching ``nodes`` for ``seconds``."""
    return {
        "app": app,
        "nodes": sorted(nodes),
        "later": later(p, nodes),
        "out": str(_snapshot_path(p, watch, app)),
        "seconds": int(seconds),
        "queue": f"saltfleet.events.{_token(watch)}.{_token(queue_id)}.{_token(app)}",
        "expires": 60,
        "buckets": BUCKETS,
        "floor": FLOOR,
        "growth": GROWTH,
    }


def listen(cfg, p, watch, apps, release, venv, seconds, queue_id):
    """
    Start a listener per app of ``apps`` ({app: {node: release}}) for
    ``seconds``, as the user in ``release`` (the serving one) with ``venv``;
    root records each one's pid and start.
    """
    env = _utils("saltfleet_venv.environ")(venv, cfg["env"])
    started = {}
    for app, nodes in sorted(apps.items()):
        told = json.dumps(request(p, watch, app, nodes, seconds, queue_id))
        log = _utils("saltfleet_paths.log")(p, "events", _token(watch))
        pid = _utils("saltfleet_user.spawn")(
            cfg["user"], [f"{venv}/bin/python", "-c", LISTEN, told], p["home"], log, cwd=release, env=env
        )
        started[app] = {"pid": pid, "start": _utils("saltfleet_supervisor.process_start")(pid)}
    _utils("saltfleet_files.write_json")(_record_path(p, watch), started, mode=0o600)
    return started


def stop(p, watch):
    """Stop the listeners of ``watch`` that still run (each switches its events off); forget them."""
    path = _record_path(p, watch)
    record = _utils("saltfleet_files.read_json")(path, {})
    stopped = 0
    for started in record.values() if isinstance(record, dict) else ():
        # The very process root started, never whatever took its pid since.
        if _utils("saltfleet_supervisor.alive")(started):
            with contextlib.suppress(ProcessLookupError):
                os.kill(started["pid"], signal.SIGTERM)
                stopped += 1
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return stopped


def _count(value):
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= COUNT_MAX:
        return value
    # Its kind, never its text: what the user's side wrote there may be one of the env's values.
    raise ValueError(f"a count that is no count from 0 to {COUNT_MAX} (a {type(value).__name__})")


def _row(value):
    """A task's counts, checked: {succeeded, failed, retried, runtime: {bucket: count}}."""
    if not isinstance(value, dict):
        raise ValueError("a task's counts that are no mapping")
    row = {outcome: _count(value.get(outcome, 0)) for outcome in OUTCOMES}
    runtime = value.get("runtime") or {}
    if not isinstance(runtime, dict) or len(runtime) > BUCKETS:
        raise ValueError("run times that are no histogram")
    row["runtime"] = {}
    for key, number in runtime.items():
        # A digit string as the listener writes JSON, an int once root has read it.
        ok = (isinstance(key, int) and not isinstance(key, bool)) or (
            isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 3
        )
        if not (ok and 0 <= int(key) < BUCKETS):
            raise ValueError(f"a run time bucket that is no number from 0 to {BUCKETS - 1} (a {type(key).__name__})")
        row["runtime"][int(key)] = _count(number)
    return row


def add(into, row):
    """Add a task's counts ``row`` into ``into`` (both {succeeded, failed, retried, runtime})."""
    for outcome in OUTCOMES:
        into[outcome] = into.get(outcome, 0) + row[outcome]
    runtime = into.setdefault("runtime", {})
    for key, number in row["runtime"].items():
        runtime[key] = runtime.get(key, 0) + number
    return into


def named(into, name):
    """What ``name`` is counted under in ``into`` ({task: counts}): itself, or OTHER once NAMES_MAX names are in."""
    return name if len(into) < NAMES_MAX or name in into else OTHER


def _printable(text):
    """``text`` on one line of printable characters: any other (a line break, an escape) as its Python escape."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def _task_name(name, secrets):
    # Hidden first (a value is found as written), then printable, then cut.
    text = _printable(_utils("saltfleet_user.scrub")(str(name), secrets))
    return text if len(text) <= NAME_MAX else text[: NAME_MAX - 3] + "..."


def _snapshot(p, watch, app, nodes):
    """
    ([(release, task name, counts)], {offline nodes}) of the snapshot of
    ``app``'s listener, every row checked: OSError or ValueError when any is
    not what a listener writes (the snapshot then counts for nothing).
    """
    path = _snapshot_path(p, watch, app)
    if not _utils("saltfleet_user.plain_path")(p["home"], path):
        raise ValueError("a link on its path")
    data = json.loads(_utils("saltfleet_files.read_users_file")(path, SNAPSHOT_MAX + 1))
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), dict):
        raise ValueError("no mapping of nodes")
    rows = []
    for node, tasks in data["nodes"].items():
        if node not in nodes:
            continue
        if not isinstance(tasks, dict):
            raise ValueError("a node's tasks that are no mapping")
        rows += [(nodes[node], name, _row(row)) for name, row in tasks.items()]
    said = data.get("offline") or []
    return rows, {n for n in said if isinstance(n, str) and n in nodes} if isinstance(said, list) else set()


def counted(p, watch, apps, secrets):
    """
    ({release: {task name: counts}}, [offline nodes], [problems]) of what the
    listeners of ``watch`` counted so far, each snapshot read as the user's
    word (see the module); a snapshot that is missing or malformed is a
    problem, and counts for nothing. Counts added up stop at ``COUNT_MAX``.
    """
    releases, offline, problems = {}, set(), []
    for app, nodes in sorted(apps.items()):
        try:
            rows, said = _snapshot(p, watch, app, nodes)
        except FileNotFoundError:
            problems.append(f"app {app}: its listener has written nothing yet")
            continue
        except (OSError, ValueError, RecursionError) as exc:
            problems.append(f"app {app}: what its listener wrote is unreadable ({str(exc)[:200]})")
            continue
        for release, name, row in rows:
            into = releases.setdefault(release, {})
            key = OTHER if named(into, name) == OTHER else _task_name(name, secrets)
            add(into.setdefault(key, {}), row)
        offline |= said
    for tasks in releases.values():
        for row in tasks.values():
            row.update({outcome: min(row[outcome], COUNT_MAX) for outcome in OUTCOMES})
            row["runtime"] = {key: min(number, COUNT_MAX) for key, number in row["runtime"].items()}
    return releases, sorted(offline), problems


def seconds_of(bucket):
    """The run time a histogram bucket stands for: the geometric middle of its bounds."""
    return FLOOR * GROWTH ** (int(bucket) + 0.5)


def _program(value):
    if not isinstance(value, dict) or not isinstance(value.get("state"), str) or len(value["state"]) > 20:
        raise ValueError("a program that is no {state, pid}")
    pid = value.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 <= pid < 1 << 31:
        raise ValueError("a program's pid that is no pid")
    return {"state": value["state"], "pid": pid}


def _mapping(value, what, most):
    if not isinstance(value, dict) or len(value) > most:
        raise ValueError(f"{what} that are no mapping of at most {most}")
    return value


def _release(value):
    # A host counts for releases it names: a release that is none (None) is no SHA here.
    if value is None:
        raise ValueError("a release that is None, no commit SHA")
    return _utils("saltfleet_minion_data.sha")(value, "release")


def _word(value, what):
    if not isinstance(value, str) or len(value) > NAME_MAX or not value.isprintable():
        raise ValueError(f"{what} that is no short line of printable text")
    return value


def reply(ret):
    """
    A host's return of ``deployment.task_events``, checked on the master: the
    minion's word, so every release a SHA, every count a count, every name a
    short line of printable text (an operator's terminal shows them), the
    sizes bounded; ValueError (``bad data: ...``) otherwise. Its problems
    are kept as printable lines.
    """
    try:
        ret = _mapping(ret, "a return", 8)
        tasks = {}
        for release, rows in _mapping(ret.get("tasks") or {}, "releases", 64).items():
            named = _mapping(rows, "task names", NAMES_MAX + 1)
            tasks[_release(release)] = {_word(name, "a task name"): _row(row) for name, row in named.items()}
        programs = {}
        for release, rows in _mapping(ret.get("programs") or {}, "releases' programs", 64).items():
            named = _mapping(rows, "programs", 1000)
            programs[_release(release)] = {_word(name, "a program"): _program(row) for name, row in named.items()}
        lists = {}
        for key in ("offline", "problems"):
            value = ret.get(key) or []
            if not isinstance(value, list) or len(value) > 1000 or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{key} that are no list of words")
            lists[key] = [_word(v, "an offline node") if key == "offline" else _printable(v[:300]) for v in value]
    except (ValueError, TypeError) as exc:
        raise ValueError(f"bad data: {exc}") from None
    return {"tasks": tasks, "programs": programs, **lists}
