"""
What the deployment's side answers is hostile input: a process of the
deployment's user listening where supervisord should, or the user's own
Python answering for Celery, says what it likes. Root takes from it only what
supervisord and Celery could say, within one deadline per question, fails
that deployment alone with a clear message, and credits nothing to another
deployment.
"""

import json
import os
import subprocess
import threading
import time

import pytest
from salt.exceptions import CommandExecutionError

from tests.conftest import short_tmpdir, wait_for
from tests.functional.conftest import tiny_app

STATE = "saltfleet-deployment-tiny"

# A process of the user's at a supervisord socket: it answers XML-RPC as ``mode`` says.
FAKE_SUPERVISORD = r"""
import os, socket, sys, time
path, mode = sys.argv[1], sys.argv[2]
said = (sys.argv[3] if len(sys.argv) > 3 else "").replace("&", "&amp;").replace("<", "&lt;")
server = socket.socket(socket.AF_UNIX)
server.bind(path)
server.listen(16)

def member(name, value):
    return "<member><name>%s</name><value>%s</value></member>" % (name, value)

def value(method):
    if method == "supervisor.getState":
        return "<struct>%s</struct>" % member("statename", "<string>RUNNING</string>")
    if method == "supervisor.getPID":
        if mode == "lair":
            return "<string>../../tmp/%s</string>" % said
        if mode in ("pid", "int"):
            return "<%s>%s</%s>" % ({"pid": "string"}.get(mode, mode), said, {"pid": "string"}.get(mode, mode))
        return "<int>1</int>" if mode == "one" else "<int>%d</int>" % os.getpid()
    if method in ("supervisor.getAllProcessInfo", "supervisor.getAllConfigInfo"):
        if mode == "lists":
            inner = "<array><data><value><string>x</string></value></data></array>"
            return "<array><data><value>%s</value></data></array>" % inner
        return "<array><data></data></array>"
    return "<boolean>1</boolean>"

def fault():
    code = member("faultCode", "<int>10</int>") + member("faultString", "<string>%s</string>" % said)
    return "<fault><value><struct>%s</struct></value></fault>" % code

while True:
    conn, _ = server.accept()
    request = b""
    while b"</methodCall>" not in request:
        chunk = conn.recv(65536)
        if not chunk:
            break
        request += chunk
    if mode == "dribble":
        for byte in b"HTTP/1.0 200 OK\r\nX-Slow: " + b"x" * 100000:
            conn.send(bytes([byte]))
            time.sleep(1)
    method = request.split(b"<methodName>")[1].split(b"</methodName>")[0].decode()
    asked = ("supervisor.getState", "supervisor.getPID")
    if mode == "fault" and method not in asked:
        body = ("<?xml version='1.0'?><methodResponse>%s</methodResponse>" % fault()).encode()
    else:
        body = ("<?xml version='1.0'?><methodResponse><params><param><value>%s</value></param></params>"
                "</methodResponse>" % value(method)).encode()
    status = ("500 " + sys.argv[3]) if mode == "status" else "200 OK"
    encoding = ("Content-Encoding: %s\r\n" % sys.argv[3]) if mode == "encoding" else ""
    head = "HTTP/1.0 %s\r\n%sContent-Type: text/xml\r\nContent-Length: %d\r\n\r\n" % (status, encoding, len(body))
    conn.sendall(head.encode() + body)
    conn.close()
"""


def as_user(user, *argv):
    subprocess.run(argv, user=user.pw_uid, group=user.pw_gid, check=True, capture_output=True)


class Impostor:
    """The deployment's user puts a listener of theirs in place of the serving supervisord's socket."""

    def __init__(self, host, sock, mode, *args):
        self.host, self.sock = host, sock
        self.moved = sock.with_name(sock.name + ".moved")
        as_user(host.user, "mv", str(sock), str(self.moved))
        self.proc = subprocess.Popen(
            ["python3", "-c", FAKE_SUPERVISORD, str(sock), mode, *args],
            user=host.user.pw_uid,
            group=host.user.pw_gid,
            # A session of its own, as supervisord's: the user can make one as well.
            start_new_session=True,
        )
        wait_for(sock.exists, 10, "the impostor listening", interval=0.05)

    def leave(self):
        self.proc.kill()
        self.proc.wait()
        as_user(self.host.user, "mv", "-fT", str(self.moved), str(self.sock))


@pytest.fixture
def two(host, tiny, out, other_app):
    """Deployment tiny (the one attacked) and other beside it, both serving."""
    states = host.apply(host.pillar({"tiny": tiny_app(tiny, out), "other": other_app()}))
    assert all(s["result"] is not False for s in states.values()), states
    p = host.paths("tiny")
    return host.sf.saltfleet_paths.generation(p, host.sf.saltfleet_supervisor.serving(p))["socket"]


def status(host):
    return host.loaders.modules.deployment.status()


def test_a_pid_that_is_a_path_is_refused_and_nothing_is_read_there(host, two, out):
    # Where root would read /proc/<pid>/stat: a link to a file only root may read.
    lair = short_tmpdir("sfl-", owner=host.user)
    secret = short_tmpdir("sfs-") / "root-only"
    secret.write_text("1 (x) S " + " ".join(["77777"] * 30) + "\n")
    secret.chmod(0o600)
    as_user(host.user, "ln", "-s", str(secret), str(lair / "stat"))
    impostor = Impostor(host, two, "lair", lair.name)
    try:
        rows = status(host)
    finally:
        impostor.leave()
    assert rows["other"]["state"] == "up", "the other deployment is answered for as ever"
    assert rows["tiny"]["state"] == "down"
    assert f"answered its pid as '../../tmp/{lair.name}', which it never gives" in rows["tiny"]["supervisord"]
    assert "77777" not in json.dumps(rows)
    assert "77777" not in host.paths("tiny")["manifest"].read_text()


def test_what_the_users_supervisord_says_in_an_error_comes_back_scrubbed(host, tiny, out, other_app):
    # The row's error text quotes what the socket answered; the mine and the job cache keep that row.
    env = {"TINYAPP_OUT": str(out), "API_TOKEN": "tok-91d4e2"}
    host.apply(host.pillar({"tiny": tiny_app(tiny, out, env=env), "other": other_app()}))
    p = host.paths("tiny")
    sock = host.sf.saltfleet_paths.generation(p, host.sf.saltfleet_supervisor.serving(p))["socket"]
    impostor = Impostor(host, sock, "lair", "tok-91d4e2")
    try:
        rows = status(host)
    finally:
        impostor.leave()
    assert "answered its pid as '../../tmp/<env:API_TOKEN>'" in rows["tiny"]["supervisord"], rows["tiny"]
    assert "tok-91d4e2" not in json.dumps(rows)


# Long enough to be cut where root quotes an answer, one with a quote that Python escapes.
LONG = "sk_live_4f9a0c2e71b84d5e9c3a6f1b0d2e7c9a51"
QUOTED = "pw'4f9a0c2e71b8\\4d5e9c3a"
UNICODE = "pässwörd-ünïcode-4f9a0c2e"


# What the impostor answers, and what root is asked that takes it in.
SAYINGS = {
    "a long pid": ("pid", LONG, "status"),
    "a pid in both quotes": ("pid", QUOTED + '"', "status"),
    "a pid that is no number": ("int", QUOTED + '"', "status"),
    "a pid that is no number, long": ("int", "0" * 171 + LONG, "status"),
    "a body encoding": ("encoding", UNICODE, "status"),
    "an HTTP status": ("status", LONG, "status"),
    "a fault": ("fault", LONG, "restart"),
}


def test_no_part_of_a_secret_the_users_supervisord_answers_comes_back(host, tiny, out):
    # An error quoting an answer lands in the job cache and the mine: the secret is hidden in the whole
    # answer before the quote escapes or cuts it.
    # Values that are also words of supervisord's own answers ("HTTP/1.0 200 OK", RUNNING) change none of them.
    env = {"TINYAPP_OUT": str(out), "API_TOKEN": LONG, "DB_PASSWORD": QUOTED, "HTTP_OK": "200", "WANT": "RUNNING"}
    env["PASS_UTF8"] = UNICODE
    states = host.apply(host.pillar({"tiny": tiny_app(tiny, out, env=env)}))
    assert states[STATE]["result"] is True, states
    assert status(host)["tiny"]["programs"] == {"a": "RUNNING"}
    p = host.paths("tiny")
    sock = host.sf.saltfleet_paths.generation(p, host.sf.saltfleet_supervisor.serving(p))["socket"]
    pieces = {secret[i : i + 8] for secret in (LONG, QUOTED, UNICODE) for i in range(len(secret) - 7)}
    leaks, unseen = {}, {}
    for saying, (mode, said, ask) in SAYINGS.items():
        impostor = Impostor(host, sock, mode, said)
        try:
            if ask == "status":
                said_back = json.dumps(status(host))
            else:
                with pytest.raises(CommandExecutionError) as failed:
                    host.loaders.modules.deployment.restart("tiny")
                said_back = str(failed.value)
        finally:
            impostor.leave()
        if any(piece in said_back for piece in pieces):
            leaks[saying] = said_back
        elif "supervisord on" not in said_back:
            unseen[saying] = said_back  # root refuses each of these answers, naming the socket
    assert not leaks, leaks
    assert not unseen, unseen


def test_a_pid_not_the_users_is_never_recorded_and_removal_still_works(host, two, tiny, out, other_app):
    impostor = Impostor(host, two, "one")
    try:
        rows = status(host)
        state = host.apply(host.pillar({"tiny": tiny_app(tiny, out, rev="v2"), "other": other_app()}))
    finally:
        impostor.leave()
    assert "answered its pid as 1, which it never gives" in rows["tiny"]["supervisord"]
    assert state[STATE]["result"] is False and "answered its pid as 1" in state[STATE]["comment"]
    manifest = json.loads(host.paths("tiny")["manifest"].read_text())
    assert all(record["pid"] != 1 for record in (manifest.get("draining") or {}).values())
    # Pillar drops it: it is removed, promptly (nothing waits on pid 1).
    started = time.monotonic()
    removed = host.apply(host.pillar({"other": other_app()}))
    assert removed["saltfleet-deployment-tiny-removed"]["result"] is True
    assert time.monotonic() - started < 120


def test_answers_of_the_wrong_shape_fail_that_deployment_alone(host, two):
    impostor = Impostor(host, two, "lists")
    try:
        rows = status(host)
    finally:
        impostor.leave()
    assert rows["other"]["state"] == "up"
    assert rows["tiny"]["state"] == "down"
    assert "answered a record ['x'], which it never gives" in rows["tiny"]["supervisord"]


def test_an_answer_dribbled_a_byte_at_a_time_ends_at_the_calls_deadline(host, two):
    impostor = Impostor(host, two, "dribble")
    rows, started = {}, time.monotonic()
    try:
        asking = threading.Thread(target=lambda: rows.update(status(host)))
        asking.start()
        asking.join(120)
        took = time.monotonic() - started
        assert not asking.is_alive(), "deployment.status still waits on the dribbling socket"
    finally:
        impostor.leave()
        asking.join(30)
    assert rows["other"]["state"] == "up"
    assert "did not answer within 10 s" in rows["tiny"]["supervisord"], rows["tiny"]
    assert took < 40, f"status took {took:.0f} s: one deadline per call, not per read"


def test_a_socket_of_the_users_own_is_no_generation(host, two, tiny, out, other_app):
    run = two.parent
    fake = run / "77.sock"
    proc = subprocess.Popen(
        ["python3", "-c", FAKE_SUPERVISORD, str(fake), "plain"], user=host.user.pw_uid, group=host.user.pw_gid
    )
    try:
        wait_for(fake.exists, 10, "the user's own listener")
        again = host.apply(host.pillar({"tiny": tiny_app(tiny, out), "other": other_app()}))
    finally:
        proc.kill()
        proc.wait()
    assert again[STATE]["changes"] == {}, again[STATE]
    assert "interrupted" not in again[STATE]["comment"]
    assert proc.pid not in status(host)["tiny"]["draining"]


def fake_python(host, venv, said, exit_code=0):
    """The user's venv Python replaced: it answers every question of saltfleet's with ``said``."""
    python = venv / "bin" / "python"
    tmp = short_tmpdir("sfp-", owner=host.user) / "python"
    tmp.write_text(f"#!/usr/bin/python3\nimport sys\nprint({said!r})\nsys.exit({exit_code})\n")
    os.chown(tmp, host.user.pw_uid, host.user.pw_gid)
    as_user(host.user, "rm", "-f", str(python))
    as_user(host.user, "cp", str(tmp), str(python))
    as_user(host.user, "chmod", "755", str(python))


def worker(tiny, out, queue, **spec):
    """The tiny app as a 'Celery worker' of ``queue``: its command is one, its process the user's sleep."""
    deployment = tiny_app(tiny, out, **spec)
    deployment["programs"] = {"w": {"command": f"celery -A app worker -Q {queue} -c 1", "startsecs": 1}}
    return deployment


def fake_celery(host, name):
    """The user's own `celery` in the deployment's venv: it only sleeps."""
    venv = host.paths(name)["project"] / "venv" / "bin" / "celery"
    as_user(host.user, "sh", "-c", f"printf '#!/bin/sh\\nexec sleep 3600\\n' > {venv} && chmod 755 {venv}")


def test_a_deployment_reports_only_its_own_workers_and_queues(host, tiny, out, other_app):
    # The other deployment's queue is "theirs": the tiny deployment's answer claims it too.
    pillar = host.pillar({"tiny": worker(tiny, out, "mine"), "other": other_app()})
    host.apply(pillar)
    fake_celery(host, "tiny")
    host.loaders.modules.deployment.restart("tiny")
    node = next(iter(host.sf.saltfleet_celery.nodes("w", {"hostname": "w.g1@%%h", "numprocs": 1, "numprocs_start": 0})))
    claim = {node: {"queues": ["mine", "theirs"], "active": 3}, "ghost@elsewhere": {"queues": ["theirs"], "active": 9}}
    fake_python(host, host.paths("tiny")["project"] / "venv", json.dumps(claim))
    rows = status(host)
    assert rows["tiny"]["workers"] == {node: {"queues": ["mine"], "active": 3}}, rows["tiny"]


def test_what_the_users_python_prints_on_failure_comes_back_scrubbed(host, tiny, out):
    pillar = host.pillar({"tiny": worker(tiny, out, "mine", env={"TINYAPP_OUT": str(out), "API_TOKEN": "tok-5e3c7a"})})
    host.apply(pillar)
    fake_celery(host, "tiny")
    host.loaders.modules.deployment.restart("tiny")
    fake_python(host, host.paths("tiny")["project"] / "venv", 'leaking tok-5e3c7a and "tok-5e3c7a"', exit_code=1)
    workers = status(host)["tiny"]["workers"]
    assert "tok-5e3c7a" not in json.dumps(workers) and "<env:API_TOKEN>" in workers["error"], workers
