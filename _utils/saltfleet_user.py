"""
The deployment's user: who they are, and everything done in their tree.

Root (the minion) never writes into, changes owners in, deletes in or runs
code from a tree the deployment's user controls. Whatever happens there (a
checkout, a virtualenv build, the release link, pruning) runs as that user,
in a process of its own with a clean environment, so the kernel holds the
line: a symlink the user plants leads only to what the user could reach anyway.
"""

import os
import pwd
import stat
import subprocess
from pathlib import Path

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


def __virtual__():
    return __virtualname__


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


def run(user, argv, home, cwd=None, env=None, timeout=3600):
    """
    Run ``argv`` as ``user`` (its groups, umask 022, a clean environment with
    ``env`` on top) and return the CompletedProcess; output is captured as text.
    """
    pw = account(user)
    kwargs = {}
    if pw.pw_uid != os.geteuid():
        if os.geteuid() != 0:
            raise CommandExecutionError(f"the minion must run as root to act as user '{user}'")
        kwargs = {
            "user": pw.pw_uid,
            "group": pw.pw_gid,
            "extra_groups": [g for g in os.getgrouplist(user, pw.pw_gid) if g != pw.pw_gid],
        }
    try:
        return subprocess.run(
            [str(a) for a in argv],
            cwd=str(cwd or home),
            env=environ(user, home, env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            umask=0o022,
            start_new_session=True,
            check=False,
            **kwargs,
        )
    except subprocess.TimeoutExpired:
        raise CommandExecutionError(f"`{' '.join(map(str, argv))}` as {user} ran over {timeout} s") from None


def spawn(user, argv, home, log, cwd=None, env=None):
    """Start ``argv`` as ``user`` in the background, detached, its output appended to ``log`` (opened as the user)."""
    pw = account(user)
    kwargs = {}
    if pw.pw_uid != os.geteuid():
        kwargs = {"user": pw.pw_uid, "group": pw.pw_gid}
    subprocess.Popen(
        ["/bin/sh", "-c", 'log=$1; shift; exec "$@" >> "$log" 2>&1', "sh", str(log), *map(str, argv)],
        cwd=str(cwd or home),
        env=environ(user, home, env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        umask=0o022,
        start_new_session=True,
        close_fds=True,
        **kwargs,
    )


def check(proc, what):
    """Raise ``what`` with the tail of the output when ``proc`` failed."""
    if proc.returncode:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-12:])
        raise CommandExecutionError(f"{what} (exit {proc.returncode}):\n{tail}" if tail else f"{what}")
    return proc


def _sh(user, home, script, *args, what):
    return check(run(user, ["/bin/sh", "-c", script, "sh", *map(str, args)], home), what)


def makedirs(user, home, *folders):
    """Create folders (and their parents) as the user."""
    _sh(user, home, 'mkdir -p -- "$@"', *folders, what=f"creating {', '.join(map(str, folders))} as {user}")


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
