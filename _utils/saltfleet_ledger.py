"""
The master's record of deploys: the deploy ledger and the deploy lock of each
deployment, both under ``<cachedir>/saltfleet/`` (root's, 0700).

The ledger (``ledger.jsonl``) is append-only, one JSON object a line, each
line written whole under an exclusive ``flock`` of the file and synced; a line
torn by a crash is closed off by the next writer and skipped by readers. Lines:

- ``rollout``: a ``fleet.deploy`` or ``fleet.rollback``, in events sharing the
  runner's jid as ``id``: ``start`` (who, deployment, rev, planned batches),
  ``batch`` (one per batch, with the jid of the job sent to its hosts),
  ``host`` (one per host as its return arrives: batch, minion, outcome,
  release or reason) and ``end`` (outcome and every host's outcome). A
  rollout without its ``end`` was cut short (its runner died) unless it
  still holds the lock. Each of these lines is also fired on the master's
  event bus as it is written, tagged ``saltfleet/rollout/<id>/<event>`` with
  the line as data: what the fleet page follows live (through salt-api's
  ``/events``), and what a reactor may match.
- ``host``: one minion's return of a ``deployment.update_code`` or
  ``deployment.rollback`` job (recorded by the reactor through
  ``fleet.record``), with the job's user.
- ``unlock``: a deploy lock cleared or broken by ``fleet.unlock``.

``history`` folds the lines into one entry per rollout and per host-level job
(the returns of a rollout's own jobs show under the rollout, not twice).

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
"""

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path

import salt.loader.context
import salt.utils.event
from salt.exceptions import CommandExecutionError

__virtualname__ = "saltfleet_ledger"

log = logging.getLogger(__name__)

LEDGER = "ledger.jsonl"
# Rollout lines on the master's event bus: saltfleet/rollout/<id>/<event>.
EVENT_PREFIX = "saltfleet/rollout"
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


def now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def folder(opts):
    """``<cachedir>/saltfleet``, root's and private (the ledger names users and hosts)."""
    path = Path(opts["cachedir"]) / "saltfleet"
    for folder_ in (path, path / "locks"):
        if not folder_.is_dir():
            folder_.mkdir(mode=0o700, parents=True, exist_ok=True)
            folder_.chmod(0o700)
    return path


# ------------------------------------------------------------------ ledger


def append(opts, entry):
    """Append one entry (a dict) to the ledger: a whole line, under the ledger's lock, synced."""
    line = (json.dumps(entry, sort_keys=True, default=str) + "\n").encode()
    fd = os.open(folder(opts) / LEDGER, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            # A writer died mid-line: end that line so this one stays whole (readers skip the torn one).
            line = b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    return entry


def journal(opts, rid):
    """A function appending events of rollout ``rid`` (the runner's jid) to the ledger, and announcing each."""
    opts = dict(opts)
    return lambda event: announce(opts, append(opts, {"type": "rollout", "id": rid, "at": now(), **event}))


def announce(opts, entry):
    """
    Fire a rollout's ledger line on the master's event bus
    (``saltfleet/rollout/<id>/<event>``, the line as data); the line. The
    ledger is the record, the event a courtesy: with no master to tell (a
    runner run without one), or a bus that does not take it, nothing fails.
    """
    if opts.get("ipc_mode") != "tcp" and not (Path(opts.get("sock_dir") or "") / "master_event_pull.ipc").exists():
        return entry
    tag = f"{EVENT_PREFIX}/{entry.get('id')}/{entry.get('event')}"
    try:
        with salt.utils.event.get_master_event(opts, opts["sock_dir"], listen=False) as bus:
            if not bus.fire_event(dict(entry), tag):
                log.warning("saltfleet: the master's event bus did not take %s", tag)
    except Exception as exc:  # pylint: disable=broad-except
        log.warning("saltfleet: could not fire %s on the master's event bus: %s", tag, exc)
    return entry


def refused(opts, rid, kind, user, name, rev, why):
    """Record a rollout refused at its start (the lock was held)."""
    write = journal(opts, rid)
    write({"event": "start", "kind": kind, "user": user, "deployment": name, "rev": rev, "batches": []})
    write({"event": "end", "outcome": "refused", "summary": f"refused: {why}", "hosts": {}})


def read(opts):
    """Every whole entry of the ledger, oldest first."""
    path = folder(opts) / LEDGER
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return []
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = handle.read()
    finally:
        os.close(fd)
    entries = []
    for raw in data.splitlines():
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def host_entry(jid, minion, fun, fun_args, user, row):
    """A ``host`` ledger line for one minion's return of ``fun`` (name and rev read from its arguments)."""
    args = [a for a in fun_args or [] if not isinstance(a, dict)]
    named = next((a for a in fun_args or [] if isinstance(a, dict)), {})
    name = named.get("name", args[0] if args else None)
    rev = named.get("rev", named.get("release", args[1] if len(args) > 1 else None))
    if fun == "deployment.rollback" and rev is None:
        rev = "the release before the serving one"
    return {
        "type": "host",
        "jid": str(jid),
        "minion": minion,
        "fun": fun,
        "user": user,
        "at": now(),
        "deployment": name,
        "rev": None if rev is None else str(rev),
        **row,
    }


def running(opts, entries, deployment=None):
    """The ids of the rollouts (of ``deployment``, or any) in ``entries`` that still hold their deploy lock."""
    names = {e.get("deployment") for e in entries if e.get("type") == "rollout" and e.get("event") == "start"}
    ids = set()
    for name in names if deployment is None else names & {deployment}:
        info = inspect(opts, name)
        if info["state"] == "held":
            ids.add((info["record"] or {}).get("jid"))
    return ids


def view(opts, deployment=None, limit=20):
    """``history`` of the ledger, the last ``limit`` entries (0: all); a rollout still holding its lock is running."""
    entries = read(opts)
    items = history(entries, deployment, running(opts, entries, deployment))
    return items[-int(limit) :] if limit else items


def _host_line(entry):
    keys = ("outcome", "release", "reason")
    return {k: entry[k] for k in keys if entry.get(k) is not None}


def history(entries, deployment=None, running=()):
    """
    The ledger folded into one entry per rollout and per host-level job,
    oldest first. ``running``: ids of rollouts that still hold their lock.
    """
    rollouts, jobs, order = {}, {}, []
    for entry in entries:
        kind = entry.get("type")
        if kind == "rollout":
            rid = entry.get("id")
            if rid not in rollouts:
                rollouts[rid] = {"events": []}
                order.append(("rollout", rid))
            rollouts[rid]["events"].append(entry)
        elif kind == "host":
            jid = entry.get("jid")
            if jid not in jobs:
                jobs[jid] = []
                order.append(("job", jid))
            jobs[jid].append(entry)
        elif kind == "unlock":
            order.append(("unlock", entry))
    claimed = {e.get("jid") for r in rollouts.values() for e in r["events"] if e.get("event") == "batch"}
    out = []
    for kind, key in order:
        if kind == "rollout":
            item = _rollout(key, rollouts[key]["events"], jobs, key in running)
        elif kind == "job":
            if key in claimed:
                continue
            item = _job(key, jobs[key])
        else:
            item = {
                "when": key.get("at"),
                "who": key.get("user"),
                "what": "fleet.unlock",
                "deployment": key.get("deployment"),
                "outcome": key.get("outcome"),
                "holder": key.get("holder"),
            }
        if deployment is None or item.get("deployment") == deployment:
            out.append(item)
    return out


def _rollout(rid, events, jobs, running):
    start = next((e for e in events if e.get("event") == "start"), events[0])
    end = next((e for e in reversed(events) if e.get("event") == "end"), None)
    item = {
        "when": start.get("at"),
        "who": start.get("user"),
        "what": start.get("kind"),
        "deployment": start.get("deployment"),
        "rev": start.get("rev"),
        "jid": rid,
    }
    if end is not None:
        item.update(finished=end.get("at"), outcome=end.get("summary") or end.get("outcome"), hosts=end.get("hosts"))
        return item
    # Its runner died (or still runs): what its hosts returned is what is known.
    hosts = {}
    for batch in (e for e in events if e.get("event") == "batch"):
        for minion in batch.get("hosts") or []:
            hosts[minion] = {"outcome": "sent, no return recorded"}
        for line in jobs.get(batch.get("jid"), []):
            hosts[line.get("minion")] = _host_line(line)
    serving = start.get("serving") or {}
    for minion in (m for batch in start.get("batches") or [] for m in batch):
        hosts.setdefault(minion, {"outcome": "not touched", "release": serving.get(minion)})
    item["outcome"] = "running" if running else "interrupted: its runner stopped before the end"
    item["hosts"] = hosts
    return item


def _job(jid, lines):
    first = lines[0]
    return {
        "when": first.get("at"),
        "who": first.get("user"),
        "what": first.get("fun"),
        "deployment": first.get("deployment"),
        "rev": first.get("rev"),
        "jid": jid,
        "outcome": ", ".join(f"{n} {o}" for o, n in sorted(_count(line.get("outcome") for line in lines).items())),
        "hosts": {line.get("minion"): _host_line(line) for line in lines},
    }


def _count(values):
    counts = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


# -------------------------------------------------------------------- lock


def _paths(opts, name):
    # The name becomes a file name: nothing that leaves the locks folder (the schema's own rules are stricter).
    if not isinstance(name, str) or not name or name.startswith(".") or "/" in name or "\0" in name:
        raise CommandExecutionError(f"{name!r} is not a deployment name")
    base = folder(opts) / "locks"
    return base / f"{name}.lock", base / f"{name}.json"


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
        # Resolved now, inside the loader's context: the methods may run outside it.
        self._read = _utils("saltfleet_files.read_json")
        self._write = _utils("saltfleet_files.write_json")
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
            "since": now(),
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


def job_user(opts, jid):
    """
    Who published job ``jid``, from the master's job cache; ``None`` when the
    master never published it (a return claiming an unknown job).
    """
    import salt.loader

    returners = salt.loader.returners(opts, {})
    load = returners[f"{opts['master_job_cache']}.get_load"](jid) or {}
    return load.get("user") or ("UNKNOWN" if load else None)


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
    append(
        opts, {"type": "unlock", "at": now(), "user": user, "deployment": name, "holder": record, "outcome": outcome}
    )
    return {"result": True, "state": state, "holder": record, "comment": f"deployment {name}: {outcome}"}
