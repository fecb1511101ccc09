"""
The deploy lock of deployment ``name`` is an ``flock`` on ``locks/<name>.lock``
plus a record of its holder in ``locks/<name>.json`` (user, command, pid,
host, since). The kernel drops the ``flock`` when its holder dies, so a
killed runner never blocks the next deploy: what it leaves is a *stale*
record, which the next deploy replaces (and says so) and ``fleet.unlock``
shows and clears. A lock whose ``flock`` is still held though the recorded
holder process is gone (a process it forked kept the file open) is stale too,
and ``fleet.unlock`` breaks it. Breaking a live holder's lock needs
``force=True``: the lock file is unlinked, so the next deploy takes a new one,
and the old holder, which checks its lock before each batch, stops there.

An operator's word to the rollout holding the lock (``fleet.promote``,
``fleet.abort``) is a verdict in ``locks/<name>.verdict``, naming the
holder's token: the holder takes it (``told``) at its next look, between
batches, windows of an analysis and while it pauses; a verdict meant for
an earlier holder counts for nothing.
"""

import contextlib
import errno
import fcntl
import os
import socket
import time
import uuid
from pathlib import Path

import salt.loader.context
from salt.exceptions import CommandExecutionError

__virtualname__ = "saltfleet_deploylock"

# A busy lock whose holder left no record yet (it is writing it): how long to look again before refusing.
RECORD_GRACE = 2.0


def __virtual__():
    return __virtualname__


def _utils(name):
    # Salt's utils loader packs no __utils__ into utils modules: the loader in context holds them.
    loader = salt.loader.context.loader_ctxvar.get()
    return loader.pack.get("__utils__", loader)[name]


class DeployLocked(CommandExecutionError):
    """Another rollout of the deployment holds its deploy lock."""


class LockBroken(CommandExecutionError):
    """The deploy lock this rollout held was broken by ``fleet.unlock force=True``."""


def _paths(opts, name):
    # The name becomes a file name: nothing that leaves the locks folder (the schema's own rules are stricter).
    if not isinstance(name, str) or not name or name.startswith(".") or "/" in name or "\0" in name:
        raise CommandExecutionError(f"{name!r} is not a deployment name")
    base = _utils("saltfleet_ledger.folder")(opts) / "locks"
    return base / f"{name}.lock", base / f"{name}.json"


def _verdict_path(opts, name):
    return _paths(opts, name)[0].with_suffix(".verdict")


VERDICTS = ("promote", "abort")


def tell(opts, name, verdict, user):
    """
    Leave ``verdict`` (promote or abort) for the rollout of ``name`` that
    holds the lock; its record. CommandExecutionError when no rollout of
    ``name`` runs.
    """
    if verdict not in VERDICTS:
        raise CommandExecutionError(f"{verdict!r} is no verdict: {' or '.join(VERDICTS)}")
    info = inspect(opts, name)
    if info["state"] != "held":
        raise CommandExecutionError(
            f"no rollout of {name} is running (its deploy lock is {info['state']}); `salt-run fleet.history {name}` "
            "shows the last one"
        )
    token = (info["record"] or {}).get("token")
    if not token:
        raise CommandExecutionError(f"the rollout of {name} is starting (it left no record yet); ask again")
    record = {"verdict": verdict, "user": user, "at": _utils("saltfleet_ledger.now")(), "token": token}
    _utils("saltfleet_files.write_json")(_verdict_path(opts, name), record, 0o600)
    return {**record, "holder": info["record"]}


def _alive(pid):
    """True when ``pid`` runs on this host and is no zombie."""
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[:1] != ["Z"]


def describe(record):
    """Who holds (or held) a lock, in words."""
    if not record:
        return "another fleet command (it left no record yet)"
    return (
        f"{record.get('user')} ({record.get('command')}, pid {record.get('pid')} on {record.get('host')}) "
        f"since {record.get('since')}"
    )


def inspect(opts, name):
    """
    The deploy lock of ``name``: ``state`` is ``free``, ``held`` (a live
    holder), ``stale`` (a record left by a holder that died, with the lock
    free or still held by a process it left behind); ``record`` the holder's.
    """
    lock, rec = _paths(opts, name)
    record = _utils("saltfleet_files.read_json")(rec, None)
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return {"state": "stale" if record else "free", "record": record, "locked": False}
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = False
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            locked = True
    finally:
        os.close(fd)
    if not locked:
        state = "stale" if record else "free"
    elif record and record.get("host") == socket.gethostname() and not _alive(record.get("pid")):
        state = "stale"
    else:
        state = "held"
    return {"state": state, "record": record, "locked": locked}


class DeployLock:
    """The deploy lock of one deployment, held by this process (see the module's docstring)."""

    describe = staticmethod(describe)

    def __init__(self, opts, name):
        self.name = name
        self.lock, self.rec = _paths(opts, name)
        self.verdict = _verdict_path(opts, name)
        # Resolved now, inside the loader's context: the methods may run outside it.
        self._read = _utils("saltfleet_files.read_json")
        self._write = _utils("saltfleet_files.write_json")
        self._now = _utils("saltfleet_ledger.now")
        self.fd = None
        self.record = None
        self.replaced = None

    def acquire(self, user, command, wait=0, jid=None, poll=0.5):
        """Take the lock, waiting up to ``wait`` seconds; ``DeployLocked`` naming the holder otherwise."""
        deadline = time.monotonic() + max(0.0, float(wait or 0))
        busy_since = None
        while True:
            fd = os.open(self.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                holder = self._read(self.rec, None)
                busy_since = busy_since or time.monotonic()
                if time.monotonic() >= deadline and (holder or time.monotonic() - busy_since >= RECORD_GRACE):
                    raise DeployLocked(self._refusal(holder, wait)) from None
                time.sleep(poll)
                continue
            if not self._still_mine(fd):
                # fleet.unlock removed this file between our open and flock: take the new one.
                os.close(fd)
                continue
            self.fd = fd
            break
        self.replaced = self._read(self.rec, None)
        self.record = {
            "deployment": self.name,
            "user": user,
            "command": command,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": self._now(),
            "jid": jid,
            "token": uuid.uuid4().hex,
        }
        self._write(self.rec, self.record, 0o600)
        return self.record

    def _refusal(self, holder, wait):
        waited = f" after waiting {wait} s" if wait else ""
        return (
            f"deployment {self.name} is being deployed by {describe(holder)}{waited}; let it finish, "
            f"pass lock_wait=SECONDS to wait for it, or see `salt-run fleet.unlock {self.name}`"
        )

    def _still_mine(self, fd):
        try:
            return os.stat(self.lock, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def check(self):
        """Raise ``LockBroken`` when ``fleet.unlock force=True`` took the lock away from this holder."""
        if self.fd is None or self._still_mine(self.fd):
            return
        raise LockBroken(
            f"the deploy lock of {self.name} was broken (`salt-run fleet.unlock {self.name} force=True`); "
            "stopping before the next batch"
        )

    def told(self):
        """The operator's verdict for this holder ({verdict, user, at}), taken once; None when there is none."""
        # Taken by a rename before it is read: a verdict given meanwhile is a new file, left for the next look.
        taken = self.verdict.with_name(f"{self.verdict.name}.{uuid.uuid4().hex}")
        try:
            os.rename(self.verdict, taken)
        except FileNotFoundError:
            return None
        try:
            said = self._read(taken, None)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(taken)
        mine = isinstance(said, dict) and said.get("token") == (self.record or {}).get("token")
        return said if mine and said.get("verdict") in VERDICTS else None

    def release(self):
        if self.fd is None:
            return
        try:
            if self._still_mine(self.fd):
                record = self._read(self.rec, None)
                if record and record.get("token") == self.record["token"]:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.rec)
        finally:
            os.close(self.fd)
            self.fd = None


def lock(opts, name):
    """The deploy lock of deployment ``name`` (not taken yet: ``acquire``, then ``check`` and ``release``)."""
    return DeployLock(opts, name)


def unlock(opts, name, user, force=False):
    """
    Clear a stale deploy lock of ``name`` or, with ``force``, break a live
    one; returns {result, state, comment, holder} and records what it did in
    the ledger.
    """
    lock, rec = _paths(opts, name)
    info = inspect(opts, name)
    record, state = info["record"], info["state"]
    if state == "free":
        return {"result": True, "state": "free", "comment": f"deployment {name} is not locked"}
    if state == "held" and not force:
        return {
            "result": False,
            "state": "held",
            "holder": record,
            "comment": (
                f"deployment {name} is locked by {describe(record)}, which is running; "
                "pass force=True to break the lock (that rollout then stops before its next batch)"
            ),
        }
    with contextlib.suppress(FileNotFoundError):
        if info["locked"]:
            os.unlink(lock)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(rec)
    if state == "held":
        outcome = f"broken by force: the lock of {describe(record)}"
    elif info["locked"]:
        outcome = f"broken: the lock of {describe(record)}, whose process is gone"
    else:
        outcome = f"cleared: the record of {describe(record)}, whose runner died (its lock was already free)"
    entry = {"type": "unlock", "at": _utils("saltfleet_ledger.now")(), "user": user, "deployment": name}
    _utils("saltfleet_ledger.append")(opts, {**entry, "holder": record, "outcome": outcome})
    return {"result": True, "state": state, "holder": record, "comment": f"deployment {name}: {outcome}"}
