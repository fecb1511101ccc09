"""
The trust boundary attacked again, from the deployment's side: its Unix
user (who owns its home, logs, run/ and venvs, and everything its programs
do), the app's repository, and another local account. Each test is one
attack, run for real as that account; it passes when the attack fails.
"""

import contextlib
import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import threading
import time
import uuid
from pathlib import Path

import git
import pytest
from salt.exceptions import CommandExecutionError

from tests.apps import commit, tiny_repo
from tests.conftest import gone, short_tmpdir, wait_for
from tests.functional.conftest import report, tiny_app
from tests.functional.test_user_answers import fake_celery, fake_python, worker
from tests.support.loaded import module

STATE = "saltfleet-deployment-tiny"
REMOVED = "saltfleet-deployment-tiny-removed"

# A process of the user's at a supervisord socket, answering XML-RPC as ``mode`` says:
#   plain         a supervisord with no programs whose pid is the listener's own
#   malformed     getState answered with XML that does not parse
#   nested        getState answered with arrays nested 50,000 deep (2 MB, under the 4 MiB bound)
#   gzip-comment  getState gzip-encoded: 3 KB on the wire, a 3 MiB XML comment once inflated
#   gzip-big      getState gzip-encoded: 64 KB on the wire, 64 MiB once inflated
#   stopping      one program, 'a', that is STOPPING for ever
FAKE_SUPERVISORD = r"""
import os, socket, sys, zlib
path, mode = sys.argv[1], sys.argv[2]
HEAD = "<?xml version='1.0'?><methodResponse>"
TAIL = "</methodResponse>"

def xml(value):
    return (HEAD + "<params><param><value>%s</value></param></params>" % value + TAIL).encode()

def struct(**members):
    def typed(v):
        if isinstance(v, bool):
            return "<boolean>%d</boolean>" % v
        if isinstance(v, int):
            return "<int>%d</int>" % v
        return "<string>%s</string>" % v
    return "<struct>%s</struct>" % "".join(
        "<member><name>%s</name><value>%s</value></member>" % (k, typed(v)) for k, v in members.items())

def array(*items):
    return "<array><data>%s</data></array>" % "".join("<value>%s</value>" % i for i in items)

RUNNING = struct(statename="RUNNING")
GZIP = b"Content-Encoding: gzip\r\n"


def state():
    # What getState answers in this mode: (extra headers, body).
    if mode == "malformed":
        return b"", (HEAD + "<params><param><value><string>RUNNING</value>").encode()
    if mode == "nested":
        depth = 50000
        return b"", (HEAD + "<params><param>" + "<value><array><data>" * depth
                     + "</data></array></value>" * depth + "</param></params>" + TAIL).encode()
    if mode == "gzip-comment":
        comment = (HEAD + "<!--" + " " * (3 << 20) + "-->"
                   + "<params><param><value>%s</value></param></params>" % RUNNING + TAIL).encode()
        return GZIP, zlib.compress(comment, 9, wbits=31)
    if mode == "gzip-big":
        big = xml("<struct><member><name>statename</name><value><string>RUNNING</string></value></member>"
                  "<member><name>pad</name><value><string>" + "x" * (64 << 20) + "</string></value></member></struct>")
        return GZIP, zlib.compress(big, 9, wbits=31)
    return b"", xml(RUNNING)


STATE = state()

def answer(method):
    if method == "supervisor.getState":
        return STATE
    if method == "supervisor.getPID":
        return b"", xml("<int>%d</int>" % os.getpid())
    if method == "supervisor.getAllConfigInfo":
        records = [struct(name="a", group="a", autostart=True)] if mode == "stopping" else []
        return b"", xml(array(*records))
    if method == "supervisor.getAllProcessInfo":
        records = [struct(name="a", group="a", statename="STOPPING", pid=0)] if mode == "stopping" else []
        return b"", xml(array(*records))
    return b"", xml("<boolean>1</boolean>")

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
    if b"<methodName>" not in request:
        conn.close()
        continue
    method = request.split(b"<methodName>")[1].split(b"</methodName>")[0].decode()
    headers, body = answer(method)
    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/xml\r\n" + headers
                 + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    conn.close()
"""


def as_user(user, *argv, check=True):
    return subprocess.run(argv, user=user.pw_uid, group=user.pw_gid, check=check, capture_output=True, text=True)


class Impostor:
    """The deployment's user puts a listener of theirs where the serving supervisord's socket was."""

    def __init__(self, host, sock, mode):
        self.host, self.sock = host, sock
        self.moved = sock.with_name(sock.name + ".moved")
        as_user(host.user, "mv", str(sock), str(self.moved))
        self.proc = subprocess.Popen(
            ["python3", "-c", FAKE_SUPERVISORD, str(sock), mode], user=host.user.pw_uid, group=host.user.pw_gid
        )
        wait_for(sock.exists, 30, "the impostor listening", interval=0.05)

    def leave(self):
        self.proc.kill()
        self.proc.wait()
        as_user(self.host.user, "mv", "-fT", str(self.moved), str(self.sock))


def serving_socket(host, name="tiny"):
    p = host.paths(name)
    return host.sf.saltfleet_paths.generation(p, host.sf.saltfleet_supervisor.serving(p))["socket"]


def status(host):
    return host.loaders.modules.deployment.status()


@pytest.fixture
def two(host, tiny, out, other_app):
    """Deployment tiny (attacked) and other (the second user's) beside it, both serving; tiny's serving socket."""
    states = host.apply(host.pillar({"tiny": tiny_app(tiny, out), "other": other_app()}))
    assert all(s["result"] is True for s in states.values()), states
    return serving_socket(host)


def timed_in_thread(target, limit):
    """Run ``target`` in a thread; (result or exception, seconds taken, still running after ``limit`` s)."""
    box, started = {}, time.monotonic()

    def run():
        try:
            box["result"] = target()
        except Exception as exc:
            box["result"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    return thread, box, time.monotonic() - started


# ------------------------------------------------ what supervisord's socket answers


@pytest.mark.parametrize("mode", ["malformed", "nested"])
def test_an_answer_that_breaks_the_parser_fails_that_deployment_alone(host, two, mode):
    """
    XML that does not parse (expat's ExpatError is no ValueError), or arrays
    nested deeper than Python's recursion limit (the refusal's repr() of the
    answer recurses): anything but a CommandExecutionError escapes
    deployment.status, and every deployment's row, the mine's heartbeat, goes.
    """
    impostor = Impostor(host, two, mode)
    try:
        rows = status(host)
    except Exception as exc:
        pytest.fail(f"deployment.status failed for every deployment on the host: {type(exc).__name__}: {exc!s:.200}")
    finally:
        impostor.leave()
    assert rows["other"]["state"] == "up", rows["other"]
    assert rows["tiny"]["state"] == "down", rows["tiny"]


def test_a_gzip_encoded_answer_is_held_to_the_calls_deadline(host, two):
    """
    xmlrpc.client inflates a gzip-encoded answer after the last read from the
    socket: a 3 KB answer that inflates to a 3 MiB XML comment keeps expat
    busy (it rescans an unfinished token on every 1 KiB fed) long after the
    10 s deadline, which only reads check. A full 4 MiB one inflates to 4 GiB.
    supervisord never encodes its answers: one that is is refused unread.
    """
    impostor = Impostor(host, two, "gzip-comment")
    try:
        thread, box, took = timed_in_thread(lambda: status(host), 300)
    finally:
        impostor.leave()
    assert not thread.is_alive(), "deployment.status still parses the answer after 300 s"
    assert not isinstance(box["result"], Exception), box["result"]
    assert "answered a body encoded 'gzip', which it never gives" in box["result"]["tiny"]["supervisord"], box
    bound = 2 * module("saltfleet_xmlrpc").RPC_TIMEOUT + 10
    assert took < bound, f"deployment.status took {took:.0f} s on one call with a {bound} s bound"


def test_an_answer_larger_than_the_bound_once_inflated_is_refused(host, two):
    """A 64 KB gzip-encoded answer that inflates to 64 MiB: RPC_LIMIT counts only bytes on the wire."""
    impostor = Impostor(host, two, "gzip-big")
    try:
        rows = status(host)
    finally:
        impostor.leave()
    assert rows["other"]["state"] == "up"
    assert "answered a body encoded 'gzip', which it never gives" in rows["tiny"]["supervisord"], rows["tiny"]


def test_a_stop_waits_no_longer_than_the_programs_stopwaitsecs(host, tiny, out):
    """
    supervisord itself SIGKILLs a program after its stopwaitsecs (2 s here,
    root's own config): a listener that says 'STOPPING' for ever holds
    deployment.restart (and a stop-first release switch) and the
    deployment's lock for stop_groups' own 3600 s.
    """
    deployment = tiny_app(tiny, out)
    deployment["programs"]["a"]["stopwaitsecs"] = 2
    host.apply(host.pillar({"tiny": deployment}))
    impostor = Impostor(host, serving_socket(host), "stopping")
    try:
        thread, _, took = timed_in_thread(lambda: host.loaders.modules.deployment.restart("tiny"), 90)
        stalled = thread.is_alive()
    finally:
        impostor.leave()
        thread.join(60)
    assert not stalled, f"deployment.restart still waits after {took:.0f} s for a program whose stopwaitsecs is 2"


def test_removal_never_waits_on_a_process_the_user_named(host, tiny, out):
    """
    The user answers for the serving generation with a pid of theirs (any
    process of theirs passes the /proc check); an overlap deploy would record
    it as the draining supervisord, and every removal would then wait on it,
    and fail, for as long as that process lives. Removal does not wait on
    the user's word: what runs in the deployment's cgroup is killed.
    """
    host.apply(host.pillar({"tiny": tiny_app(tiny, out)}))
    p = host.paths("tiny")
    first = host.sf.saltfleet_paths.generation(p, "1")
    real = int(first["pidfile"].read_text())
    impostor = Impostor(host, first["socket"], "plain")
    try:
        state = host.apply(host.pillar({"tiny": tiny_app(tiny, out, rev="v2")}))[STATE]
        draining = json.loads(p["manifest"].read_text()).get("draining") or {}
        thread, box, took = timed_in_thread(lambda: host.apply(host.pillar({}))[REMOVED], 300)
    finally:
        # Its socket went with the deployment's run/.
        impostor.proc.kill()
        impostor.proc.wait()
    # The deploy may refuse the answer outright; it never records the user's pid.
    assert state["result"] is True or f"answered its pid as {impostor.proc.pid}" in state["comment"], state
    recorded = {gen: record["pid"] for gen, record in draining.items()}
    assert recorded.get("1") in (None, real), f"the user's pid {impostor.proc.pid} was recorded as gen 1's supervisord"
    assert not thread.is_alive(), f"removal still waits after {took:.0f} s"
    assert box["result"]["result"] is True, box["result"]
    assert gone(real), "supervisord of generation 1 outlived the removal"


def test_root_never_connects_through_a_link_the_user_made(host, two, short_tmp):
    """A link at the socket's name to a socket in a folder only root may enter: root's connect() follows it."""
    closed = short_tmp / "closed"
    closed.mkdir(mode=0o700)
    roots = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    roots.bind(str(closed / "root.sock"))
    roots.listen(8)
    roots.settimeout(0.5)
    moved = two.with_name(two.name + ".moved")
    as_user(host.user, "mv", str(two), str(moved))
    as_user(host.user, "ln", "-s", str(closed / "root.sock"), str(two))
    # The user could not connect there themselves.
    probe = f"import socket; socket.socket(socket.AF_UNIX).connect('{closed}/root.sock')"
    assert as_user(host.user, "python3", "-c", probe, check=False).returncode
    connected = 0
    try:
        rows = status(host)
        with contextlib.suppress(TimeoutError):
            while True:
                roots.accept()[0].close()
                connected += 1
    finally:
        roots.close()
        as_user(host.user, "rm", "-f", str(two))
        as_user(host.user, "mv", "-fT", str(moved), str(two))
    assert rows["tiny"]["state"] == "down"
    assert connected == 0, f"root connected {connected} time(s) to a socket in {closed}, through the user's link"
    assert "uid 0" not in rows["tiny"]["supervisord"], rows["tiny"]


# ------------------------------------------------------------ Celery's replies


def test_a_celery_reply_nested_deep_fails_that_deployment_alone(host, tiny, out, other_app):
    """The user's venv Python prints JSON nested 100,000 deep: json.loads raises RecursionError, no ValueError."""
    host.apply(host.pillar({"tiny": worker(tiny, out, "mine"), "other": other_app()}))
    fake_celery(host, "tiny")
    host.loaders.modules.deployment.restart("tiny")
    fake_python(host, host.paths("tiny")["project"] / "venv", "[" * 100000)
    try:
        rows = status(host)
    except Exception as exc:
        pytest.fail(f"deployment.status failed for every deployment on the host: {type(exc).__name__}: {exc!s:.200}")
    assert rows["other"]["state"] == "up", rows["other"]
    assert "error" in rows["tiny"]["workers"], rows["tiny"]


# ------------------------------------------------------- the env and root's processes


def test_the_env_never_reaches_a_process_of_roots(host, tiny, out):
    """
    The boot script exports env to supervisord while it is still root (it
    drops to the user only once its Python runs). An env that names the
    user's tree, as PYTHONPATH at the app's own checkout does, makes root's
    Python import the user's sitecustomize.py (LD_PRELOAD, LD_LIBRARY_PATH,
    PYTHONHOME, PYTHONPYCACHEPREFIX... the same). The user writes one into the
    release and stops their own supervisord; the next apply starts it as root.
    """
    p = host.paths("tiny")
    env = {"TINYAPP_OUT": str(out), "PYTHONPATH": str(p["project"])}
    assert host.apply(host.pillar({"tiny": tiny_app(tiny, out, env=env)}))[STATE]["result"] is True
    release = p["releases"] / tiny["shas"]["v1"]
    probe = f"import os\nopen(os.path.join({str(out)!r}, 'imported-as-uid-%d' % os.getuid()), 'w').close()\n"
    as_user(host.user, "sh", "-c", 'printf %s "$1" > "$2"', "sh", probe, str(release / "sitecustomize.py"))
    pidfile = host.sf.saltfleet_paths.generation(p, host.sf.saltfleet_supervisor.serving(p))["pidfile"]
    supervisord = int(pidfile.read_text())
    as_user(host.user, "kill", "-TERM", str(supervisord))
    wait_for(lambda: gone(supervisord), 30, "the user's supervisord stopped")
    again = host.apply(host.pillar({"tiny": tiny_app(tiny, out, env=env)}))[STATE]
    assert again["result"] is True, again
    assert not (out / "imported-as-uid-0").exists(), "root's supervisord ran the user's sitecustomize.py as root"


# ------------------------------------------------------------------- removal


def test_absent_leaves_no_process_of_the_deployment(host, tiny, out):
    """
    A program that starts a process in a session of its own (setsid, any
    daemonizing library) after trying to leave the deployment's cgroup for
    the hierarchy's root: nothing of it outlives absent.
    """
    marker = f"tok-{uuid.uuid4().hex[:12]}"
    deployment = tiny_app(tiny, out, env={"TINYAPP_OUT": str(out), "API_TOKEN": marker})
    leave = f"echo $$ > {host.sf.saltfleet_cgroup.hierarchy()}/cgroup.procs"
    deployment["programs"]["a"]["command"] = f"sh -c '{leave}; setsid -f sleep 7777; exec python app.py a'"
    host.apply(host.pillar({"tiny": deployment}))
    wait_for((out / "a.json").exists, 30, "the program started, after its daemon")
    removed = host.apply(host.pillar({}))[REMOVED]
    left = holding(marker)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    assert removed["result"] is True, removed
    assert not left, f"processes {left} of the removed deployment still run with its env"


def holding(marker):
    """Pids of processes whose environment holds ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
    return found


def test_the_user_cannot_keep_removal_from_taking_the_secrets(host, tiny, out):
    """
    A folder in run/ the user took their own write permission from: the
    user's `find -delete` fails, absent stops before root's part, and the
    boot script (the env) and deploy key stay on the host, every time.
    """
    env = {"TINYAPP_OUT": str(out), "API_TOKEN": "tok-r3m0v3"}
    host.apply(host.pillar({"tiny": tiny_app(tiny, out, env=env)}))
    p = host.paths("tiny")
    as_user(host.user, "sh", "-c", 'mkdir "$1/trap" && touch "$1/trap/f" && chmod 500 "$1/trap"', "sh", str(p["run"]))
    removed = host.apply(host.pillar({}))[REMOVED]
    left = [path.name for path in p["state"].glob("supervisord.*.boot")] if p["state"].exists() else []
    assert removed["result"] is True, removed["comment"]
    assert "tiny" not in host.loaders.modules.deployment.list(), "the removal is left to do again"
    assert not left, f"{left} (the env) stay in {p['state']} after removal"


# ----------------------------------------------------- other accounts, other deployments


def test_another_account_reads_nothing_of_the_deployments_tree(host, tiny, out):
    """
    The mirror is the deployment's user's alone (an ACL), but the user's
    release is a full clone of it, every branch and tag, in a home and
    folders made 0755 (root makes the home so; the user's commands run with
    umask 022), and the programs' logs are 0644.
    """
    secret = "tok-l0gg3d"
    host.apply(host.pillar({"tiny": tiny_app(tiny, out, env={"TINYAPP_OUT": str(out), "TINYAPP_SAY": secret})}))
    p = host.paths("tiny")
    release = p["releases"] / tiny["shas"]["v1"]
    nobody = pwd.getpwnam("nobody")
    neighbour = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}

    def reads(*argv):
        env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}
        return subprocess.run(argv, capture_output=True, text=True, check=False, cwd="/", env=env, **neighbour)

    refs = reads("git", "-c", "safe.directory=*", "--git-dir", str(release / ".git"), "for-each-ref")
    log = reads("cat", str(p["logs"] / f"a.g{host.sf.saltfleet_supervisor.serving(p)}.log"))
    leaks = []
    if "broken-reqs" in refs.stdout:
        leaks.append(f"nobody lists every branch of the private repository in {release}")
    if secret in log.stdout:
        leaks.append("nobody reads what the program logged")
    assert not leaks, leaks


def test_a_deployment_reads_no_other_deployments_env(host, tiny, out, other_app, second_user):
    """
    Each deployment runs as a Unix user of its own (the schema refuses two
    sharing one): whatever the other deployment's code does as its user, it
    reads nothing of tiny's processes.
    """
    token = f"tok-{uuid.uuid4().hex[:12]}"
    pillar = {"tiny": tiny_app(tiny, out, env={"TINYAPP_OUT": str(out), "API_TOKEN": token}), "other": other_app()}
    states = host.apply(host.pillar(pillar))
    assert all(s["result"] is True for s in states.values()), states
    victim = report(out)["pid"]
    # What 'other''s code, as its Unix user, can do.
    environ = as_user(second_user, "cat", f"/proc/{victim}/environ", check=False)
    assert environ.returncode != 0 and token not in environ.stdout, "deployment other's user reads tiny's env"


# --------------------------------------------------------- the app's repository


@pytest.fixture(scope="module")
def chained():
    """A copy of the tiny app's repository with a branch 'chain': requirements.txt includes 2,000 files in a row."""
    base = short_tmpdir("sfc-")
    bare, shas = tiny_repo(base)
    work = base / "chain-work"
    repo = git.Repo.clone_from(str(bare), work)
    repo.git.checkout("-b", "chain")
    count = 2000
    (work / "requirements.txt").write_text("-r r1.txt\n")
    for index in range(1, count):
        (work / f"r{index}.txt").write_text(f"-r r{index + 1}.txt\n")
    (work / f"r{count}.txt").write_text("# the end\n")
    shas["chain"] = commit(work, "requirements that include one another 2000 deep")
    repo.remote().push("chain")
    yield {"repo": bare, "shas": shas}
    shutil.rmtree(base, ignore_errors=True)


def test_what_a_plan_reads_from_the_repository_is_bounded(host, chained, out):
    """
    Each requirements include costs root two git processes while planning,
    under the deployment's lock, dry runs too: a repository of many tiny
    files holds the state run as long as it likes.
    """
    started = time.monotonic()
    baseline = host.apply(host.pillar({"tiny": tiny_app(chained, out, rev="v2")}), test=True)[STATE]
    took_baseline = time.monotonic() - started
    assert baseline["result"] is None, baseline
    started = time.monotonic()
    state = host.apply(host.pillar({"tiny": tiny_app(chained, out, rev="chain")}), test=True)[STATE]
    took = time.monotonic() - started
    assert state["result"] is False or took < took_baseline + 20, (
        f"a dry run of the chained requirements took {took:.0f} s (a plain one {took_baseline:.0f} s) "
        "and did not refuse them"
    )


# ------------------------------------------------------- attacks that fail today


def test_the_user_cannot_link_or_read_roots_files_of_the_deployment(host, tiny, out):
    """Hard links to the config (readable by the user) and the boot script (root's alone): the kernel refuses both."""
    host.apply(host.pillar({"tiny": tiny_app(tiny, out, env={"TINYAPP_OUT": str(out), "API_TOKEN": "tok-h4rd"})}))
    p = host.paths("tiny")
    gen = host.sf.saltfleet_supervisor.serving(p)
    files = host.sf.saltfleet_paths.generation(p, gen)
    for name, path in (("conf", files["conf"]), ("boot", files["boot"]), ("lock", p["lock"])):
        linked = as_user(host.user, "ln", str(path), str(p["home"] / f"linked-{name}"), check=False)
        assert linked.returncode != 0, f"the user hard-linked {path}"
    assert as_user(host.user, "cat", str(files["boot"]), check=False).returncode != 0
    assert "tok-h4rd" not in as_user(host.user, "cat", str(files["conf"]), check=False).stdout


def test_a_log_dir_swapped_for_a_link_gets_nothing_written_by_root(host, tiny, out, short_tmp):
    """supervisord, started by root, opens its logs only once it is the user: a link to root's folder gets nothing."""
    host.apply(host.pillar({"tiny": tiny_app(tiny, out)}))
    p = host.paths("tiny")
    closed = short_tmp / "closed"
    closed.mkdir(mode=0o700)
    pidfile = host.sf.saltfleet_paths.generation(p, host.sf.saltfleet_supervisor.serving(p))["pidfile"]
    supervisord = int(pidfile.read_text())
    as_user(host.user, "kill", "-TERM", str(supervisord))
    wait_for(lambda: gone(supervisord), 30, "the user's supervisord stopped")
    as_user(host.user, "mv", str(p["logs"]), str(p["logs"]) + ".away")
    as_user(host.user, "ln", "-s", str(closed), str(p["logs"]))
    try:
        state = host.apply(host.pillar({"tiny": tiny_app(tiny, out)}))[STATE]
    finally:
        as_user(host.user, "rm", str(p["logs"]))
        as_user(host.user, "mv", str(p["logs"]) + ".away", str(p["logs"]))
    assert list(closed.iterdir()) == [], "root wrote into the folder the user's link named"
    assert state["result"] is False, state


def test_deployment_logs_through_a_link_reads_nothing_of_roots(host, tiny, out, short_tmp):
    """The program's log swapped for a link to a root-only file: deployment.logs reads it as the user, and fails."""
    host.apply(host.pillar({"tiny": tiny_app(tiny, out)}))
    p = host.paths("tiny")
    secret = short_tmp / "secret"
    secret.write_text("ROOT-ONLY-LOG\n")
    secret.chmod(0o600)
    log = p["logs"] / f"a.g{host.sf.saltfleet_supervisor.serving(p)}.log"
    as_user(host.user, "ln", "-sf", str(secret), str(log))
    with pytest.raises(CommandExecutionError) as failed:
        host.loaders.modules.deployment.logs("tiny", "a")
    assert "ROOT-ONLY-LOG" not in str(failed.value)
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
