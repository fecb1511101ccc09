"""
Files root writes and trusts: one atomic write, JSON, the deployment
manifests, root's own directories (checked before every use), the binaries
root runs, and the lock that keeps two changes of one deployment apart.

Root writes only into directories that root alone can change: every
component of the path is owned by root (or by the user the minion runs as)
and writable by nobody else, sticky folders such as ``/tmp`` aside. Anything
in a tree the deployment's user controls is written by that user
(``saltfleet_user``), never by root.
"""

import contextlib
import errno
import fcntl
import json
import os
import shutil
import signal
import stat
import sys
import tempfile
import time
from pathlib import Path

import salt.loader.context
from salt.exceptions import CommandExecutionError

__virtualname__ = "saltfleet_files"

# Where a tool is looked for when pillar names none and Salt's own Python has none beside it.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def __virtual__():
    return __virtualname__


def _utils(name):
    # Salt's utils loader packs no __utils__ into utils modules. The loader in
    # context is that mapping while one of their functions runs, or the loader
    # module's whose code runs on (a context manager's body) and holds it.
    loader = salt.loader.context.loader_ctxvar.get()
    return loader.pack.get("__utils__", loader)[name]


def _trusted_uids():
    return {0, os.geteuid()}


# ---------------------------------------------------------------- writing


def write_atomic(path, data, mode=0o644, gid=None):
    """
    Write bytes or text to ``path`` through a synced temporary file and a
    rename: readers see old or new. ``gid`` gives the file to that group.
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        if gid is not None:
            os.fchown(fd, -1, gid)
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder):
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_json(path, default=None):
    """The JSON in ``path``, or ``default`` when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return default


def write_json(path, data, mode=0o644):
    """``data`` as indented JSON, written atomically."""
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n", mode)


def relink(link, target):
    """Point the symlink ``link`` at ``target`` in one rename (in a directory root alone writes)."""
    link = Path(link)
    tmp = link.with_name(f".{link.name}.new")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


# --------------------------------------------------- root's own directories


def check_trusted(path, what=None):
    """
    Raise unless every component of ``path`` is owned by root (or the minion's
    own user) and writable by no one else; sticky folders like /tmp may be on
    the way, not at the end. A symlink on the way is followed only when root
    owns it, and its target is checked the same way.
    """
    path = Path(os.path.abspath(path))
    current = Path("/")
    for index, part in enumerate(path.parts[1:], start=1):
        current = current / part
        last = index == len(path.parts) - 1
        st = os.lstat(current)
        if st.st_uid not in _trusted_uids():
            raise _untrusted(path, current, f"is owned by uid {st.st_uid}", what)
        if stat.S_ISLNK(st.st_mode):
            target = Path(os.path.realpath(current))
            check_trusted(target, what)
            current = target
            continue
        sticky = bool(st.st_mode & stat.S_ISVTX) and stat.S_ISDIR(st.st_mode)
        if st.st_mode & 0o022 and (last or not sticky):
            raise _untrusted(path, current, f"is writable by others (mode {oct(st.st_mode & 0o7777)})", what)


def _untrusted(path, component, problem, what):
    prefix = f"{what}: " if what else ""
    return CommandExecutionError(
        f"{prefix}{component} {problem}, so root will not use {path}; make it root's and writable by root only"
    )


def root_dir(path, mode=0o755, what=None, enforce=True):
    """
    A directory only root can change, at ``path``: missing parts are created
    (0755, ``mode`` for the last), and the whole path is checked
    (``check_trusted``). ``enforce`` sets ``mode`` on an existing one too.
    """
    path = Path(path)
    missing = []
    existing = path
    while not os.path.lexists(existing):
        missing.append(existing)
        existing = existing.parent
    check_trusted(existing, what)
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(folder, mode if folder == path else 0o755)
    check_trusted(path, what)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise CommandExecutionError(f"{what + ': ' if what else ''}{path} is not a directory; move it away")
    if enforce and stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)
    return path


def user_dir(path, uid, gid, mode=0o700):
    """
    A directory the user owns inside one of root's (``root_dir``): root makes
    it and gives it to the user; only its contents are theirs.
    """
    path = Path(path)
    check_trusted(path.parent)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, mode)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if (st.st_uid, st.st_gid) != (uid, gid):
            os.fchown(fd, uid, gid)
        if stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)
    return path


def remove_root_tree(path):
    """Remove a tree of root's (a deployment's state dir) after checking it is root's."""
    path = Path(path)
    if not os.path.lexists(path):
        return False
    check_trusted(path.parent)
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
    else:
        shutil.rmtree(path)
    return True


# ------------------------------------------------------------------ tools


def trusted_tool(name, configured=None, key=None):
    """
    The absolute path of a binary root may run: ``configured`` (pillar), else
    the one beside Salt's own Python, else one on the system PATH. It must be
    root's and writable by root only, all the way down.
    """
    where = key or f"saltfleet:{name}"
    if configured:
        if not os.path.isabs(configured):
            raise CommandExecutionError(f"{where}: {configured!r} must be an absolute path")
        candidate = configured
    else:
        beside = Path(sys.executable).parent / name
        candidate = str(beside) if beside.exists() else shutil.which(name, path=SYSTEM_PATH)
    if not candidate or not os.path.exists(candidate):
        raise CommandExecutionError(
            f"{where}: no {name} found (beside Salt's Python {sys.executable} or on {SYSTEM_PATH}); "
            f"install it or set {where}"
        )
    try:
        check_trusted(candidate, where)
    except FileNotFoundError:
        raise CommandExecutionError(f"{where}: {candidate} does not exist") from None
    if not os.access(candidate, os.X_OK):
        raise CommandExecutionError(f"{where}: {candidate} is not executable")
    return candidate


# -------------------------------------------------------------- manifests


def read_manifest(p):
    """What a deployment serves, as its last change recorded it ({} when not installed)."""
    return read_json(p["manifest"], {}) or {}


def write_manifest(p, data):
    write_json(p["manifest"], data)


def installed(root):
    """Manifests of the deployments installed under ``root``, by name."""
    folder = _utils("saltfleet_paths.registry")(root) / "deployments"
    found = {}
    if folder.is_dir():
        for entry in sorted(folder.iterdir()):
            data = read_json(entry / "manifest.json")
            if data:
                found[entry.name] = data
    return found


# ------------------------------------------------------------ fault points


def fault_point(root, point):
    """
    Where a test makes a change stop half way: a file ``faults/<point>`` in
    root's registry holding ``kill`` kills this process there, ``wait`` holds
    it until the file is removed. No such file exists on a real host; only
    root could create one.
    """
    marker = _utils("saltfleet_paths.registry")(root) / "faults" / point
    try:
        action = marker.read_text().strip()
    except OSError:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    deadline = time.monotonic() + 600
    while action == "wait" and marker.exists() and time.monotonic() < deadline:
        time.sleep(0.1)


# ------------------------------------------------------------------- lock


@contextlib.contextmanager
def lock(path, holder, timeout=60, shared=False):
    """
    Hold the lock at ``path`` (a file in root's state dir), waiting up to
    ``timeout`` seconds for whoever holds it: exclusive for a change, ``shared``
    for a reader (a dry run) that must not see a change half made. ``holder``
    says who takes it (shown to the next caller); the kernel drops the lock if
    its holder dies.
    """
    flags = os.O_RDONLY if shared else os.O_RDWR | os.O_CREAT
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    raise CommandExecutionError(
                        f"{holder}: waited {timeout} s for {_lock_holder(fd)} to finish; retry when it is done"
                    ) from None
                time.sleep(0.1)
        if not shared:
            os.ftruncate(fd, 0)
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            os.pwrite(fd, json.dumps({"holder": holder, "pid": os.getpid(), "since": since}).encode(), 0)
        try:
            yield
        finally:
            if not shared:
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _lock_holder(fd):
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        info = {}
    if not info:
        return "another change"
    return f"{info.get('holder')} (pid {info.get('pid')}, since {info.get('since')})"
