"""
What minions wrote, read as the master reads network input: the one place
the fleet runner parses minion-written data.

A minion writes its grains (``saltfleet_deployments``, ``saltfleet_cloud``,
``ipv4``), its mine (``deployment.status``, ``saltfleet.heartbeat``) and its
job returns (``deployment.status``, ``deployment.releases``) itself: a
minion with a bug, or one that was broken into, writes anything there. Each
value is checked here for its exact type and bounds; what fails is left out
and named, so one host's bad data makes one row marked ``bad data``, never an
exception for the fleet, and never a number, a name or a count the runners
act on.

A problem reads ``<bank> <key>: <where>: <what is wrong>``:
``mine saltfleet.heartbeat: 'inf' is not a finite number of seconds``,
``grains saltfleet_deployments: fetcher: release: a list, not a string``.
"""

import math
import re
from dataclasses import dataclass, field

import salt.loader.context

__virtualname__ = "saltfleet_minion_data"

HEARTBEAT = "saltfleet.heartbeat"
STATUS = "deployment.status"
# A heartbeat longer than a day is no heartbeat.
HEARTBEAT_MAX = 86400
TEXT_MAX = 500
NAME_MAX = 200
ID_MAX = 255
# Entries of one mapping or list: deployments of a host, programs of a deployment, workers, queues, releases.
ENTRIES_MAX = 1000
COUNT_MAX = 1_000_000
SHA_RE = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
# How much of a bad value a problem quotes.
QUOTE_MAX = 40


def __virtual__():
    return __virtualname__


def _utils(name):
    # Salt's utils loader packs no __utils__ into utils modules: the loader in context holds them.
    loader = salt.loader.context.loader_ctxvar.get()
    return loader.pack.get("__utils__", loader)[name]


class Bad(ValueError):
    """A value a minion wrote that is not what saltfleet writes there; the message says where and why."""


# ------------------------------------------------------------------ checks


def quote(value):
    """A bad value as a problem shows it: its repr, cut short."""
    try:
        text = repr(value)
    except Exception:  # pylint: disable=broad-except
        text = f"<{type(value).__name__}>"
    return text if len(text) <= QUOTE_MAX else text[: QUOTE_MAX - 3] + "..."


def _kind(value):
    for kind, name in ((bool, "a boolean"), (str, "a string"), (int, "a number"), (float, "a number")):
        if isinstance(value, kind):
            return name
    return {dict: "a mapping", list: "a list", tuple: "a list"}.get(type(value), f"a {type(value).__name__}")


def _at(where, key):
    return f"{where}: {key}" if where else str(key)


def text(value, where, limit=TEXT_MAX, optional=True):
    """A string of at most ``limit`` characters on one line (None when ``optional`` and absent)."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise Bad(f"{where}: {_kind(value)}, not a string")
    if len(value) > limit:
        raise Bad(f"{where}: {len(value)} characters (at most {limit})")
    if CONTROL_RE.search(value):
        raise Bad(f"{where}: {quote(value)} holds a line break or control character")
    return value


def name(value, where):
    """A deployment name, as the pillar schema allows them."""
    errors = []
    if not _utils("saltfleet_schema.check_name")(where, value, errors):
        raise Bad(f"{where}: {quote(value)} is not a deployment name")
    return value


def sha(value, where):
    """A release: a commit's full SHA, or None."""
    if value is None:
        return None
    if not isinstance(value, str) or not SHA_RE.match(value):
        raise Bad(f"{where}: {quote(value)} is not a commit SHA")
    return value


def count(value, where, optional=True):
    """A count: an int from 0 to COUNT_MAX (never a bool, a float or a string)."""
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= COUNT_MAX:
        raise Bad(f"{where}: {quote(value)} is not a count (0 to {COUNT_MAX})")
    return value


def seconds(value, where):
    """A heartbeat interval: a finite number of seconds (or a string of one) from 1 to HEARTBEAT_MAX."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)) or len(str(value)) > 32:
        raise Bad(f"{where}: {quote(value)} is not a number of seconds")
    try:
        number = float(value)
    except ValueError:
        raise Bad(f"{where}: {quote(value)} is not a number of seconds") from None
    if not math.isfinite(number):
        raise Bad(f"{where}: {quote(value)} is not a finite number of seconds")
    if not 1 <= number <= HEARTBEAT_MAX:
        raise Bad(f"{where}: {quote(value)} is not between 1 and {HEARTBEAT_MAX} seconds")
    return number


def mapping(value, where, most=ENTRIES_MAX, optional=True):
    """A dict of at most ``most`` entries ({} when ``optional`` and absent)."""
    if value is None and optional:
        return {}
    if not isinstance(value, dict):
        raise Bad(f"{where}: {_kind(value)}, not a mapping")
    if len(value) > most:
        raise Bad(f"{where}: {len(value)} entries (at most {most})")
    return value


def sequence(value, where, most=ENTRIES_MAX, optional=True):
    """A list of at most ``most`` items ([] when ``optional`` and absent)."""
    if value is None and optional:
        return []
    if not isinstance(value, (list, tuple)):
        raise Bad(f"{where}: {_kind(value)}, not a list")
    if len(value) > most:
        raise Bad(f"{where}: {len(value)} items (at most {most})")
    return list(value)


def _ip(value, where):
    import ipaddress

    checked = text(value, where, 64, optional=False)
    try:
        ipaddress.ip_address(checked)
    except ValueError:
        raise Bad(f"{where}: {quote(value)} is not an IP address") from None
    return checked


def _ips(value, where):
    return tuple(_ip(ip, _at(where, i)) for i, ip in enumerate(sequence(value, where, 64)))


# ------------------------------------------------------------------ shapes


@dataclass(frozen=True)
class Worker:
    """A Celery node of a deployment's serving generation, as the mine has it."""

    node: str
    queues: tuple[str, ...]
    active: int | None


@dataclass(frozen=True)
class Status:
    """One deployment's ``deployment.status`` row."""

    rev: str | None = None
    release: str | None = None
    supervisord: str | None = None
    programs: dict = field(default_factory=dict)
    running: int | None = None
    state: str | None = None
    summary: str | None = None
    held: dict = field(default_factory=dict)
    pinned: dict | None = None
    draining: tuple[int, ...] = ()
    draining_tasks: dict = field(default_factory=dict)
    workers: tuple[Worker, ...] = ()
    # What the deployment's workers said instead of answering (None: they answered, or it runs none).
    workers_error: str | None = None

    def as_row(self):
        """The row in the mine's shape, every value checked."""
        row = {
            "rev": self.rev,
            "release": self.release,
            "supervisord": self.supervisord,
            "programs": dict(self.programs),
            "running": self.running,
            "state": self.state,
            "summary": self.summary,
            "held": dict(self.held),
            "pinned": dict(self.pinned) if self.pinned else None,
            "draining": list(self.draining),
            "draining_tasks": dict(self.draining_tasks),
        }
        if self.workers_error is not None:
            row["workers"] = {"error": self.workers_error}
        elif self.workers:
            row["workers"] = {w.node: {"queues": list(w.queues), "active": w.active} for w in self.workers}
        return row


@dataclass(frozen=True)
class Known:
    """One deployment as the grains ``saltfleet_deployments`` show it."""

    rev: str | None = None
    release: str | None = None
    subject: str | None = None

    def as_dict(self):
        return {"rev": self.rev, "release": self.release, "subject": self.subject}


@dataclass(frozen=True)
class Cloud:
    """Where a host runs: the grains ``saltfleet_cloud`` (and ``saltfleet_instance_id``, ``ipv4``)."""

    provider: str | None = None
    instance_id: str | None = None
    region: str | None = None
    size: str | None = None
    public_ips: tuple[str, ...] = ()
    private_ips: tuple[str, ...] = ()
    ipv4: tuple[str, ...] = ()


@dataclass(frozen=True)
class Minion:
    """What the master's cache holds of one minion, checked; ``problems`` names what was left out."""

    id: str
    last_seen: float | None = None
    heartbeat: float | None = None
    cloud: Cloud = field(default_factory=Cloud)
    known: dict = field(default_factory=dict)
    status: dict = field(default_factory=dict)
    problems: tuple[str, ...] = ()
    # The grains as cached, when they are a mapping (fleet.ansible_inventory's grains=).
    grains: dict = field(default_factory=dict)

    @property
    def bad(self):
        return bool(self.problems)

    def deployments(self):
        """The names of the deployments this minion says it runs (grains or mine)."""
        return sorted({*self.known, *self.status})


# ------------------------------------------------------------------ readers


def _pin(value, where):
    pin = mapping(value, where, 8)
    if not pin:
        return None
    return {key: text(pin.get(key), _at(where, key), 256) for key in ("rev", "by", "at")}


def _workers(value, where):
    """(workers, error) of a row's ``workers``: {node: {queues, active}} or {"error": why}."""
    workers = mapping(value, where)
    if "error" in workers:
        return (), text(workers["error"], _at(where, "error"), optional=False)
    found = []
    for key, said in sorted(workers.items(), key=lambda item: str(item[0])):
        at = _at(where, quote(key))
        node = text(key, at, NAME_MAX, optional=False)
        worker = mapping(said, at, 8, optional=False)
        queues = sequence(worker.get("queues"), _at(at, "queues"))
        names = tuple(text(q, _at(at, f"queues: {i}"), NAME_MAX, optional=False) for i, q in enumerate(queues))
        found.append(Worker(node, names, count(worker.get("active"), _at(at, "active"))))
    return tuple(found), None


def _pid(value, where):
    """A process id as a key: an int, or its digits (a mine row's keys may come back as strings)."""
    if isinstance(value, str) and value.isdigit() and len(value) <= 10:
        value = int(value)
    return str(count(value, where, optional=False))


def _programs(value, where):
    programs = mapping(value, where)
    return {
        text(p, _at(where, quote(p)), NAME_MAX, optional=False): text(s, _at(where, p), 32, optional=False)
        for p, s in programs.items()
    }


def status(value, where):
    """One deployment's ``deployment.status`` row as a ``Status``; ``Bad`` naming the first bad value."""
    row = mapping(value, where, 64, optional=False)
    workers, error = _workers(row.get("workers"), _at(where, "workers"))
    draining = sequence(row.get("draining"), _at(where, "draining"))
    tasks = mapping(row.get("draining_tasks"), _at(where, "draining_tasks"))
    held = mapping(row.get("held"), _at(where, "held"))
    return Status(
        rev=text(row.get("rev"), _at(where, "rev"), 256),
        release=sha(row.get("release"), _at(where, "release")),
        supervisord=text(row.get("supervisord"), _at(where, "supervisord")),
        programs=_programs(row.get("programs"), _at(where, "programs")),
        running=count(row.get("running"), _at(where, "running")),
        state=text(row.get("state"), _at(where, "state"), 16),
        summary=text(row.get("summary"), _at(where, "summary"), TEXT_MAX * 4),
        held={
            text(p, _at(where, f"held: {quote(p)}"), NAME_MAX, optional=False): text(r, _at(where, f"held: {p}"))
            for p, r in held.items()
        },
        pinned=_pin(row.get("pinned"), _at(where, "pinned")),
        draining=tuple(count(pid, _at(where, f"draining: {i}"), optional=False) for i, pid in enumerate(draining)),
        draining_tasks={
            _pid(pid, _at(where, "draining_tasks")): count(n, _at(where, f"draining_tasks: {pid}"))
            for pid, n in tasks.items()
        },
        workers=workers,
        workers_error=error,
    )


def statuses(value, where):
    """
    ({deployment: Status}, [problems]) of a ``deployment.status`` mapping (the
    mine's, or a job's return): a deployment whose row is bad is left out and named.
    """
    found, problems = {}, []
    try:
        rows = mapping(value, where)
    except Bad as exc:
        return {}, [str(exc)]
    for key, row in rows.items():
        try:
            found[name(key, where)] = status(row, _at(where, key))
        except Bad as exc:
            problems.append(str(exc))
    return dict(sorted(found.items())), problems


def _known(value, where):
    facts = mapping(value, where, 16)
    return Known(
        rev=text(facts.get("rev"), _at(where, "rev"), 256),
        release=sha(facts.get("release"), _at(where, "release")),
        subject=text(facts.get("subject"), _at(where, "subject"), TEXT_MAX * 2),
    )


def _knowns(value, where):
    found, problems = {}, []
    try:
        rows = mapping(value, where)
    except Bad as exc:
        return {}, [str(exc)]
    for key, facts in rows.items():
        try:
            found[name(key, where)] = _known(facts, _at(where, key))
        except Bad as exc:
            problems.append(str(exc))
    return dict(sorted(found.items())), problems


def _cloud(grains, problems):
    where = "grains saltfleet_cloud"
    try:
        cloud = mapping(grains.get("saltfleet_cloud"), where, 32)
        facts = {key: text(cloud.get(key), _at(where, key), NAME_MAX) for key in ("provider", "region", "size")}
        instance = cloud.get("instance_id") or grains.get("saltfleet_instance_id")
        facts["instance_id"] = text(instance, _at(where, "instance_id"), NAME_MAX)
        public, private = (_ips(cloud.get(key), _at(where, key)) for key in ("public_ips", "private_ips"))
    except Bad as exc:
        problems.append(str(exc))
        facts, public, private = {}, (), ()
    try:
        ipv4 = _ips(grains.get("ipv4"), "grains ipv4")
    except Bad as exc:
        problems.append(str(exc))
        ipv4 = ()
    return Cloud(public_ips=public, private_ips=private, ipv4=ipv4, **facts)


def minion_id(value):
    """A minion id as the runners show it; ``Bad`` for one no table or log line can hold."""
    return text(value, "id", ID_MAX, optional=False)


def minion(cache, minion_id_):
    """
    What ``cache`` (Salt's minion data cache, or anything with its ``fetch``
    and ``updated``) holds of ``minion_id_``, checked: a ``Minion``.
    """
    problems = []
    try:
        minion_id(minion_id_)
    except Bad as exc:
        problems.append(str(exc))
    grains = cache.fetch("grains", minion_id_)
    mine = cache.fetch("mine", minion_id_)
    # When the master last heard from the minion: its mine (heartbeat) or its grains (pillar refresh).
    seen = [cache.updated(bank, minion_id_) for bank, data in (("mine", mine), ("grains", grains)) if data]
    seen = [t for t in seen if isinstance(t, (int, float)) and math.isfinite(t)]
    for bank, data in (("grains", grains), ("mine", mine)):
        if data is not None and not isinstance(data, dict):
            problems.append(f"{bank}: {_kind(data)}, not a mapping")
    grains = grains if isinstance(grains, dict) else {}
    mine = mine if isinstance(mine, dict) else {}
    try:
        heartbeat = seconds(mine.get(HEARTBEAT), f"mine {HEARTBEAT}")
    except Bad as exc:
        problems.append(str(exc))
        heartbeat = None
    known, bad_known = _knowns(grains.get("saltfleet_deployments"), "grains saltfleet_deployments")
    rows, bad_rows = statuses(mine.get(STATUS), f"mine {STATUS}")
    cloud = _cloud(grains, problems)
    return Minion(
        id=minion_id_,
        last_seen=max(seen) if seen else None,
        heartbeat=heartbeat,
        cloud=cloud,
        known=known,
        status=rows,
        problems=tuple([*problems, *bad_known, *bad_rows]),
        grains=grains,
    )


# ------------------------------------------------------- a syndic's rows

# What fleet.inventory says of a host.
ROW_STATUSES = ("up", "down", "bad data")


def _cell(value, where):
    """A deployment of an inventory row, as fleet.inventory_rows gives it."""
    facts = mapping(value, where, 16, optional=False)
    cell = {
        "rev": text(facts.get("rev"), _at(where, "rev"), 256),
        "release": sha(facts.get("release"), _at(where, "release")),
        "running": count(facts.get("running"), _at(where, "running")),
        "programs": count(facts.get("programs"), _at(where, "programs")),
        "supervisord": text(facts.get("supervisord"), _at(where, "supervisord")),
    }
    workers, error = _workers(facts.get("workers"), _at(where, "workers"))
    if error is not None:
        cell["workers"] = {"error": error}
    elif workers:
        cell["workers"] = {w.node: {"queues": list(w.queues), "active": w.active} for w in workers}
    pinned = _pin(facts.get("pinned"), _at(where, "pinned"))
    if pinned:
        cell["pinned"] = pinned
    return cell


def inventory_row(value, where):
    """
    A row of another master's ``fleet.inventory_rows`` (a syndic's, on a
    master of masters), checked field by field as the master's own rows are
    built: the row, or ``Bad`` naming the first value that is not one.
    """
    row = mapping(value, where, 16, optional=False)
    ident = minion_id(row.get("id"))
    at = _at(where, quote(ident))
    status_ = text(row.get("status"), _at(at, "status"), 16, optional=False)
    if status_ not in ROW_STATUSES:
        raise Bad(f"{_at(at, 'status')}: {quote(status_)} is none of {', '.join(ROW_STATUSES)}")
    checked = {"id": ident, "status": status_, "last_seen": text(row.get("last_seen"), _at(at, "last_seen"), 32)}
    for key in ("provider", "instance_id", "region", "size"):
        checked[key] = text(row.get(key), _at(at, key), NAME_MAX)
    for key in ("public_ips", "private_ips"):
        checked[key] = list(_ips(row.get(key), _at(at, key)))
    deployments = mapping(row.get("deployments"), _at(at, "deployments"), 64)
    checked["deployments"] = {
        name(key, _at(at, f"deployments: {quote(key)}")): _cell(facts, _at(at, f"deployments: {key}"))
        for key, facts in deployments.items()
    }
    bad = sequence(row.get("bad_data"), _at(at, "bad_data"), 64)
    if bad:
        checked["bad_data"] = [text(b, _at(at, f"bad_data: {i}"), TEXT_MAX * 2) for i, b in enumerate(bad)]
    return checked


# ------------------------------------------------------------ job returns


@dataclass(frozen=True)
class Release:
    """One row of a host's ``deployment.releases`` answer."""

    release: str
    complete: bool
    serving: bool
    deployed: str


def releases(value, where):
    """A host's ``deployment.releases`` answer as ``Release`` rows; ``Bad`` naming the first bad value."""
    found = []
    for i, said in enumerate(sequence(value, where, optional=False)):
        at = _at(where, i)
        row = mapping(said, at, 16, optional=False)
        for flag in ("complete", "serving"):
            if not isinstance(row.get(flag, False), bool):
                raise Bad(f"{_at(at, flag)}: {quote(row.get(flag))} is not true or false")
        release = sha(row.get("release"), _at(at, "release"))
        if release is None:
            raise Bad(f"{_at(at, 'release')}: missing")
        deployed = text(row.get("deployed"), _at(at, "deployed"), 64) or ""
        found.append(Release(release, row.get("complete", False), row.get("serving", False), deployed))
    return found
