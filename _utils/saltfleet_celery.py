"""
Celery workers among a deployment's programs: a handover asks Celery itself.

A program is a Celery worker when its command runs ``celery -A APP worker``
(queues from ``-Q``, the node from ``-n``). For those:

- each generation's nodes have their own names (``NAME.g<gen>@HOST``), so two
  generations never share a node name;
- a new generation serves only once each of its nodes answers Celery's
  control and consumes the queues it should (``active_queues``);
- an old generation drains: its nodes stop consuming (``cancel_consumer``)
  first, so no task reaches a worker on its way out; a drainer (a process
  of the user's) waits until they hold no task (``inspect active``), up to
  ``stopwaitsecs``, and only then tells their supervisord to stop.

Celery's control is the app's own: it runs as the deployment's user, in the
release, with the deployment's venv and env (one short Python process per
question), never as root. What it prints is the user's word: only the nodes
this generation's programs are and the queues they are configured to consume
are taken from it, each checked for its type, so a deployment reports its
own workers and no other deployment's queues.
"""

import json
import shlex
import socket
import time
from pathlib import PurePosixPath

import salt.loader.context
from salt.exceptions import CommandExecutionError

__virtualname__ = "saltfleet_celery"

# How long a new generation's workers get to answer and consume their queues.
READY_TIMEOUT = 90
CONTROL_TIMEOUT = 60
# How long a status question waits for the nodes' replies (it ends as soon as each one answered).
ANSWER_WAIT = 5
# ...and for a draining generation's: its nodes may be on their way out, and a count missing says so.
DRAINING_WAIT = 1.5

# What runs as the user: load the app as `celery -A` does, ask its workers, print JSON.
CONTROL = r"""
import json, sys
from celery.app.utils import find_app
request = json.loads(sys.argv[1])
app = find_app(request["app"])
nodes, wait = request["nodes"], request["wait"]
if request["ask"] == "cancel":
    found = {}
    for queue in request["queues"]:
        replies = app.control.cancel_consumer(queue, destination=nodes, reply=True, timeout=wait, limit=len(nodes))
        for reply in replies or []:
            found.update(reply)
    print(json.dumps(found))
    sys.exit()
inspect = app.control.inspect(destination=nodes, timeout=wait, limit=len(nodes))
if request["ask"] == "workers":
    queues, active = inspect.active_queues() or {}, inspect.active() or {}
    # A node is listed once it said what it consumes; its tasks in hand, when it said that too.
    print(json.dumps({n: {"queues": sorted(q["name"] for q in qs), "active": len(active[n]) if n in active else None}
                      for n, qs in queues.items()}))
    sys.exit()
found = getattr(inspect, request["ask"])() or {}
if request["ask"] == "active_queues":
    found = {node: sorted(q["name"] for q in queues) for node, queues in found.items()}
elif request["ask"] == "active":
    found = {node: len(tasks) for node, tasks in found.items()}
print(json.dumps(found))
"""


# The drainer, detached, as the user: wait for the tasks in hand, then stop supervisord.
DRAIN = r"""
import http.client, json, socket, sys, time, xmlrpc.client
from celery.app.utils import find_app
request = json.loads(sys.argv[1])
deadline = time.monotonic() + request["seconds"]

def wait(app_name, nodes):
    # Until no node holds a task, or the deadline. A failed ask is asked again: the
    # broker may hiccup, and supervisord must be stopped whatever happens here.
    while time.monotonic() < deadline:
        try:
            active = find_app(app_name).control.inspect(destination=nodes, timeout=2, limit=len(nodes)).active() or {}
        except Exception as exc:
            print(f"asking {nodes} for their tasks in hand failed: {exc!r}; asking again", flush=True)
        else:
            if not any(active.values()):
                print(f"{nodes}: no task in hand", flush=True)
                return
        time.sleep(1)
    print(f"{nodes}: still busy at the deadline; supervisord stops them (SIGTERM: tasks in hand finish)", flush=True)

class Connection(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(request["socket"])

class Transport(xmlrpc.client.Transport):
    def make_connection(self, host):
        return Connection("localhost")

try:
    for app_name, nodes in request["apps"].items():
        wait(app_name, nodes)
finally:
    server = xmlrpc.client.ServerProxy("http://localhost", transport=Transport()).supervisor
    server.stopAllProcesses(False)
    server.shutdown()
    print("supervisord told to stop", flush=True)
"""


def __virtual__():
    return __virtualname__


def _utils(name):
    # Salt's utils loader packs no __utils__ into utils modules. The loader in
    # context is that mapping while one of their functions runs, or the loader
    # module's whose code runs on (a context manager's body) and holds it.
    loader = salt.loader.context.loader_ctxvar.get()
    return loader.pack.get("__utils__", loader)[name]


def _option(argv, short, long):
    """(index, value, spelled) of an option in argv: ``-n X``, ``--hostname X``, ``--hostname=X`` or ``-nX``."""
    for index, arg in enumerate(argv):
        if arg in (short, long) and index + 1 < len(argv):
            return index + 1, argv[index + 1], "{}"
        if arg.startswith(f"{long}="):
            return index, arg.split("=", 1)[1], long + "={}"
        if arg.startswith(short) and len(arg) > len(short) and not arg.startswith("--"):
            return index, arg[len(short) :], short + "{}"
    return None, None, None


def _argv(command):
    try:
        argv = shlex.split(command)
    except ValueError:
        return None
    start = next((i for i, arg in enumerate(argv) if PurePosixPath(arg).name == "celery"), None)
    if start is None or "worker" not in argv[start:] or not _option(argv[start:], "-A", "--app")[1]:
        return None
    return argv


def workers_in(sections):
    """{program: {app, queues, hostname, numprocs, numprocs_start}} of the Celery workers among ``sections``."""
    found = {}
    for section, opts in sections.items():
        kind, _, program = section.partition(":")
        argv = _argv(opts.get("command", "")) if kind == "program" else None
        if argv is None:
            continue
        _, app, _ = _option(argv, "-A", "--app")
        _, queues, _ = _option(argv, "-Q", "--queues")
        _, hostname, _ = _option(argv, "-n", "--hostname")
        found[program] = {
            "app": app,
            "queues": sorted((queues or "celery").split(",")),
            "hostname": hostname or "celery@%%h",
            "numprocs": int(opts.get("numprocs", 1)),
            "numprocs_start": int(opts.get("numprocs_start", 0)),
        }
    return found


def per_generation(sections, gen):
    """
    Give every Celery worker program in ``sections`` node names of generation
    ``gen`` (``NAME.g<gen>@HOST``), in place; return its workers (``workers_in``).
    """
    for section, opts in sections.items():
        argv = _argv(opts.get("command", "")) if section.startswith("program:") else None
        if argv is None:
            continue
        index, hostname, spelled = _option(argv, "-n", "--hostname")
        name, at, host = (hostname or f"{section.partition(':')[2]}@%%h").partition("@")
        node = f"{name}.g{gen}{at}{host}"
        if index is None:
            argv += ["-n", node]
        else:
            argv[index] = spelled.format(node)
        opts["command"] = shlex.join(argv)
    return workers_in(sections)


def nodes(program, spec):
    """The Celery node names a worker program's processes take (supervisord's and Celery's expansions done)."""
    host = socket.gethostname()
    names = []
    for num in range(spec["numprocs_start"], spec["numprocs_start"] + spec["numprocs"]):
        values = {
            "program_name": program,
            "process_num": num,
            "group_name": program,
            "host_node_name": host,
            "numprocs": spec["numprocs"],
        }
        name = spec["hostname"] % values
        short, _, domain = host.partition(".")
        names.append(name.replace("%h", host).replace("%n", short).replace("%d", domain))
    return names


def ask(cfg, p, release, venv, app, request, timeout=CONTROL_TIMEOUT):
    """Ask an app's workers through Celery's control, as the deployment's user; the JSON they answered."""
    env = _utils("saltfleet_venv.environ")(venv, cfg["env"])
    proc = _utils("saltfleet_user.run")(
        cfg["user"],
        [f"{venv}/bin/python", "-c", CONTROL, json.dumps({"app": app, **request})],
        p["home"],
        cwd=release,
        env=env,
        timeout=timeout,
    )
    _utils("saltfleet_user.check")(
        proc, f"asking the Celery workers of app {app} ({request['ask']}) failed", cfg["env"]
    )
    try:
        answer = json.loads(proc.stdout.strip().splitlines()[-1])
    except Exception:  # pylint: disable=broad-except
        # Not JSON, or JSON nested deeper than the parser goes: the user's Python said it, not Celery.
        said = _utils("saltfleet_user.scrub")(proc.stdout, cfg["env"])[-300:]
        raise CommandExecutionError(f"Celery's control of app {app} answered no JSON it gives: {said}") from None
    if not isinstance(answer, dict):
        raise CommandExecutionError(f"Celery's control of app {app} answered a {type(answer).__name__}, not nodes")
    # Only the nodes asked about: the rest is not this generation's word to give.
    return {node: value for node, value in answer.items() if node in request["nodes"]}


def by_app(workers):
    """{app: {node: expected queues}} of a generation's workers."""
    apps = {}
    for program, spec in workers.items():
        for node in nodes(program, spec):
            apps.setdefault(spec["app"], {})[node] = spec["queues"]
    return apps


def wait_ready(cfg, p, release, venv, workers, timeout=READY_TIMEOUT):
    """
    Wait until every node of ``workers`` answers and consumes its queues;
    return {node: what is missing} of those that did not within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    missing = {}
    for app, expected in by_app(workers).items():
        while True:
            # A process each time: one that loaded the app before the new workers bound their queues
            # did not always hear them answer.
            answered = ask(cfg, p, release, venv, app, {"ask": "active_queues", "nodes": sorted(expected), "wait": 2})
            said = {node: _queue_names(answered.get(node), queues) or [] for node, queues in expected.items()}
            missing = {
                node: "no answer" if node not in answered else f"consumes {said[node]}, not {queues}"
                for node, queues in expected.items()
                if set(said[node]) != set(queues)
            }
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if missing:
            return missing
    return {}


def drain(cfg, p, release, venv, workers, sock, seconds):
    """
    Drain a generation (its ``workers``, its supervisord on ``sock``): its
    nodes stop consuming now; a drainer, in the background as the user, waits
    for their tasks in hand (``seconds`` at most), then stops supervisord. Its
    output goes to the deployment's log dir. Returns the nodes that did not
    confirm they stopped consuming.
    """
    apps = by_app(workers)
    unconfirmed = []
    for app, expected in apps.items():
        queues = sorted({q for qs in expected.values() for q in qs})
        request = {"ask": "cancel", "nodes": sorted(expected), "queues": queues, "wait": 3}
        unconfirmed += sorted(set(expected) - set(ask(cfg, p, release, venv, app, request)))
    request = {
        "apps": {app: sorted(expected) for app, expected in apps.items()},
        "socket": str(sock),
        "seconds": seconds,
    }
    env = _utils("saltfleet_venv.environ")(venv, cfg["env"])
    log = _utils("saltfleet_paths.log")(p, "drain", PurePosixPath(sock).stem)
    _utils("saltfleet_user.spawn")(
        cfg["user"],
        [f"{venv}/bin/python", "-c", DRAIN, json.dumps(request)],
        p["home"],
        log,
        cwd=release,
        env=env,
    )
    return unconfirmed


def _queue_names(value, allowed):
    """The queues of ``allowed`` that ``value`` (an answer) names; None when it is no list of names."""
    if not isinstance(value, list) or not all(isinstance(q, str) for q in value):
        return None
    return sorted(set(value) & set(allowed))


def _count(value):
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1_000_000 else None


def serving(cfg, p, release, venv, workers):
    """
    {node: {queues, active}} of a generation's nodes, as they answer; a node
    that does not is missing. Queues are those its program is configured to
    consume that it says it does; ``active`` a count, or None when unsaid.
    """
    found = {}
    for app, expected in by_app(workers).items():
        request = {"ask": "workers", "nodes": sorted(expected), "wait": ANSWER_WAIT}
        for node, said in ask(cfg, p, release, venv, app, request).items():
            queues = _queue_names(said.get("queues") if isinstance(said, dict) else None, expected[node])
            if queues is not None:
                found[node] = {"queues": queues, "active": _count(said.get("active"))}
    return found


def active(cfg, p, release, venv, workers):
    """{node: tasks in hand} of a draining generation's nodes that answered with a count (DRAINING_WAIT)."""
    found = {}
    for app, expected in by_app(workers).items():
        request = {"ask": "active", "nodes": sorted(expected), "wait": DRAINING_WAIT}
        for node, said in ask(cfg, p, release, venv, app, request).items():
            if _count(said) is not None:
                found[node] = said
    return found
