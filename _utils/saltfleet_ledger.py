"""
The master's record of deploys: the deploy ledger, under
``<cachedir>/saltfleet/`` (root's, 0700); each deployment's deploy lock is
saltfleet_deploylock's, beside it.

The ledger (``ledger.jsonl``) is append-only, one JSON object a line, each
line written whole under an exclusive ``flock`` of the file and synced; a line
torn by a crash is closed off by the next writer and skipped by readers. Lines:

- ``rollout``: a ``fleet.deploy`` or ``fleet.rollback``, in events sharing the
  runner's jid as ``id``: ``start`` (who, deployment, rev, planned batches),
  ``batch`` (one per batch, with the jid of the job sent to its hosts),
  ``host`` (one per host as its return arrives: batch, minion, outcome,
  release or reason), ``analysis`` (each analyse step: the figures of the
  new and old releases, thresholds, decision and why), ``pause``,
  ``promote`` and ``abort`` (who), and ``end`` (outcome and every host's outcome). A
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
"""

import fcntl
import json
import logging
import os
import time
from pathlib import Path

import salt.loader.context
import salt.utils.event

__virtualname__ = "saltfleet_ledger"

log = logging.getLogger(__name__)

LEDGER = "ledger.jsonl"
# Rollout lines on the master's event bus: saltfleet/rollout/<id>/<event>.
EVENT_PREFIX = "saltfleet/rollout"


def __virtual__():
    return __virtualname__


def _utils(name):
    # Salt's utils loader packs no __utils__ into utils modules: the loader in context holds them.
    loader = salt.loader.context.loader_ctxvar.get()
    return loader.pack.get("__utils__", loader)[name]


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
    return read_counted(opts)[0]


def read_counted(opts):
    """(every whole, readable entry of the ledger, oldest first; how many lines were skipped)."""
    path = folder(opts) / LEDGER
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return [], 0
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = handle.read()
    finally:
        os.close(fd)
    entries, skipped = [], 0
    for raw in data.splitlines():
        if not raw.strip():
            continue
        try:
            entry = json.loads(raw)
        except ValueError:
            skipped += 1
            continue
        if readable(entry):
            entries.append(entry)
        else:
            skipped += 1
    return entries, skipped


# The fields history keys and folds by: each a string (or absent) in a line it can read.
KEYS = ("type", "id", "jid", "minion", "event", "deployment", "fun", "user", "rev", "at", "kind", "outcome")


def readable(entry):
    """Whether ``entry`` is a ledger line ``history`` can fold: a mapping whose keys it reads are strings."""
    if not isinstance(entry, dict):
        return False
    return all(entry.get(key) is None or isinstance(entry.get(key), str) for key in KEYS)


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
        "jid": _capped(jid, 32),
        "minion": _capped(minion, 255),
        "fun": _capped(fun, 64),
        "user": _capped(user, 256),
        "at": now(),
        "deployment": _capped(name, 64),
        "rev": None if rev is None else _capped(rev, 256),
        **{key: _capped(value, FIELD_MAX) for key, value in row.items() if key in ROW_KEYS},
    }


FIELD_MAX = 2000
# What a host line keeps of a return's outcome.
ROW_KEYS = ("outcome", "release", "reason")


def _capped(value, limit):
    """A field of a ledger line: a string of at most ``limit`` characters (or None)."""
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def running(opts, entries, deployment=None):
    """The ids of the rollouts (of ``deployment``, or any) in ``entries`` that still hold their deploy lock."""
    names = {e.get("deployment") for e in entries if e.get("type") == "rollout" and e.get("event") == "start"}
    ids = set()
    for name in names if deployment is None else names & {deployment}:
        info = _utils("saltfleet_deploylock.inspect")(opts, name)
        if info["state"] == "held":
            ids.add((info["record"] or {}).get("jid"))
    return ids


def view(opts, deployment=None, limit=20):
    """
    ``history`` of the ledger, the last ``limit`` entries (0: all); a rollout
    still holding its lock is running. Lines it cannot read are skipped, and
    counted in a last item (``skipped``).
    """
    entries, skipped = read_counted(opts)
    items = history(entries, deployment, running(opts, entries, deployment))
    items = items[-int(limit) :] if limit else items
    if skipped:
        lines = "1 line was" if skipped == 1 else f"{skipped} lines were"
        note = f"{lines} of the ledger unreadable and skipped"
        items.append({"what": "skipped", "skipped": skipped, "outcome": note})
    return items


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
    analyses = [_without(e, ("type", "id", "event")) for e in events if e.get("event") == "analysis"]
    if analyses:
        item["analysis"] = analyses
    said = [_without(e, ("type", "id")) for e in events if e.get("event") in ("pause", "promote", "abort")]
    if said:
        item["operator"] = said
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


def _without(entry, keys):
    return {k: v for k, v in entry.items() if k not in keys}


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


# ------------------------------------------------------------ the job cache


def job_load(opts, jid):
    """What the master's job cache holds of job ``jid`` (function, arguments, target, user, minions); {} if none."""
    import salt.loader

    if not isinstance(jid, str) or not jid.isdigit() or len(jid) > 32:
        return {}
    returners = salt.loader.returners(opts, {})
    load = returners[f"{opts['master_job_cache']}.get_load"](jid) or {}
    return load if isinstance(load, dict) else {}


def job_user(opts, jid):
    """
    Who published job ``jid``, from the master's job cache; ``None`` when the
    master never published it (a return claiming an unknown job).
    """
    load = job_load(opts, str(jid))
    return load.get("user") or ("UNKNOWN" if load else None)


def _plain(args):
    """Job arguments compared as the master sent them: Salt's ``__kwarg__`` marker aside."""
    if not isinstance(args, (list, tuple)):
        return None
    return [{k: v for k, v in a.items() if k != "__kwarg__"} if isinstance(a, dict) else a for a in args]


def return_matches(opts, load, minion, fun, fun_args):
    """
    Why a return of ``fun`` from ``minion`` does not belong to the job
    ``load`` (the master's record of what it sent), or None when it does: the
    same function, the same arguments, and a minion the job went to.
    """
    if load.get("fun") != fun:
        return f"the job ran {load.get('fun')!r}, not {fun}"
    if fun_args is not None and _plain(fun_args) != _plain(load.get("arg") or []):
        return "its arguments are not the job's"
    minions = load.get("Minions")
    if not isinstance(minions, list):
        import salt.utils.minions

        found = salt.utils.minions.CkMinions(opts).check_minions(load.get("tgt"), load.get("tgt_type", "glob"))
        minions = found["minions"]
    if minion not in minions:
        return "the job did not go to that minion"
    return None
