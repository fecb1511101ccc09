"""
Autosign tickets: how the master admits the key of a host that bootstrapped
itself (``bootstrap: cloud-init``), once, and only under the minion id
salt-cloud created it with. The whole exchange is described in
saltfleet_cloud's docstring; this file keeps the ticket index
(``<pki_dir>/saltfleet_autosign_tickets.json``, 0600, changed only under its
``flock``), records, revokes and prunes tickets, and decides each pending key
(``fleet.admit``).
"""

import contextlib
import copy
import fnmatch
import logging
import time
from pathlib import Path

import salt.key
import salt.loader.context
from salt.exceptions import CommandExecutionError, SaltCloudConfigError, SaltCloudSystemExit

log = logging.getLogger(__name__)

__virtualname__ = "saltfleet_tickets"

TICKET_INDEX = "saltfleet_autosign_tickets.json"
AUTH_TAG = "salt/auth"
DEFAULT_TICKET_TTL = 1800
TICKET_LOCK_TIMEOUT = 60


def __virtual__():
    return __virtualname__


def _utils(name):
    # As in saltfleet_cloud: the utils loader in context.
    loader = salt.loader.context.loader_ctxvar.get()
    return loader.pack.get("__utils__", loader)[name]


def check_autosign_ready(opts, name):
    """Raise a clear error (before anything is launched) unless the master hands new keys to ``fleet.admit``."""
    missing = []
    if opts.get("auth_events", True) is not True:
        missing.append("auth_events: True")
    if "pend" not in (opts.get("auth_events_autosign_grains") or []):
        missing.append("auth_events_autosign_grains: [pend]")
    reactors = [tag for entry in opts.get("reactor") or [] if isinstance(entry, dict) for tag in entry]
    if not any(fnmatch.fnmatch(AUTH_TAG, tag) for tag in reactors):
        missing.append(f"a reactor on {AUTH_TAG} running etc/reactor/saltfleet_autosign.sls")
    if missing:
        raise SaltCloudConfigError(
            f"{name}: bootstrap: cloud-init needs the master to pass a new minion's key to saltfleet's "
            f"ticket check (fleet.admit), and its config lacks {'; '.join(missing)}; "
            "drop etc/master.d/saltfleet.conf into /etc/salt/master.d/ (or copy those settings) and restart the master"
        )


def _index(opts):
    return Path(opts["pki_dir"]) / TICKET_INDEX


@contextlib.contextmanager
def _tickets_locked(opts, create=True):
    """The ticket index as a dict, read, changed and written back under its ``flock``; ``None`` if there is none.

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


def _drop_expired(tickets):
    now = time.time()
    gone = [iid for iid, ticket in tickets.items() if ticket.get("expires", 0) < now]
    for iid in gone:
        del tickets[iid]
    return gone


def record_autosign_ticket(opts, minion_id, instance_id, ttl=None):
    """Let the master accept one key of ``minion_id`` presenting grain ``saltfleet_instance_id: <instance_id>``.

    Call it right after the cloud API returned the instance id, before the host
    boots. The ticket expires after ``ttl`` seconds (the profile's
    ``autosign_ticket_ttl``; None: 30 minutes).
    """
    check_autosign_ready(opts, minion_id)
    ttl = DEFAULT_TICKET_TTL if ttl is None else int(ttl)
    with _tickets_locked(opts) as tickets:
        _drop_expired(tickets)
        tickets[instance_id] = {"name": minion_id, "expires": time.time() + ttl}
    log.info("master will accept one key of minion %s from instance %s for %ss", minion_id, instance_id, ttl)


def revoke_autosign_ticket(opts, instance_id=None, name=None):
    """Drop the tickets of an instance id and/or a minion id (destroy, failed create). Returns what was dropped."""
    with _tickets_locked(opts, create=False) as tickets:
        if tickets is None:
            return []
        gone = [iid for iid, t in tickets.items() if iid == instance_id or (name and t.get("name") == name)]
        for iid in gone:
            del tickets[iid]
        return gone


def prune_autosign_tickets(opts):
    """Drop expired tickets (every driver does on create and list). Returns the instance ids dropped."""
    with _tickets_locked(opts, create=False) as tickets:
        return [] if tickets is None else _drop_expired(tickets)


def autosign_tickets(opts):
    """The open and used tickets: ``{instance_id: {"name": minion id, "expires": epoch, "used": epoch}}``."""
    with _tickets_locked(opts, create=False) as tickets:
        return {} if tickets is None else copy.deepcopy(tickets)


def admit(opts, minion_id, instance_id, pub):
    """Accept the pending key of ``minion_id`` if salt-cloud's ticket for ``instance_id`` names it; once.

    Called by ``fleet.admit`` from the ``salt/auth`` reactor with the pend event's
    ``id``, grain ``saltfleet_instance_id`` and ``pub``. Returns
    ``{"minion_id", "instance_id", "result", "reason"}`` where result is

    ``accepted``
        the ticket names this minion id, was not used yet, and the pending key
        is the event's: the key is accepted and the ticket marked used;
    ``rejected``
        the ticket names another minion id: this key claims an instance that is
        not its own, so it is rejected (``salt-key -d <id>`` forgets it);
    ``pending``
        anything else (no open ticket, a used one, a key that changed): the key
        stays pending for the operator.
    """
    keys = salt.key.get_key(opts)

    def pending_is_events():
        key = keys.cache.fetch("keys", minion_id) or {}
        return key.get("state") == "pending" and str(key.get("pub", "")).strip() == str(pub or "").strip()

    def decide(tickets):
        if not isinstance(instance_id, str) or not isinstance(minion_id, str):
            return "pending", "the event carries no instance id and minion id as strings"
        _drop_expired(tickets)
        ticket = tickets.get(instance_id)
        if ticket is None:
            return "pending", (
                f"no open ticket for instance {instance_id} (expired, revoked or not launched by this master's "
                f"salt-cloud); `salt-key -a {minion_id}` if you know the host"
            )
        if ticket.get("name") != minion_id:
            if pending_is_events():
                keys.change_state(keys.PEND, keys.REJ, match_dict={keys.PEND: [minion_id]})
                return (
                    "rejected",
                    f"instance {instance_id} was launched as minion {ticket.get('name')}, not {minion_id}",
                )
            return "pending", f"instance {instance_id} is not {minion_id}'s, and its key is no longer the one pending"
        if ticket.get("used"):
            used = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ticket["used"]))
            return "pending", f"the ticket of instance {instance_id} was used at {used}; it admits one key"
        if not pending_is_events():
            return "pending", f"the key pending for {minion_id} is not the one that authenticated"
        keys.change_state(keys.PEND, keys.ACC, match_dict={keys.PEND: [minion_id]})
        if (keys.cache.fetch("keys", minion_id) or {}).get("state") != "accepted":
            return "pending", f"Salt did not accept the key pending for {minion_id} (not a valid public key?)"
        ticket["used"] = time.time()
        return "accepted", f"instance {instance_id} was launched as minion {minion_id}"

    with _tickets_locked(opts, create=False) as tickets:
        result, reason = ("pending", "no autosign tickets on this master") if tickets is None else decide(tickets)
    level = logging.WARNING if result == "rejected" else logging.INFO
    log.log(level, "fleet.admit: %s key of minion %s (instance %s): %s", result, minion_id, instance_id, reason)
    return {"minion_id": minion_id, "instance_id": instance_id, "result": result, "reason": reason}
