"""
Files root writes and trusts: one atomic write, JSON, root's own
directories (checked before every use), who else may read a file of root's,
the binaries root runs, and the lock that keeps two changes of one
deployment apart.

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
import struct
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


def write_atomic(path, data, mode=0o644, reader=None):
    """
    Write bytes or text to ``path`` through a synced temporary file and a
    rename: readers see old or new. ``reader``: the one user (uid) who may
    read it besides root (see :func:`readable_by`).
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        if reader is not None:
            _grant(fd, reader, path)
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


# ------------------------------------------------------- one reader alone

# The kernel's POSIX ACL (system.posix_acl_access): version 2, then (tag, perm, id) entries.
_ACL_VERSION, _ACL_UNDEFINED = 2, 0xFFFFFFFF
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_MASK, _ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20


def _acl(uid, directory):
    """Root: everything; user ``uid``: read (and pass, for a directory); anyone else: nothing."""
    read = 0o5 if directory else 0o4
    entries = [
        (_ACL_USER_OBJ, 0o7 if directory else 0o6, _ACL_UNDEFINED),
        (_ACL_USER, read, uid),
        (_ACL_GROUP_OBJ, 0, _ACL_UNDEFINED),
        (_ACL_MASK, read, _ACL_UNDEFINED),
        (_ACL_OTHER, 0, _ACL_UNDEFINED),
    ]
    return struct.pack("<I", _ACL_VERSION) + b"".join(struct.pack("<HHI", *e) for e in entries)


def _grant(fd, uid, path):
    """Give the open file ``fd`` (root's) its one reader, ``uid``; True when that changed anything."""
    st = os.fstat(fd)
    acl = _acl(uid, stat.S_ISDIR(st.st_mode))
    try:
        current = os.getxattr(fd, "system.posix_acl_access")
    except OSError:
        current = None
    if current == acl and st.st_gid == 0:
        return False
    if st.st_gid != 0:
        os.fchown(fd, -1, 0)
    try:
        os.setxattr(fd, "system.posix_acl_access", acl)
    except OSError as exc:
        raise CommandExecutionError(
            f"{path}: cannot give its one reader (uid {uid}) access: {exc.strerror}; saltfleet keeps each "
            "deployment's secrets readable by it alone through a POSIX ACL: mount that filesystem with ACLs"
        ) from None
    return True


def granted(path, uid):
    """True when ``path`` is missing or readable by root and user ``uid`` alone (:func:`readable_by`)."""
    try:
        st = os.lstat(path)
        current = os.getxattr(path, "system.posix_acl_access", follow_symlinks=False)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return current == _acl(uid, stat.S_ISDIR(st.st_mode)) and st.st_gid == 0


def read_users_file(path, limit):
    """
    Up to ``limit`` bytes of a file in a user's tree, which root reads without
    following a link there and without waiting: a FIFO, a device or anything
    but a plain file is an OSError, never a read that blocks root.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a plain file")
        return os.read(fd, limit)
    finally:
        os.close(fd)


def readable_by(path, uid):
    """
    Make root's file or directory ``path`` readable by root and user ``uid``
    alone (never by a group several users may share, nor by others): owner
    root, group nobody's, an ACL entry for the user. True when it changed
    anything; an error naming the path when its filesystem has no POSIX ACLs.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_uid not in _trusted_uids():
            raise _untrusted(path, path, f"is owned by uid {os.fstat(fd).st_uid}", None)
        return _grant(fd, uid, path)
    finally:
        os.close(fd)


def remove_root_tree(path, spare=()):
    """
    Remove a tree of root's (a deployment's state dir) after checking it is
    root's, but the entries named in ``spare`` (the manifest, so that a
    removal that fails half way is still known and done by the next try).
    A folder the user owns in it must be gone already (the user's to empty):
    root deletes nothing of theirs.
    """
    path = Path(path)
    if not os.path.lexists(path):
        return False
    check_trusted(path.parent)
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
        return True
    for entry in sorted(e for e in path.iterdir() if e.name not in spare):
        st = os.lstat(entry)
        if st.st_uid not in _trusted_uids():
            raise CommandExecutionError(f"{entry} is not root's; remove it as its owner first")
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(entry)
        else:
            os.unlink(entry)
    if not spare:
        os.rmdir(path)
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
