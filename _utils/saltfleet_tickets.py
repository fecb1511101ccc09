"""
Autosign tickets: how the master admits the key of a host that bootstrapped
itself (``bootstrap: cloud-init``), once, and only under the minion id
salt-cloud created it with. The whole exchange is described in
saltfleet_cloud_minion's docstring; this file keeps the ticket index
(``<pki_dir>/saltfleet_autosign_tickets.json``, 0600), records, revokes and
prunes tickets, and decides each key the master's ``salt/auth`` events
carry (``fleet.admit``).

The index is written only under its ``flock``, and the lock is held for
nothing but that write: no key changes state and no event leaves for the
master's bus while it is held, so however many authentications arrive at
once, salt-cloud's create records its ticket within moments (a create that
cannot record one terminates the instance it launched). Readers take the
index as it is on disk (it is replaced whole, never written in place).

A minion id salt-cloud is about to enrol is *reserved* from the moment its
ticket is recorded until its host's key is accepted or the ticket expires:

- a key the master already held under that id (pending or rejected) cannot
  be the new host's, whose key does not exist yet: it is set aside (rejected,
  its fingerprint written in the ticket), so the host's own key is not
  *denied* by Salt for arriving second;
- a key that comes pending under that id without presenting the ticket's
  instance is set aside the same way;
- the host's own key then finds the id rejected; Salt says so in a ``reject``
  auth event with the instance id, and ``fleet.admit`` accepts that key in
  place of the one it set aside (only one saltfleet set aside for this very
  ticket: a key the operator rejected stays rejected);
- a key that was pending before the ticket was issued is never accepted,
  whatever instance it presents, by the reactor or by hand.

Fingerprints are those ``salt-key -f <id>`` prints (SHA-256 of the key as the
master holds it); ``user_data.sh`` prints the host's own on its console.
"""

import contextlib
import copy
import dataclasses
import fnmatch
import logging
import time
from pathlib import Path

import salt.crypt
import salt.key
import salt.loader.context
import salt.utils.crypt
import salt.utils.event
import salt.utils.verify
from salt.exceptions import CommandExecutionError, SaltCacheError, SaltCloudConfigError, SaltCloudSystemExit

log = logging.getLogger(__name__)

__virtualname__ = "saltfleet_tickets"

TICKET_INDEX = "saltfleet_autosign_tickets.json"
AUTH_TAG = "salt/auth"
# The auth events whose autosign grains fleet.admit needs: a new key, and the host's
# own key meeting an id whose earlier key was set aside.
AUTH_EVENTS = ("pend", "reject")
DEFAULT_TICKET_TTL = 1800
TICKET_LOCK_TIMEOUT = 60
# A public key is under a kilobyte; anything much longer is not one.
MAX_PUB = 16384
KEY_ACTS = {"accepted": "accept", "rejected": "reject"}
# Where Salt's default key store (localfs_key) keeps a key of each state, under the pki dir.
KEY_DIRS = {"pending": "minions_pre", "rejected": "minions_rejected", "accepted": "minions"}


def __virtual__():
    return __virtualname__


def _utils(name):
    # The utils loader in context (see saltfleet_cloud).
    loader = salt.loader.context.loader_ctxvar.get()
    return loader.pack.get("__utils__", loader)[name]


# --- what the index, the event and the master's key store say -------------------------


@dataclasses.dataclass(frozen=True)
class Ticket:
    """One instance salt-cloud launched: the minion id its key may enrol as, once."""

    instance_id: str
    name: str
    issued: float
    expires: float
    used: float | None = None
    set_aside: tuple[str, ...] = ()

    @classmethod
    def parse(cls, instance_id, raw):
        """The ticket an index entry holds, or None for an entry of another shape (ignored)."""
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            return None
        numbers = [raw.get(key) for key in ("issued", "expires")]
        if not all(isinstance(n, int | float) and not isinstance(n, bool) for n in numbers):
            return None
        used = raw.get("used")
        set_aside = raw.get("set_aside", [])
        if used is not None and not isinstance(used, int | float):
            return None
        if not isinstance(set_aside, list) or not all(isinstance(f, str) for f in set_aside):
            return None
        return cls(instance_id, raw["name"], numbers[0], numbers[1], used, tuple(set_aside))

    def entry(self):
        """The index entry for this ticket."""
        entry = {"name": self.name, "issued": self.issued, "expires": self.expires}
        if self.used is not None:
            entry["used"] = self.used
        if self.set_aside:
            entry["set_aside"] = list(self.set_aside)
        return entry

    def open(self, now):
        return self.expires >= now


@dataclasses.dataclass(frozen=True)
class Claim:
    """What a ``salt/auth`` event (or the operator) says: this key wants to be this minion, of this instance."""

    minion_id: str
    instance_id: str | None
    pub: str
    finger: str
    act: str


@dataclasses.dataclass(frozen=True)
class Held:
    """The key the master holds under a minion id: its state, the key, and since when (epoch s, None: unknown)."""

    state: str
    pub: str
    finger: str
    since: float | None


@dataclasses.dataclass(frozen=True)
class Decision:
    """fleet.admit's answer, and what it does about it.

    ``action``: ``accept`` (the pending key), ``replace`` (accept the claim's key
    in place of one set aside), ``set_aside`` (reject the pending key and write
    it in ``ticket``'s record), ``reject`` (an impostor's pending key), or None.
    """

    result: str
    reason: str
    action: str | None = None
    ticket: str | None = None


def finger(pub, opts):
    """The fingerprint ``salt-key -f`` shows for a key the master holds as ``pub``."""
    return salt.utils.crypt.pem_finger(key=str(pub).strip().encode(), sum_type=opts.get("hash_type", "sha256"))


def _held(keys, opts, minion_id):
    """The key held under ``minion_id`` (accepted, pending or rejected), or None."""
    key = keys.cache.fetch("keys", minion_id)
    if not key or not isinstance(key.get("pub"), str):
        return None
    since = _since(keys, opts, minion_id, key["state"])
    return Held(key["state"], key["pub"].strip(), finger(key["pub"], opts), since)


def _since(keys, opts, minion_id, state):
    """When the master stored the key held under ``minion_id`` (epoch s), or None.

    Salt's key cache answers in whole seconds, so a host whose key came in the
    second of its launch would read as one that was there before: where the
    key store is Salt's default files (``localfs_key``), the key file's own
    mtime says it to the nanosecond.
    """
    if opts.get("keys.cache_driver", "localfs_key") == "localfs_key" and state in KEY_DIRS:
        path = Path(keys.pki_dir) / KEY_DIRS[state] / minion_id
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink():
                return path.stat().st_mtime
    return keys.cache.updated("keys", minion_id)


def _stamp(epoch):
    # To the millisecond: a key and a ticket of the same second must read in their order.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{int(epoch % 1 * 1000):03d}Z"


# --- the index ---------------------------------------------------------------------------


def _index(opts):
    return Path(opts["pki_dir"]) / TICKET_INDEX


def _tickets(opts):
    """The index as it is on disk, unlocked: ``{instance_id: Ticket}`` (malformed entries left out)."""
    raw = _utils("saltfleet_files.read_json")(_index(opts), {})
    if not isinstance(raw, dict):
        return {}
    parsed = {iid: Ticket.parse(iid, entry) for iid, entry in raw.items()}
    return {iid: ticket for iid, ticket in parsed.items() if ticket is not None}


@contextlib.contextmanager
def _tickets_locked(opts, create=True):
    """The index as a dict, read, changed and written back under its ``flock``; ``None`` if there is none.

    Hold it for the dict alone: never across a key change, an event or anything that waits on the network.
    The kernel drops the lock when its holder exits, so a killed salt-cloud never leaves a stale lock behind.
    """
    index = _index(opts)
    if not create and not index.exists():
        yield None
        return
    lock_path = index.with_name(f"{index.name}.lock")
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(
                _utils("saltfleet_files.lock")(lock_path, f"the autosign ticket index {index}", TICKET_LOCK_TIMEOUT)
            )
        except CommandExecutionError as exc:
            raise SaltCloudSystemExit(f"{exc} (`fuser {lock_path}` shows who holds it)") from None
        tickets = _utils("saltfleet_files.read_json")(index, {}) or {}
        before = copy.deepcopy(tickets)
        yield tickets
        if tickets != before:
            _utils("saltfleet_files.write_json")(index, tickets, 0o600)


def _update(opts, instance_id, change):
    """Replace the ticket of ``instance_id`` by ``change(ticket)`` under the lock; the new ticket, or None.

    ``change`` returns None to leave it as it is (the ticket is no longer what the caller decided on).
    """
    with _tickets_locked(opts, create=False) as tickets:
        current = Ticket.parse(instance_id, (tickets or {}).get(instance_id))
        changed = change(current) if current is not None else None
        if changed is not None:
            tickets[instance_id] = changed.entry()
        return changed


def _drop_expired(tickets):
    now = time.time()
    gone = [iid for iid, ticket in tickets.items() if Ticket.parse(iid, ticket) is None or ticket["expires"] < now]
    for iid in gone:
        del tickets[iid]
    return gone


def check_autosign_ready(opts, name):
    """Raise a clear error (before anything is launched) unless the master hands new keys to ``fleet.admit``."""
    missing = []
    if opts.get("auth_events", True) is not True:
        missing.append("auth_events: True")
    sent = opts.get("auth_events_autosign_grains") or []
    if not all(act in sent for act in AUTH_EVENTS):
        missing.append(f"auth_events_autosign_grains: [{', '.join(AUTH_EVENTS)}]")
    reactors = [tag for entry in opts.get("reactor") or [] if isinstance(entry, dict) for tag in entry]
    if not any(fnmatch.fnmatch(AUTH_TAG, tag) for tag in reactors):
        missing.append(f"a reactor on {AUTH_TAG} running etc/reactor/saltfleet_autosign.sls")
    if missing:
        raise SaltCloudConfigError(
            f"{name}: bootstrap: cloud-init needs the master to pass a new minion's key to saltfleet's "
            f"ticket check (fleet.admit), and its config lacks {'; '.join(missing)}; "
            "drop etc/master.d/saltfleet.conf into /etc/salt/master.d/ (or copy those settings) and restart the master"
        )


def record_autosign_ticket(opts, minion_id, instance_id, ttl=None):
    """Let the master accept one key of ``minion_id`` presenting grain ``saltfleet_instance_id: <instance_id>``.

    Call it right after the cloud API returned the instance id, before the host
    boots. The ticket expires after ``ttl`` seconds (the profile's
    ``autosign_ticket_ttl``; None: 30 minutes). A key the master already
    holds pending or rejected under ``minion_id`` is set aside (see the module
    docstring). Returns the ticket's index entry.
    """
    check_autosign_ready(opts, minion_id)
    ttl = DEFAULT_TICKET_TTL if ttl is None else int(ttl)
    now = time.time()
    ticket = Ticket(instance_id, minion_id, issued=now, expires=now + ttl)
    with _tickets_locked(opts) as tickets:
        _drop_expired(tickets)
        tickets[instance_id] = ticket.entry()
    log.info("master will accept one key of minion %r from instance %r for %ss", minion_id, instance_id, ttl)
    keys = salt.key.get_key(opts)
    held = _held(keys, opts, minion_id)
    if held is None or held.state not in ("pending", "rejected"):
        return ticket.entry()
    ticket = (
        _update(opts, instance_id, lambda t: dataclasses.replace(t, set_aside=(*t.set_aside, held.finger))) or ticket
    )
    if held.state == "pending":
        _set_state(keys, opts, minion_id, held.pub, "rejected", expect=held)
    log.warning(
        "minion %r had a %s key (fingerprint %s, since %s) before instance %r was launched: set aside, so "
        "the host's own key is not denied for it; `salt-key -f %r` lists the keys held under that id",
        minion_id,
        held.state,
        held.finger,
        _stamp(held.since) if held.since else "an unknown time",
        instance_id,
        minion_id,
    )
    return ticket.entry()


def revoke_autosign_ticket(opts, instance_id=None, name=None):
    """Drop the tickets of an instance id and/or a minion id (destroy, failed create). Returns what was dropped."""
    with _tickets_locked(opts, create=False) as tickets:
        if tickets is None:
            return []
        gone = [
            iid
            for iid, t in tickets.items()
            if iid == instance_id or (name and isinstance(t, dict) and t.get("name") == name)
        ]
        for iid in gone:
            del tickets[iid]
        return gone


def prune_autosign_tickets(opts):
    """Drop expired tickets (every driver does on create and list). Returns the instance ids dropped."""
    with _tickets_locked(opts, create=False) as tickets:
        return [] if tickets is None else _drop_expired(tickets)


def autosign_tickets(opts):
    """The open and used tickets: ``{instance_id: {"name", "issued", "expires", "used", "set_aside"}}``."""
    with _tickets_locked(opts, create=False) as tickets:
        return {} if tickets is None else copy.deepcopy(tickets)


# --- fleet.admit ----------------------------------------------------------------------------


def decide(claim, tickets, held, now):
    """What to do with the key of ``claim`` (a :class:`Claim`), given the open ``tickets`` and the ``held`` key.

    Pure: the caller reads the index and the key store, and carries the decision out.
    """
    tickets = {iid: t for iid, t in tickets.items() if t.open(now)}
    ticket = tickets.get(claim.instance_id) if claim.instance_id is not None else None
    if claim.act == "reject":
        return _decide_rejected(claim, ticket, held)
    events_key = held is not None and held.state == "pending" and held.pub == claim.pub
    who = f"minion {claim.minion_id!r}"
    if ticket is None:
        reserved = [t for t in tickets.values() if t.name == claim.minion_id and t.used is None]
        if not reserved:
            if claim.instance_id is None:
                return Decision("pending", f"the key of {who} presents no instance id, and no ticket names it")
            return Decision(
                "pending",
                f"no open ticket for instance {claim.instance_id!r} (expired, revoked or not launched by this "
                f"master's salt-cloud); compare `salt-key -f {claim.minion_id!r}` with the host's own "
                "fingerprint before you accept it",
            )
        if not events_key:
            return Decision("pending", f"the key pending for {who} is not the one that authenticated")
        presents = f"instance {claim.instance_id!r}" if claim.instance_id is not None else "no instance id"
        return Decision(
            "rejected",
            f"{who} is reserved for instance {reserved[0].instance_id!r} (launched {_stamp(reserved[0].issued)}) "
            f"until its host enrols, and this key presents {presents}: set aside",
            "set_aside",
            reserved[0].instance_id,
        )
    if ticket.name != claim.minion_id:
        if not events_key:
            return Decision(
                "pending",
                f"instance {claim.instance_id!r} is not {who}'s, and its key is no longer the one pending",
            )
        return Decision(
            "rejected", f"instance {claim.instance_id!r} was launched as minion {ticket.name!r}, not {who}", "reject"
        )
    if ticket.used is not None:
        return Decision(
            "pending",
            f"the ticket of instance {claim.instance_id!r} was used at {_stamp(ticket.used)}; it admits one key",
        )
    if not events_key:
        return Decision("pending", f"the key pending for {who} is not the one that authenticated")
    if held.since is None or held.since <= ticket.issued:
        since = _stamp(held.since) if held.since is not None else "a time Salt does not tell"
        return Decision(
            "rejected",
            f"the key pending for {who} (fingerprint {held.finger}) was there since {since}, before instance "
            f"{claim.instance_id!r} was launched ({_stamp(ticket.issued)}): not that host's; set aside",
            "set_aside",
            ticket.instance_id,
        )
    return Decision("accepted", f"instance {claim.instance_id!r} was launched as {who}", "accept", ticket.instance_id)


def _decide_rejected(claim, ticket, held):
    """Salt refused the key because the id's key is rejected: accept it if saltfleet set that one aside for it."""
    who = f"minion {claim.minion_id!r}"
    if ticket is None or ticket.name != claim.minion_id or ticket.used is not None:
        return Decision("rejected", f"the key held for {who} is rejected and no open ticket lets this one replace it")
    if held is None or held.state != "rejected":
        return Decision("pending", f"the key held for {who} is no longer rejected; its host asks again")
    if held.finger not in ticket.set_aside:
        return Decision(
            "rejected",
            f"the key held for {who} was rejected by hand, not set aside for instance {claim.instance_id!r}; "
            f"`salt-key -d {claim.minion_id!r}` lets its host enrol",
        )
    if claim.finger in ticket.set_aside:
        return Decision("rejected", f"this is the key set aside for {who} (fingerprint {claim.finger})")
    return Decision(
        "accepted",
        f"instance {claim.instance_id!r} was launched as {who}; the key set aside under that id "
        f"(fingerprint {held.finger}) was not its host's",
        "replace",
        ticket.instance_id,
    )


def _claim(opts, minion_id, instance_id, pub, act):
    """The event's values as a Claim, or the reason they are not one."""
    if not isinstance(minion_id, str) or not salt.utils.verify.valid_id(opts, minion_id):
        return f"the event carries no valid minion id ({minion_id!r})"
    if instance_id is not None and (not isinstance(instance_id, str) or not instance_id):
        return f"the event's instance id is not a string ({instance_id!r})"
    if not isinstance(pub, str) or not pub.strip() or len(pub) > MAX_PUB:
        return "the event carries no public key"
    if act not in AUTH_EVENTS:
        return f"act {act!r} is not one of {', '.join(AUTH_EVENTS)}"
    return Claim(minion_id, instance_id, pub.strip(), finger(pub, opts), act)


def _fire(opts, data):
    """Tell the master's bus that a key changed state, as ``salt-key`` does (``salt/key``); never raises."""
    try:
        with salt.utils.event.get_master_event(opts, opts["sock_dir"], listen=False) as event:
            event.fire_event(data, salt.utils.event.tagify(prefix="key"))
    except Exception as exc:  # a notification: the key has changed either way
        log.warning("could not fire salt/key for %r: %s", data.get("id"), exc)


def _set_state(keys, opts, minion_id, pub, state, expect):
    """Hold ``pub`` under ``minion_id`` as ``state`` if the master still holds ``expect`` there; True when it does.

    Outside the ticket lock: the key store and the event bus are the master's to answer.
    """
    current = _held(keys, opts, minion_id)
    if current is None or (current.state, current.pub) != (expect.state, expect.pub):
        return False
    if state == "accepted":
        try:
            salt.crypt.PublicKey.from_str(pub)
        except Exception:  # cryptography's own errors for a key it cannot parse
            return False
    try:
        keys.cache.store("keys", minion_id, {"pub": pub, "state": state})
    except SaltCacheError as exc:
        log.error("could not write the key of minion %r as %s: %s", minion_id, state, exc)
        return False
    _fire(opts, {"result": True, "act": KEY_ACTS[state], "id": minion_id, "pub": pub})
    done = _held(keys, opts, minion_id)
    return done is not None and (done.state, done.pub) == (state, pub)


def _use(opts, decision, minion_id):
    """Mark the decision's ticket used, if it still is the open, unused ticket of ``minion_id``; True when it was."""

    def use(ticket):
        if ticket.name != minion_id or ticket.used is not None or not ticket.open(time.time()):
            return None
        return dataclasses.replace(ticket, used=time.time())

    return _update(opts, decision.ticket, use) is not None


def _unuse(opts, decision):
    _update(opts, decision.ticket, lambda ticket: dataclasses.replace(ticket, used=None))


def _carry_out(opts, keys, claim, held, decision):
    """Do what ``decision`` says; the decision as it turned out (``pending`` when the key store moved meanwhile)."""
    who = f"minion {claim.minion_id!r}"
    if decision.action in ("accept", "replace"):
        if not _use(opts, decision, claim.minion_id):
            return Decision("pending", f"the ticket of instance {claim.instance_id!r} changed meanwhile; ask again")
        if not _set_state(keys, opts, claim.minion_id, claim.pub, "accepted", expect=held):
            _unuse(opts, decision)
            return Decision("pending", f"Salt did not accept the key of {who} (no longer there, or not a valid key)")
        return decision
    if decision.action == "set_aside":

        def record(ticket):
            return dataclasses.replace(ticket, set_aside=tuple(dict.fromkeys((*ticket.set_aside, held.finger))))

        if _update(opts, decision.ticket, record) is None:
            return Decision("pending", f"the ticket of instance {decision.ticket!r} is gone; the key of {who} stays")
    if decision.action in ("set_aside", "reject") and not _set_state(
        keys, opts, claim.minion_id, held.pub, "rejected", expect=held
    ):
        return Decision("pending", f"the key pending for {who} changed meanwhile")
    return decision


def admit(opts, minion_id, instance_id, pub, act="pend"):
    """Decide the key of ``minion_id`` from a ``salt/auth`` event against salt-cloud's tickets.

    Called by ``fleet.admit`` from the ``salt/auth`` reactor with the event's
    ``id``, grain ``saltfleet_instance_id`` (None when the key sent none),
    ``pub`` and ``act`` (``pend``: the key is pending; ``reject``: Salt refused
    it because the id's key is rejected). Returns ``{"minion_id",
    "instance_id", "finger", "result", "reason"}`` where result is

    ``accepted``
        the ticket of that instance names this minion id, is unused, and the
        key is the event's and came after the ticket (or replaces a key
        saltfleet set aside for this ticket): the key is accepted and the
        ticket used;
    ``rejected``
        the key is an impostor's (the instance was launched as another id),
        was pending before the ticket was issued, or claims an id reserved
        for another instance: it is rejected (set aside), or stays so;
    ``pending``
        anything else (no open ticket, a used one, a key that changed): the key
        stays pending for the operator.
    """
    claim = _claim(opts, minion_id, instance_id, pub, act)
    if isinstance(claim, str):
        return _report(minion_id, instance_id, "", Decision("pending", claim))
    tickets = _tickets(opts)
    now = time.time()
    if any(not t.open(now) for t in tickets.values()):
        prune_autosign_tickets(opts)
    keys = salt.key.get_key(opts)
    held = _held(keys, opts, claim.minion_id)
    decision = _carry_out(opts, keys, claim, held, decide(claim, tickets, held, now))
    return _report(claim.minion_id, claim.instance_id, claim.finger, decision)


def _report(minion_id, instance_id, key_finger, decision):
    level = logging.WARNING if decision.action in ("reject", "set_aside") else logging.INFO
    # Every value here came from an unauthenticated host: quoted, so no line of theirs reads as the master's.
    log.log(
        level,
        "fleet.admit: %s key of minion %r (instance %r, fingerprint %s): %s",
        decision.result,
        minion_id,
        instance_id,
        key_finger or "-",
        decision.reason,
    )
    return {
        "minion_id": minion_id,
        "instance_id": instance_id,
        "finger": key_finger,
        "result": decision.result,
        "reason": decision.reason,
    }
