"""
Autosign tickets and fleet.admit's decisions (_utils/saltfleet_tickets.py),
against the master's real key store and ticket index under a temporary root;
no daemons (the master's event bus is the one part stood in: tests.support.cloud.Bus).

Every branch of ``admit``: what becomes of the key, of the ticket, and what
the master is told.
"""

import logging
import math
import multiprocessing
import os
import threading
import time

import pytest
from salt.exceptions import SaltCloudConfigError

from localfleet.config import saltfleet_utils
from tests.support.cloud import bus as event_bus
from tests.support.cloud import held_key, hold_key, master_opts, pub

tickets = saltfleet_utils().saltfleet_tickets


@pytest.fixture
def opts(tmp_path):
    return master_opts(tmp_path)


@pytest.fixture
def bus(monkeypatch):
    return event_bus(monkeypatch)


def ticket(opts, instance_id):
    return tickets.autosign_tickets(opts).get(instance_id)


def launched(opts, minion_id, instance_id, ttl=None):
    """What the create pipeline does once the cloud answered: the ticket. Returns its entry."""
    return tickets.record_autosign_ticket(opts, minion_id, instance_id, ttl)


def after(entry, seconds=5):
    """A moment after the ticket was issued (a key the booted host generated)."""
    return entry["issued"] + seconds


def finger(opts, public):
    return tickets.finger(public, opts)


# ------------------------------------------------------------------- accepted


def test_the_launched_host_s_key_is_accepted_once_and_the_master_told(opts, bus):
    entry = launched(opts, "w-1", "i-1")
    hold_key(opts, "w-1", pub(0), since=after(entry))
    ret = tickets.admit(opts, "w-1", "i-1", pub(0))
    assert (ret["result"], ret["finger"]) == ("accepted", finger(opts, pub(0)))
    assert held_key(opts, "w-1") == ("accepted", pub(0))
    assert ticket(opts, "i-1")["used"] >= entry["issued"]
    assert [(tag, data["act"], data["id"]) for tag, data in bus.events] == [("salt/key", "accept", "w-1")]


def test_a_key_that_came_in_the_second_of_the_launch_is_the_host_s(opts, bus):
    """Salt's key cache tells a key's time in whole seconds; a quick host's key comes in the launch's second."""
    entry = launched(opts, "w-1", "i-1")
    issued = entry["issued"]
    hold_key(opts, "w-1", pub(0), since=issued + (math.floor(issued) + 1 - issued) / 2)
    ret = tickets.admit(opts, "w-1", "i-1", pub(0))
    assert ret["result"] == "accepted", ret
    assert held_key(opts, "w-1") == ("accepted", pub(0))


def test_a_used_ticket_admits_no_second_key(opts, bus):
    entry = launched(opts, "w-1", "i-1")
    hold_key(opts, "w-1", pub(0), since=after(entry))
    tickets.admit(opts, "w-1", "i-1", pub(0))
    hold_key(opts, "w-1", pub(1), since=after(entry, 10))  # its key deleted, another one pending
    ret = tickets.admit(opts, "w-1", "i-1", pub(1))
    assert ret["result"] == "pending"
    assert "the ticket of instance 'i-1' was used at" in ret["reason"]
    assert held_key(opts, "w-1") == ("pending", pub(1))


def test_a_key_that_is_not_valid_stays_pending_and_leaves_the_ticket_unused(opts, bus):
    entry = launched(opts, "w-1", "i-1")
    garbage = "-----BEGIN PUBLIC KEY-----\nbm90IGEga2V5\n-----END PUBLIC KEY-----"
    hold_key(opts, "w-1", garbage, since=after(entry))
    ret = tickets.admit(opts, "w-1", "i-1", garbage)
    assert ret["result"] == "pending"
    assert "Salt did not accept the key of minion 'w-1'" in ret["reason"]
    assert held_key(opts, "w-1") == ("pending", garbage)
    assert "used" not in ticket(opts, "i-1")


# ------------------------------------------------------------------- rejected


def test_a_key_claiming_another_minion_s_instance_is_rejected_and_uses_nothing(opts, bus):
    entry = launched(opts, "w-1", "i-1")
    hold_key(opts, "impostor", pub(1), since=after(entry))
    ret = tickets.admit(opts, "impostor", "i-1", pub(1))
    assert ret["result"] == "rejected"
    assert "instance 'i-1' was launched as minion 'w-1', not minion 'impostor'" in ret["reason"]
    assert held_key(opts, "impostor") == ("rejected", pub(1))
    assert "used" not in ticket(opts, "i-1")
    assert [(data["act"], data["id"]) for _, data in bus.events] == [("reject", "impostor")]


def test_a_key_pending_before_the_ticket_was_issued_is_never_accepted(opts, bus):
    """A host that registered the id before salt-cloud launched it presents the instance id (it learnt it)."""
    entry = launched(opts, "w-1", "i-1")
    hold_key(opts, "w-1", pub(1), since=entry["issued"] - 30)
    ret = tickets.admit(opts, "w-1", "i-1", pub(1))
    assert ret["result"] == "rejected"
    assert "before instance 'i-1' was launched" in ret["reason"]
    assert held_key(opts, "w-1") == ("rejected", pub(1))
    assert ticket(opts, "i-1")["set_aside"] == [finger(opts, pub(1))]
    assert "used" not in ticket(opts, "i-1")


def test_a_key_claiming_a_reserved_id_without_its_instance_is_set_aside(opts, bus):
    entry = launched(opts, "w-1", "i-1")
    for n, (instance_id, shown) in enumerate([(None, "no instance id"), ("i-other", "instance 'i-other'")], 1):
        hold_key(opts, "w-1", pub(n), since=after(entry))
        ret = tickets.admit(opts, "w-1", instance_id, pub(n))
        assert ret["result"] == "rejected"
        assert "minion 'w-1' is reserved for instance 'i-1'" in ret["reason"]
        assert f"this key presents {shown}" in ret["reason"]
        assert held_key(opts, "w-1") == ("rejected", pub(n))
        salt_key_delete(opts, "w-1")
    assert ticket(opts, "i-1")["set_aside"] == [finger(opts, pub(1)), finger(opts, pub(2))]
    assert "used" not in ticket(opts, "i-1")


def salt_key_delete(opts, minion_id):
    import salt.key

    salt.key.get_key(opts).cache.flush("keys", minion_id)


# --------------------------------------------------------- a rejected id's key


def test_the_host_s_key_replaces_the_one_set_aside_for_its_ticket(opts, bus):
    hold_key(opts, "w-1", pub(1), since=time.time() - 60)  # a squatter, before the launch
    entry = launched(opts, "w-1", "i-1")
    assert held_key(opts, "w-1") == ("rejected", pub(1))
    assert entry["set_aside"] == [finger(opts, pub(1))]
    # The squatter asks again: still nothing.
    again = tickets.admit(opts, "w-1", "i-1", pub(1), act="reject")
    assert again["result"] == "rejected"
    assert "this is the key set aside for minion 'w-1'" in again["reason"]
    # The host boots: Salt refuses its key (the id's key is rejected) and says so with its instance id.
    ret = tickets.admit(opts, "w-1", "i-1", pub(0), act="reject")
    assert ret["result"] == "accepted"
    assert held_key(opts, "w-1") == ("accepted", pub(0))
    assert "used" in ticket(opts, "i-1")
    assert [(data["act"], data["id"]) for _, data in bus.events] == [("reject", "w-1"), ("accept", "w-1")]


def test_a_key_rejected_by_hand_is_not_replaced(opts, bus):
    entry = launched(opts, "w-1", "i-1")
    hold_key(opts, "w-1", pub(1), state="rejected", since=after(entry))  # the operator rejected it
    ret = tickets.admit(opts, "w-1", "i-1", pub(0), act="reject")
    assert ret["result"] == "rejected"
    assert "rejected by hand" in ret["reason"]
    assert held_key(opts, "w-1") == ("rejected", pub(1))
    assert "used" not in ticket(opts, "i-1")


def test_a_reject_event_for_a_key_no_longer_rejected_changes_nothing(opts, bus):
    entry = launched(opts, "w-1", "i-1")
    hold_key(opts, "w-1", pub(1), since=after(entry))  # deleted and pending again since Salt refused it
    ret = tickets.admit(opts, "w-1", "i-1", pub(0), act="reject")
    assert ret["result"] == "pending"
    assert "no longer rejected" in ret["reason"]
    assert held_key(opts, "w-1") == ("pending", pub(1))
    assert "used" not in ticket(opts, "i-1")


def test_a_rejected_id_with_no_open_ticket_stays_rejected(opts, bus):
    hold_key(opts, "w-1", pub(1), state="rejected")
    ret = tickets.admit(opts, "w-1", "i-nothing", pub(0), act="reject")
    assert ret["result"] == "rejected"
    assert held_key(opts, "w-1") == ("rejected", pub(1))
    assert bus.events == []


# ------------------------------------------------------------------- pending


def test_a_key_of_an_instance_without_an_open_ticket_stays_pending(opts, bus):
    hold_key(opts, "w-9", pub(0))
    ret = tickets.admit(opts, "w-9", "i-unknown", pub(0))
    assert ret["result"] == "pending"
    assert "no open ticket for instance 'i-unknown'" in ret["reason"]
    assert "salt-key -f 'w-9'" in ret["reason"]
    assert held_key(opts, "w-9") == ("pending", pub(0))
    assert bus.events == []


def test_a_key_without_instance_or_ticket_stays_pending(opts, bus):
    hold_key(opts, "w-9", pub(0))
    ret = tickets.admit(opts, "w-9", None, pub(0))
    assert ret["result"] == "pending"
    assert "presents no instance id, and no ticket names it" in ret["reason"]
    assert held_key(opts, "w-9") == ("pending", pub(0))


def test_an_expired_ticket_admits_nothing_and_is_dropped(opts, bus):
    launched(opts, "w-1", "i-1", ttl=-1)
    hold_key(opts, "w-1", pub(0), since=time.time() + 5)
    ret = tickets.admit(opts, "w-1", "i-1", pub(0))
    assert ret["result"] == "pending"
    assert "no open ticket for instance 'i-1'" in ret["reason"]
    assert held_key(opts, "w-1") == ("pending", pub(0))
    assert ticket(opts, "i-1") is None


def test_a_pending_key_other_than_the_event_s_is_left_alone(opts, bus):
    entry = launched(opts, "w-1", "i-1")
    hold_key(opts, "w-1", pub(0), since=after(entry))
    hold_key(opts, "intruder", pub(2), since=after(entry))
    for minion_id, instance_id in (("w-1", "i-1"), ("intruder", "i-1"), ("w-1", None)):
        ret = tickets.admit(opts, minion_id, instance_id, pub(1))  # an event whose key is not the pending one
        assert ret["result"] == "pending", ret
    assert held_key(opts, "w-1") == ("pending", pub(0))
    assert held_key(opts, "intruder") == ("pending", pub(2))
    assert "used" not in ticket(opts, "i-1")
    assert bus.events == []


@pytest.mark.parametrize(
    ("minion_id", "instance_id", "public", "act", "why"),
    [
        (["w-1"], "i-1", "key", "pend", "no valid minion id"),
        ("../w-1", "i-1", "key", "pend", "no valid minion id"),
        ("w-1", 7, "key", "pend", "instance id is not a string"),
        ("w-1", "i-1", None, "pend", "no public key"),
        ("w-1", "i-1", "k" * 20000, "pend", "no public key"),
        ("w-1", "i-1", "key", "accept", "act 'accept' is not one of pend, reject"),
    ],
)
def test_an_event_of_another_shape_changes_nothing(opts, bus, minion_id, instance_id, public, act, why):
    entry = launched(opts, "w-1", "i-1")
    hold_key(opts, "w-1", pub(0), since=after(entry))
    ret = tickets.admit(opts, minion_id, instance_id, public if public != "key" else pub(0), act)
    assert ret["result"] == "pending"
    assert why in ret["reason"]
    assert held_key(opts, "w-1") == ("pending", pub(0))
    assert "used" not in ticket(opts, "i-1")


# ------------------------------------------------------------- the ticket itself


def test_launching_sets_aside_a_key_held_under_the_id_before(opts, bus):
    """A host that registered the id before the real one booted would have had the real key denied."""
    hold_key(opts, "w-1", pub(1), since=time.time() - 60)
    entry = launched(opts, "w-1", "i-1")
    assert held_key(opts, "w-1") == ("rejected", pub(1))
    assert entry["set_aside"] == [finger(opts, pub(1))]
    assert [(data["act"], data["id"]) for _, data in bus.events] == [("reject", "w-1")]
    # Nor does the README's recovery by hand accept it.
    ret = tickets.admit(opts, "w-1", "i-1", pub(1))
    assert ret["result"] != "accepted"
    assert held_key(opts, "w-1") == ("rejected", pub(1))


def test_launching_keeps_an_accepted_key_and_records_a_rejected_one(opts, bus):
    hold_key(opts, "w-live", pub(0), state="accepted")
    assert "set_aside" not in launched(opts, "w-live", "i-1")
    assert held_key(opts, "w-live") == ("accepted", pub(0))
    hold_key(opts, "w-2", pub(1), state="rejected")
    assert launched(opts, "w-2", "i-2")["set_aside"] == [finger(opts, pub(1))]
    assert held_key(opts, "w-2") == ("rejected", pub(1))
    assert bus.events == []


def test_tickets_name_the_minion_expire_and_are_the_master_s_alone(opts):
    launched(opts, "w-1", "i-1")
    launched(opts, "w-3", "i-3")
    launched(opts, "w-2", "i-2", ttl=-1)
    index = os.path.join(opts["pki_dir"], "saltfleet_autosign_tickets.json")
    assert os.stat(index).st_mode & 0o777 == 0o600  # who may enrol is the master's business only
    assert {iid: t["name"] for iid, t in tickets.autosign_tickets(opts).items()} == {
        "i-1": "w-1",
        "i-2": "w-2",
        "i-3": "w-3",
    }
    assert tickets.prune_autosign_tickets(opts) == ["i-2"]
    assert tickets.revoke_autosign_ticket(opts, instance_id="i-1") == ["i-1"]
    assert tickets.revoke_autosign_ticket(opts, name="w-3") == ["i-3"]
    assert tickets.autosign_tickets(opts) == {}


def test_no_ticket_index_means_nothing_to_prune_or_revoke(opts):
    assert tickets.prune_autosign_tickets(opts) == []
    assert tickets.revoke_autosign_ticket(opts, instance_id="i-1", name="w-1") == []
    assert not os.path.exists(os.path.join(opts["pki_dir"], "saltfleet_autosign_tickets.json"))


def test_tickets_recorded_in_parallel_are_all_kept(opts):
    """salt-cloud -P: several processes record tickets at once; the lock keeps every one."""

    def record(worker):
        for n in range(5):
            launched(opts, f"w{worker}-{n}", f"i-{worker}-{n}")

    fork = multiprocessing.get_context("fork")
    workers = [fork.Process(target=record, args=(worker,)) for worker in range(6)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(60)
    assert [process.exitcode for process in workers] == [0] * 6
    expected = {f"i-{worker}-{n}": f"w{worker}-{n}" for worker in range(6) for n in range(5)}
    assert {iid: t["name"] for iid, t in tickets.autosign_tickets(opts).items()} == expected
    # no temporary file left half-written
    assert not [name for name in os.listdir(opts["pki_dir"]) if name.startswith(".")]


@pytest.mark.parametrize(
    ("setting", "value", "named"),
    [
        ("auth_events_autosign_grains", ["pend"], "auth_events_autosign_grains: [pend, reject]"),
        ("reactor", [], "a reactor on salt/auth running etc/reactor/saltfleet_autosign.sls"),
        ("auth_events", False, "auth_events: True"),
    ],
)
def test_a_master_that_would_not_run_fleet_admit_is_named_before_anything_is_launched(tmp_path, setting, value, named):
    opts = master_opts(tmp_path, **{setting: value})
    with pytest.raises(SaltCloudConfigError, match="w-1: bootstrap: cloud-init") as refused:
        launched(opts, "w-1", "i-1")
    assert named in str(refused.value)
    assert "etc/master.d/saltfleet.conf" in str(refused.value)
    assert tickets.autosign_tickets(opts) == {}


# ------------------------------------------------------- what a flood cannot do


def test_salt_cloud_records_a_ticket_while_an_admission_waits_on_the_master(opts, bus):
    """The ticket lock is never held while admission waits on the network (here the master's event bus)."""
    entry = launched(opts, "w-1", "i-1")
    hold_key(opts, "w-1", pub(0), since=after(entry))
    bus.hold("salt/key")
    answers = []
    admitting = threading.Thread(target=lambda: answers.append(tickets.admit(opts, "w-1", "i-1", pub(0))))
    admitting.start()
    try:
        assert bus.reached.wait(60), "the admission never told the master's bus"
        # Meanwhile salt-cloud launched another instance: its ticket is recorded while the admission still waits.
        launched(opts, "w-2", "i-2")
        assert admitting.is_alive()
    finally:
        bus.release()
        admitting.join(60)
    assert answers[0]["result"] == "accepted"
    assert ticket(opts, "i-2")["name"] == "w-2"


def test_ids_from_the_event_are_logged_quoted(opts, bus, caplog):
    """A minion id may hold a newline: it must not start a line of the master's log of its own."""
    entry = launched(opts, "w-1", "i-1")
    forged = "w-9\nfleet.admit: accepted key of minion w-1"
    hold_key(opts, forged, pub(0), since=after(entry))
    caplog.set_level(logging.INFO)
    tickets.admit(opts, forged, "i-1\nforged", pub(0))
    lines = [record.getMessage() for record in caplog.records if "fleet.admit" in record.getMessage()]
    assert lines
    assert not [line for line in lines if "\n" in line], lines
    assert repr(forged) in lines[-1]
