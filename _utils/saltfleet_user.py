"""
The deployment's user: who they are, and every process started for them.

Root (the minion) never writes into, changes owners in, deletes in, changes
directory into or runs code from a tree the deployment's user controls.
Whatever happens there (a checkout, a virtualenv build, the release link,
pruning, a question to Celery) runs as that user, in a process started by
the one primitive here (:func:`run`, :func:`spawn`): the user's uid, gid and
exactly the user's groups (none of the minion's), started in ``/`` and
changing into the user's tree only once it is the user, a clean environment,
and a deadline for the whole call. So the kernel holds the line: a symlink
the user plants leads only to what the user could reach anyway.

What such a process says is the user's word: its output is read up to a
bound (the tail kept), and :func:`scrub` hides the deployment's env values
before any of it reaches a comment, a log or a return. Root's own commands
(git on root's mirror, supervisord's start) go through :func:`run_root`, the
same way but as root: no other module starts a process.
"""

import contextlib
import contextvars
import json
import os
import pwd
import selectors
import signal
import stat
import subprocess
import tempfile
import time
import urllib.parse
from pathlib import Path

import salt.loader.context
from salt.exceptions import CommandExecutionError

__virtualname__ = "saltfleet_user"

PATH = "/usr/local/bin:/usr/bin:/bin"
# The host's network settings, passed on from the minion's environment so the
# user's uv reaches the package index the way the host does (a proxy, a CA).
NETWORK_ENV = (
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "UV_INDEX_URL",
    "UV_DEFAULT_INDEX",
    "UV_EXTRA_INDEX_URL",
    "UV_NATIVE_TLS",
)
# What is kept of each output stream of a command: its last bytes.
OUTPUT_LIMIT = 1 << 20
# The shell that changes into the user's directory once it runs as the user.
IN_DIR = 'cd -- "$1" || exit 125; shift; exec "$@"'


def __virtual__():
    return __virtualname__


def _utils(name):
    # Salt's utils loader packs no __utils__ into utils modules: the loader in context.
    loader = salt.loader.context.loader_ctxvar.get()
    return loader.pack.get("__utils__", loader)[name]


def account(user, where=None):
    """The passwd entry of ``user``; an error naming the pillar key when there is none."""
    try:
        return pwd.getpwnam(user)
    except KeyError:
        raise CommandExecutionError(
            f"{where or 'saltfleet'}:user: '{user}' does not exist on this host; "
            "create it (user.present) or set saltfleet:user"
        ) from None


def environ(user, home, extra=None):
    """The environment a command of the user starts with: nothing of the minion's own."""
    env = {
        "HOME": str(home),
        "USER": user,
        "LOGNAME": user,
        "PATH": PATH,
        "LANG": "C.UTF-8",
        "GIT_TERMINAL_PROMPT": "0",
    }
    env.update({key: os.environ[key] for key in NETWORK_ENV if key in os.environ})
    env.update(extra or {})
    return env


def _identity(user):
    """Popen's arguments that make the child ``user``: uid, gid, and exactly the user's own groups."""
    pw = account(user)
    groups = [g for g in os.getgrouplist(user, pw.pw_gid) if g != pw.pw_gid]
    if (pw.pw_uid, pw.pw_gid) == (os.geteuid(), os.getegid()) and set(groups) == set(os.getgroups()) - {pw.pw_gid}:
        return {}
    if os.geteuid() != 0:
        raise CommandExecutionError(f"the minion must run as root to act as user '{user}'")
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": groups}


def _in(cwd, argv):
    """``argv`` run from ``cwd``, which the child enters itself, as the user (never root's chdir)."""
    argv = [str(a) for a in argv]
    return argv if cwd is None else ["/bin/sh", "-c", IN_DIR, "sh", str(cwd), *argv]


def _kill(proc):
    """The child and every process of its session (each starts one of its own)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.wait()


def _whole_lines(buf, cut):
    """What is kept of an output: when its head was cut, from its first whole line on (no piece of a value)."""
    return bytes(buf[buf.find(b"\n") + 1 :] if cut else buf)


def _collect(proc, deadline, limit=OUTPUT_LIMIT):
    """
    (stdout, stderr) bytes of ``proc``, the last ``limit`` of each in whole
    lines (an env value is one line: :func:`scrub` then finds it whole, never
    a piece of it cut at the head); TimeoutError at ``deadline``.
    """
    kept = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    cut = set()
    with selectors.DefaultSelector() as selector:
        for stream in kept:
            selector.register(stream, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                buf = kept[key.fileobj]
                buf += chunk
                if len(buf) > limit:
                    del buf[: len(buf) - limit]
                    cut.add(key.fileobj)
    proc.wait(max(0.0, deadline - time.monotonic()))
    return tuple(_whole_lines(kept[stream], stream in cut) for stream in (proc.stdout, proc.stderr))


@contextlib.contextmanager
def _entering(home, identity):
    """
    Popen's ``preexec_fn`` that moves the child into the cgroup of the user
    whose home is ``home`` (saltfleet_cgroup), through a descriptor root
    opened: the child enters before it runs anything of the user's, and
    cannot leave. {} for root's own commands, or where the host has none.
    """
    fd = _utils("saltfleet_cgroup.opener")(home) if identity else None
    try:
        yield {} if fd is None else {"preexec_fn": lambda: os.write(fd, b"0")}
    finally:
        if fd is not None:
            os.close(fd)


def _run(argv, env, timeout, what, umask=0o077, home=None, **identity):
    """Start ``argv`` (its own session, stdin closed, in /), collect its output within ``timeout``."""
    deadline = time.monotonic() + timeout
    with _entering(home, identity) as entering:
        proc = subprocess.Popen(
            argv,
            cwd="/",
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            umask=umask,
            start_new_session=True,
            close_fds=True,
            **entering,
            **identity,
        )
    try:
        out, err = _collect(proc, deadline)
    except (TimeoutError, subprocess.TimeoutExpired):
        _kill(proc)
        raise CommandExecutionError(f"{what} ran over {timeout} s") from None
    finally:
        for stream in (proc.stdout, proc.stderr):
            stream.close()
    decode = lambda data: data.decode(errors="replace")  # noqa: E731
    return subprocess.CompletedProcess(argv, proc.returncode, decode(out), decode(err))


def run(user, argv, home, cwd=None, env=None, timeout=3600):
    """
    Run ``argv`` as ``user`` (see the module: exactly the user's groups, in
    ``cwd`` entered as the user, a clean environment with ``env`` on top,
    umask 077: what it makes is the user's alone, in the user's cgroup)
    within ``timeout`` seconds in all; the CompletedProcess, its output text
    bounded. An error when it runs over, the process and its session killed.
    """
    identity = _identity(user)
    what = f"`{' '.join(map(str, argv))}` as {user}"
    return _run(_in(cwd, argv), environ(user, home, env), timeout, what, home=home, **identity)


def spawn(user, argv, home, log, cwd=None, env=None):
    """
    Start ``argv`` as ``user`` in the background, detached (as :func:`run`
    starts it), its output appended to ``log``, which it opens as the user;
    its pid (the shell that opens the log becomes ``argv``).
    """
    identity = _identity(user)
    script = 'log=$1; shift; exec "$@" >> "$log" 2>&1'
    with _entering(home, identity) as entering:
        return subprocess.Popen(
            ["/bin/sh", "-c", script, "sh", str(log), *_in(cwd, argv)],
            cwd="/",
            env=environ(user, home, env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            umask=0o077,
            start_new_session=True,
            close_fds=True,
            **entering,
            **identity,
        ).pid


def run_root(argv, env, timeout, cwd=None, daemon=False):
    """
    One of root's own commands (git on root's mirror, supervisord's start):
    ``cwd`` is root's, entered by the child. ``daemon``: the command leaves a
    daemon behind that keeps what it inherited, so its output goes through
    a file and only the command itself is waited for.
    """
    argv = _in(cwd, argv)
    what = f"`{' '.join(argv)}`"
    if not daemon:
        # Root's mirror is read by the deployment's user through its top folder's ACL: its files are 0644.
        return _run(argv, env, timeout, what, umask=0o022)
    with tempfile.TemporaryFile() as output:
        try:
            proc = subprocess.run(
                argv,
                cwd="/",
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise CommandExecutionError(f"{what} ran over {timeout} s") from None
        size = output.seek(0, os.SEEK_END)
        output.seek(max(0, size - OUTPUT_LIMIT))
        said = _whole_lines(output.read(), size > OUTPUT_LIMIT)
        return subprocess.CompletedProcess(argv, proc.returncode, said.decode(errors="replace"), "")


def check(proc, what, secrets=None):
    """Raise ``what`` with the tail of the output (``secrets`` hidden) when ``proc`` failed."""
    if proc.returncode:
        # Hidden first, then cut: a value is never split before it is looked for.
        tail = "\n".join(scrub(proc.stderr or proc.stdout or "", secrets).strip().split("\n")[-12:])
        raise CommandExecutionError(f"{what} (exit {proc.returncode}):\n{tail}" if tail else f"{what}")
    return proc


# The forms of the secrets :func:`scrub` hides beyond those it is given, while a :func:`hiding` block runs.
_HIDING = contextvars.ContextVar("saltfleet_hiding", default=())


def _forms(secrets):
    """[(form, name)] of each value of ``secrets`` as written and as JSON, URLs and shells quote it, longest first."""
    forms = set()
    for key, raw in secrets.items() if isinstance(secrets, dict) else secrets:
        value = str(raw)
        if len(value) < 3:
            continue
        escaped = value.replace("\\", "\\\\")
        quoted = {escaped.replace("'", "\\'"), escaped.replace('"', '\\"'), repr(value)[1:-1]}
        for form in {value, json.dumps(value)[1:-1], urllib.parse.quote(value, safe=""), *quoted}:
            forms.add((form, str(key)))
    return sorted(forms, key=lambda f: (-len(f[0]), f))


def _replaced(text, forms):
    for form, key in forms:
        text = text.replace(form, f"<env:{key}>")
    return text


def scrub(text, secrets=None):
    """
    ``text`` from the user's side with each value of ``secrets`` ({name:
    value}, a deployment's env, or (name, value) pairs when a name has had
    more than one value) replaced by ``<env:NAME>``: as written, and as JSON,
    URLs and shells quote it, and as Python quotes it in either quotes; and,
    in a :func:`hiding` block, the secrets of that block too.
    """
    forms = _HIDING.get()
    if secrets:
        forms = sorted({*forms, *_forms(secrets)}, key=lambda f: (-len(f[0]), f))
    return _replaced(text, forms) if text and forms else text


@contextlib.contextmanager
def hiding(secrets):
    """
    While the block runs, :func:`scrub` hides ``secrets`` too, whoever calls
    it: where an answer of supervisord's or Celery's is quoted in an error
    (``saltfleet_xmlrpc.said``: before it is escaped or cut, which would leave
    a value no longer whole), and the output of every process.
    """
    token = _HIDING.set(_forms(secrets or ()))
    try:
        yield
    finally:
        _HIDING.reset(token)


def _sh(user, home, script, *args, what):
    return check(run(user, ["/bin/sh", "-c", script, "sh", *map(str, args)], home), what)


def makedirs(user, home, *folders):
    """Create folders (and their parents) as the user."""
    _sh(user, home, 'mkdir -p -- "$@"', *folders, what=f"creating {', '.join(map(str, folders))} as {user}")


def private(user, home, *folders):
    """Make folders of the user's theirs alone (0700), as the user."""
    _sh(user, home, 'chmod 700 -- "$@"', *folders, what=f"making {', '.join(map(str, folders))} private as {user}")


def relink(user, home, link, target):
    """Point the user's symlink ``link`` at ``target`` in one rename, as the user."""
    link = Path(link)
    tmp = link.with_name(f".{link.name}.new")
    _sh(
        user,
        home,
        'if [ -e "$1" ] && [ ! -L "$1" ]; then echo "$1 exists and is not a link" >&2; exit 3; fi; '
        'ln -sfn -- "$2" "$3" && mv -fT -- "$3" "$1"',
        link,
        target,
        tmp,
        what=f"pointing {link} at {target} as {user}",
    )


def write(user, home, path, text):
    """Write a small file as the user (a marker in a release or venv)."""
    _sh(user, home, 'printf %s "$2" > "$1"', path, text, what=f"writing {path} as {user}")


def remove(user, home, *paths):
    """Delete trees of the user's, as the user (``rm -rf``: links are removed, never followed)."""
    if paths:
        _sh(user, home, 'rm -rf -- "$@"', *paths, what=f"removing {', '.join(map(str, paths))} as {user}")


def remove_named(user, home, folder, *globs):
    """Delete what ``folder`` (the user's) holds directly under names matching ``globs``, as the user."""
    if globs:
        test = [word for glob in globs for word in ("-o", "-name", glob)][1:]
        script = 'folder=$1; shift; [ -d "$folder" ] || exit 0; '
        script += 'find "$folder" -mindepth 1 -maxdepth 1 ! -type d \\( "$@" \\) -delete'
        _sh(user, home, script, folder, *test, what=f"removing {', '.join(globs)} from {folder} as {user}")


def remove_own_dir(user, home, folder):
    """
    Remove ``folder``, the user's, inside a folder of root's (a deployment's
    run/): the user deletes what is in it, however deep, then root removes
    the empty entry from its own folder. An error when the user filled it again.
    """
    folder = Path(folder)
    if not os.path.lexists(folder):
        return
    if folder.is_dir() and not folder.is_symlink():
        script = 'cd -- "$1" && chmod -R u+rwX . && find . -mindepth 1 -delete'
        _sh(user, home, script, folder, what=f"emptying {folder} as {user}")
        os.rmdir(folder)
    else:
        os.unlink(folder)


def plain_path(anchor, path, link=False):
    """
    True when no component of ``path`` below ``anchor`` (the user's home) is a
    symlink, ``path`` itself aside when it is one saltfleet makes (``link``):
    what saltfleet prunes or purges is only what it made itself.
    """
    anchor, path = Path(anchor), Path(path)
    current = anchor
    parts = path.relative_to(anchor).parts
    for index, part in enumerate(parts):
        current = current / part
        try:
            if stat.S_ISLNK(os.lstat(current).st_mode) and not (link and index == len(parts) - 1):
                return False
        except FileNotFoundError:
            return True
    return True
