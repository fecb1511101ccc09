"""
Attacks on a rollout's analysis from the deployment's side. Root starts the
listener of ``deployment.task_events`` as the deployment's user, in its venv:
that listener is the user's, and so is what it writes in the user's log
folder. Here the user's venv Python is a hostile listener (it writes what
the test says, as the user, and waits), and each test is one attack on what
root reads back, returns to the master and stops; it passes when the attack
fails. Its Celery worker is the user's sleep (no broker needed): only root's
side of the analysis is under attack.
"""

import json
import os
import subprocess

import pytest

from tests.conftest import short_tmpdir, wait_for
from tests.functional.test_attacks import as_user, timed_in_thread
from tests.functional.test_user_answers import fake_celery, worker

SECRET = "tok-5e3c7a91"
WATCH = "20260101000000000001-1"

# The user's venv Python as a listener: it gets root's request (nodes, out), does ATTACK as the user, says so in
# READY/ready, then waits as a listener does (so root's next look does not start another one).
LISTENER = """#!/usr/bin/python3
import json, os, sys, time
request = json.loads(sys.argv[-1])
nodes, out = request["nodes"], request["out"]
node = nodes[0]
READY = {ready!r}

def write(data):
    with open(out + ".tmp", "w") as handle:
        handle.write(data if isinstance(data, str) else json.dumps(data))
    os.replace(out + ".tmp", out)

def row(succeeded=0, failed=0, retried=0, runtime=None):
    return {{"succeeded": succeeded, "failed": failed, "retried": retried, "runtime": runtime or {{}}}}

{attack}
with open(os.path.join(READY, "ready.tmp"), "w") as handle:
    handle.write(json.dumps({{"out": out, "nodes": nodes}}))
os.replace(os.path.join(READY, "ready.tmp"), os.path.join(READY, "ready"))
time.sleep(120)
"""


@pytest.fixture
def deployed(host, tiny, out):
    """Deployment tiny with one 'Celery worker' (the user's sleep) and a secret in its env."""
    env = {"TINYAPP_OUT": str(out), "API_TOKEN": SECRET}
    # Its worker's `celery` is none yet (FATAL): the user's own sleep takes its place.
    host.apply(host.pillar({"tiny": worker(tiny, out, "mine", env=env)}))
    fake_celery(host, "tiny")
    host.loaders.modules.deployment.restart("tiny")
    yield host
    # The listener is the user's process root started: root's stop ends it.
    host.loaders.modules.deployment.task_events("tiny", watch=WATCH, stop=True)


def hostile_listener(host, attack):
    """The user's venv Python replaced by a listener doing ``attack``; the folder where it says it is done."""
    ready = short_tmpdir("sfr-", owner=host.user)
    python = host.paths("tiny")["project"] / "venv" / "bin" / "python"
    script = ready / "listener"
    script.write_text(LISTENER.format(ready=str(ready), attack=attack))
    os.chown(script, host.user.pw_uid, host.user.pw_gid)
    as_user(host.user, "rm", "-f", str(python))
    as_user(host.user, "cp", str(script), str(python))
    as_user(host.user, "chmod", "755", str(python))
    return ready


def look(host, ready):
    """Two looks of an analysis (the first starts the listener, the second reads what it wrote): the second's return."""
    events = host.loaders.modules.deployment.task_events
    events("tiny", watch=WATCH, seconds=60)
    log = host.paths("tiny")["logs"]
    wait_for((ready / "ready").exists, 30, "the user's listener", logs=list(log.glob("events.*.log")))
    return events("tiny", watch=WATCH, seconds=60)


def said(ready):
    return json.loads((ready / "ready").read_text())


# ------------------------------------------------------------- the env's values


@pytest.mark.parametrize(
    "attack",
    [
        'write({"nodes": {node: {"app.fetch": row(succeeded=' + repr(SECRET) + ")}}})",
        'write({"nodes": {node: {"app.fetch": row(succeeded=1, runtime={' + repr(SECRET) + ": 1})}}})",
        'write({"nodes": {node: {"app.fetch": row(failed=[' + repr(SECRET) + "])}}})",
    ],
    ids=["a count", "a run time bucket", "a count that is a list"],
)
def test_a_secret_in_a_malformed_count_never_comes_back(deployed, attack):
    """What the listener wrote wrong is named as a problem: never by echoing the user's value, a secret."""
    ret = look(deployed, hostile_listener(deployed, attack))
    assert SECRET not in json.dumps(ret), ret["problems"]
    assert ret["tasks"] == {}, ret
    assert any(p.startswith("app app: what its listener wrote is unreadable") for p in ret["problems"]), ret


def test_a_secret_in_a_task_name_comes_back_hidden(deployed):
    names = [SECRET, f"app.{SECRET}", json.dumps(SECRET), "x" * 195 + SECRET]
    attack = f"write({{'nodes': {{node: {{n: row(succeeded=1) for n in {names!r}}}}}}})"
    ret = look(deployed, hostile_listener(deployed, attack))
    assert SECRET not in json.dumps(ret), ret
    [counted] = ret["tasks"].values()
    assert "<env:API_TOKEN>" in counted and "app.<env:API_TOKEN>" in counted, counted
    assert sum(row["succeeded"] for row in counted.values()) == len(names)


def test_a_task_name_reaches_the_master_as_one_printable_line(deployed):
    """Task names go to an operator's terminal (fleet.analysis, fleet.history): no escape, no line break gets there."""
    names = ["\x1b[2J\x1b]0;root@master\x07app.fetch", "app.fetch\nfleet.deploy: complete", "app.\u202eexe.txt"]
    attack = f"write({{'nodes': {{node: {{n: row(succeeded=1) for n in {names!r}}}}}}})"
    ret = look(deployed, hostile_listener(deployed, attack))
    [counted] = ret["tasks"].values()
    assert all(name.isprintable() for name in counted), sorted(counted)
    assert "\\x1b[2J\\x1b]0;root@master\\x07app.fetch" in counted, sorted(counted)
    deployed.sf.saltfleet_taskevents.reply(ret)


# ---------------------------------------------------------- malformed snapshots


@pytest.mark.parametrize(
    "attack",
    [
        'write("[" * 200000 + "]" * 200000)',
        'write({"nodes": {node: {f"app.t{n}": row(succeeded=1) for n in range(40000)}}})',
        'write(\'{"nodes": {"\' + node + \'": {"app.fetch": {"succeeded": NaN, "failed": 0, "retried": 0}}}}\')',
        'write({"nodes": {node: {"app.fetch": row(succeeded=True)}}})',
        'write({"nodes": {node: {"app.fetch": row(succeeded=1, runtime={"\u00b2": 1})}}})',
    ],
    ids=["nested 200000 deep", "over a MiB", "NaN", "a bool", "a superscript bucket"],
)
def test_a_snapshot_no_listener_writes_is_a_problem(deployed, attack):
    ret = look(deployed, hostile_listener(deployed, attack))
    assert ret["tasks"] == {}, ret["tasks"]
    assert any(p.startswith("app app: what its listener wrote is unreadable") for p in ret["problems"]), ret


def test_a_snapshot_naming_nodes_not_of_this_deployment_on_this_host_counts_them_not(deployed):
    attack = 'write({"nodes": {"o.g1@" + node.split("@")[1]: {"app.fetch": row(succeeded=9)}, "w.g1@elsewhere": {}}})'
    ret = look(deployed, hostile_listener(deployed, attack))
    assert ret["tasks"] == {} and ret["problems"] == [], ret


def test_a_malformed_snapshot_counts_for_nothing(deployed):
    """Counts written before the row that is wrong are no more the listener's word than the rest."""
    attack = (
        'write({"nodes": {node: {"app.fetch": row(succeeded=500), "app.other": row(succeeded=-1)}}, "offline": []})'
    )
    ret = look(deployed, hostile_listener(deployed, attack))
    assert ret["tasks"] == {}, f"a malformed snapshot was counted in part: {ret['tasks']}"
    assert any("unreadable" in p for p in ret["problems"]), ret


@pytest.mark.parametrize(
    "attack",
    [
        'write({"nodes": {}, "offline": [node] * 5000})',
        'write({"nodes": {node: {f"app.t{n}": row(succeeded=10**9) for n in range(150)}}})',
        'write({"nodes": {node: {"app.fetch": row(succeeded=1, runtime={str(b): 10**9 for b in range(3)})},'
        ' node + "x": {}}, "offline": [node, node]})',
    ],
    ids=["a node offline 5000 times", "counts that add up beyond a count", "duplicate offline"],
)
def test_whatever_the_snapshot_says_the_master_takes_the_hosts_return(deployed, attack):
    """The host's return is checked on the master as a minion's word: the host never makes its own report unreadable."""
    ready = hostile_listener(deployed, attack)
    ret = look(deployed, ready)
    deployed.sf.saltfleet_taskevents.reply(ret)
    assert ret["offline"] in ([], said(ready)["nodes"]), ret["offline"]


# ------------------------------------------------------------ links and FIFOs


@pytest.fixture
def roots_snapshot(short_tmp):
    """A folder only root may enter, where root can put a snapshot the user could never write."""
    closed = short_tmp / "closed"
    closed.mkdir(mode=0o700)
    return closed


def valid(nodes, name="root.only.task"):
    return json.dumps({"nodes": {nodes[0]: {name: {"succeeded": 77, "failed": 0, "retried": 0, "runtime": {}}}}})


def test_a_snapshot_that_is_a_link_to_roots_file_is_never_read(deployed, roots_snapshot):
    target = roots_snapshot / "snapshot.json"
    attack = f"os.symlink({str(target)!r}, out + '.link'); os.replace(out + '.link', out)"
    ready = hostile_listener(deployed, attack)
    events = deployed.loaders.modules.deployment.task_events
    events("tiny", watch=WATCH, seconds=60)
    wait_for((ready / "ready").exists, 30, "the user's listener")
    target.write_text(valid(said(ready)["nodes"]))
    ret = events("tiny", watch=WATCH, seconds=60)
    assert "root.only.task" not in json.dumps(ret), ret
    assert any("unreadable" in p for p in ret["problems"]), ret


def test_a_log_folder_that_is_a_link_to_roots_folder_is_never_read(deployed, roots_snapshot):
    """The user swaps its log folder for a link to a folder of root's holding a file by the snapshot's name."""
    logs = deployed.paths("tiny")["logs"]
    attack = f"os.rename({str(logs)!r}, {str(logs)!r} + '.moved'); os.symlink({str(roots_snapshot)!r}, {str(logs)!r})"
    ready = hostile_listener(deployed, attack)
    events = deployed.loaders.modules.deployment.task_events
    events("tiny", watch=WATCH, seconds=60)
    wait_for((ready / "ready").exists, 30, "the user's listener")
    told = said(ready)
    (roots_snapshot / os.path.basename(told["out"])).write_text(valid(told["nodes"]))
    try:
        ret = events("tiny", watch=WATCH, seconds=60)
    finally:
        as_user(deployed.user, "rm", "-f", str(logs))
        as_user(deployed.user, "mv", f"{logs}.moved", str(logs))
    assert "root.only.task" not in json.dumps(ret), ret
    assert any("unreadable" in p for p in ret["problems"]), ret


def test_a_snapshot_that_is_a_fifo_holds_no_look_up(deployed):
    ready = hostile_listener(deployed, "os.mkfifo(out + '.fifo'); os.replace(out + '.fifo', out)")
    events = deployed.loaders.modules.deployment.task_events
    events("tiny", watch=WATCH, seconds=60)
    wait_for((ready / "ready").exists, 30, "the user's listener")
    thread, box, took = timed_in_thread(lambda: events("tiny", watch=WATCH, seconds=60), 60)
    assert not thread.is_alive(), f"task_events still waits on the user's FIFO after {took:.0f} s"
    assert any("not a plain file" in p for p in box["result"]["problems"]), box["result"]


# ---------------------------------------------------- what supervisord answers

# A process of the user's at the serving supervisord's socket: RUNNING, its own pid, one program NAME in STATE.
PROGRAMS = r"""
import os, socket, sys
path, name, state = sys.argv[1:4]

def value(method):
    if method == "supervisor.getState":
        return "<struct><member><name>statename</name><value><string>RUNNING</string></value></member></struct>"
    if method == "supervisor.getPID":
        return "<int>%d</int>" % os.getpid()
    if method == "supervisor.getAllProcessInfo":
        member = "<member><name>%s</name><value><%s>%s</%s></value></member>"
        fields = "".join(member % (key, kind, value, kind) for key, kind, value in (
            ("name", "string", name), ("group", "string", name), ("statename", "string", state),
            ("pid", "int", os.getpid())))
        return "<array><data><value><struct>%s</struct></value></data></array>" % fields
    return "<array><data></data></array>"

server = socket.socket(socket.AF_UNIX)
server.bind(path)
server.listen(16)
while True:
    conn, _ = server.accept()
    request = b""
    while b"</methodCall>" not in request:
        chunk = conn.recv(65536)
        if not chunk:
            break
        request += chunk
    method = request.split(b"<methodName>")[1].split(b"</methodName>")[0].decode()
    body = ("<?xml version='1.0'?><methodResponse><params><param><value>%s</value></param></params>"
            "</methodResponse>" % value(method)).encode()
    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/xml\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    conn.close()
"""


@pytest.mark.parametrize(("name", "state"), [(SECRET, "RUNNING"), ("w", SECRET)], ids=["a program", "a state"])
def test_a_secret_in_what_supervisord_answers_never_comes_back(deployed, name, state):
    """The user answers at the serving supervisord's socket: a program or a state that is the env's secret."""
    ready = hostile_listener(deployed, "write({'nodes': {}})")
    p = deployed.paths("tiny")
    sock = deployed.sf.saltfleet_paths.generation(p, deployed.sf.saltfleet_supervisor.serving(p))["socket"]
    moved = sock.with_name(sock.name + ".moved")
    as_user(deployed.user, "mv", str(sock), str(moved))
    impostor = subprocess.Popen(
        ["python3", "-c", PROGRAMS, str(sock), name, state],
        user=deployed.user.pw_uid,
        group=deployed.user.pw_gid,
        start_new_session=True,
    )
    try:
        wait_for(sock.exists, 10, "the impostor listening", interval=0.05)
        ret = look(deployed, ready)
    finally:
        impostor.kill()
        impostor.wait()
        as_user(deployed.user, "mv", "-fT", str(moved), str(sock))
    assert SECRET not in json.dumps(ret), ret
    assert "<env:API_TOKEN>" in json.dumps(ret), ret


# ------------------------------------------------------------- root's stop


def test_a_listener_that_never_ends_holds_no_stop_up(deployed):
    """The listener ignores SIGTERM: root's stop signals the process it started, waits for nothing, forgets it."""
    ready = hostile_listener(
        deployed, "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwrite({'nodes': {}})"
    )
    look(deployed, ready)
    [record] = deployed.paths("tiny")["state"].glob("watch.*.json")
    [started] = json.loads(record.read_text()).values()
    stop = deployed.loaders.modules.deployment.task_events
    try:
        thread, box, took = timed_in_thread(lambda: stop("tiny", watch=WATCH, stop=True), 30)
        assert not thread.is_alive(), f"stop waited {took:.0f} s on a listener that never ends"
        assert box["result"] == {"stopped": 1}, box["result"]
        assert not record.exists()
    finally:
        os.kill(started["pid"], 9)
