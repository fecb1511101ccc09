"""
The deploy ledger and the deploy lock on the master, with real files, flocks
and processes (a holder that dies, one that hangs, one that leaves a child
holding its lock); no daemons.
"""

import json
import multiprocessing
import os
import signal
from pathlib import Path

import pytest
import salt.config
import salt.loader
from salt.exceptions import CommandExecutionError

from localfleet.config import REPO, saltfleet_utils

ledger = saltfleet_utils().saltfleet_ledger
deploylock = saltfleet_utils().saltfleet_deploylock
FORK = multiprocessing.get_context("fork")


@pytest.fixture
def opts(tmp_path):
    opts = salt.config.master_config(None)
    opts.update(root_dir=str(tmp_path), cachedir=str(tmp_path / "cache"), pki_dir=str(tmp_path / "pki"))
    return opts


def ledger_path(opts):
    return ledger.folder(opts) / "ledger.jsonl"


# ------------------------------------------------------------------ ledger


def test_entries_come_back_whole_and_in_order_and_the_file_is_private(opts):
    for n in range(3):
        ledger.append(opts, {"type": "host", "n": n})
    assert [e["n"] for e in ledger.read(opts)] == [0, 1, 2]
    assert ledger_path(opts).stat().st_mode & 0o777 == 0o600
    assert (ledger.folder(opts)).stat().st_mode & 0o777 == 0o700


def test_a_line_torn_by_a_crash_is_skipped_and_the_next_entry_stays_whole(opts):
    ledger.append(opts, {"type": "host", "n": 1})
    with open(ledger_path(opts), "ab") as handle:
        handle.write(b'{"type": "host", "n": 2, "half')  # the writer died here
    ledger.append(opts, {"type": "host", "n": 3})
    assert [e["n"] for e in ledger.read(opts)] == [1, 3]


def _append_many(opts, writer, count):
    for n in range(count):
        ledger.append(opts, {"type": "host", "writer": writer, "n": n, "pad": "x" * 5000})


def test_writers_in_parallel_never_interleave_their_lines(opts):
    ledger.folder(opts)
    procs = [FORK.Process(target=_append_many, args=(opts, w, 50)) for w in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
        assert proc.exitcode == 0
    lines = ledger_path(opts).read_bytes().splitlines()
    assert len(lines) == 200
    entries = [json.loads(line) for line in lines]  # every line is whole JSON
    for writer in range(4):
        assert [e["n"] for e in entries if e["writer"] == writer] == list(range(50))


def rollout_events(rid, name, plan, hosts=None, batches_sent=None, user="alice"):
    events = [
        {"type": "rollout", "id": rid, "event": "start", "kind": "fleet.deploy", "user": user}
        | {"deployment": name, "rev": "v2", "batches": plan, "at": "2024-05-01T10:00:00Z"}
        | {"serving": {m: "a" * 40 for batch in plan for m in batch}}
    ]
    for number, (jid, batch) in enumerate(batches_sent or [], 1):
        events.append({"type": "rollout", "id": rid, "event": "batch", "batch": number, "jid": jid, "hosts": batch})
    if hosts is not None:
        events.append(
            {"type": "rollout", "id": rid, "event": "end", "outcome": "stopped", "summary": "stopped: batch 2"}
            | {"hosts": hosts, "at": "2024-05-01T10:01:00Z"}
        )
    return events


def host_line(jid, minion, outcome, name="app", user="bob", release=None, reason=None):
    row = {"outcome": outcome, "release": release, "reason": reason}
    return ledger.host_entry(jid, minion, "deployment.update_code", [name, "v2"], user, row)


def test_history_shows_each_rollout_once_with_its_hosts_and_each_host_level_job_by_jid():
    hosts = {
        "h1": {"outcome": "deployed", "release": "b" * 40},
        "h2": {"outcome": "failed", "reason": "no such package", "release": "a" * 40},
        "h3": {"outcome": "not touched", "release": "a" * 40},
    }
    entries = rollout_events("R1", "app", [["h1"], ["h2"], ["h3"]], hosts, [("J1", ["h1"]), ("J2", ["h2"])])
    # The reactor records the returns of the rollout's own jobs too: they show under the rollout only.
    entries += [host_line("J1", "h1", "deployed", release="b" * 40), host_line("J2", "h2", "failed")]
    entries += [host_line("J9", "h1", "deployed", release="c" * 40), host_line("J9", "h2", "failed", reason="x")]
    entries += [host_line("J8", "o1", "deployed", name="other")]
    items = ledger.history(entries)
    assert [(i["what"], i["jid"]) for i in items] == [
        ("fleet.deploy", "R1"),
        ("deployment.update_code", "J9"),
        ("deployment.update_code", "J8"),
    ]
    rollout, job, _ = items
    assert rollout["who"] == "alice"
    assert rollout["outcome"] == "stopped: batch 2"
    assert rollout["hosts"] == hosts
    assert job["who"] == "bob"
    assert job["hosts"] == {
        "h1": {"outcome": "deployed", "release": "c" * 40},
        "h2": {"outcome": "failed", "reason": "x"},
    }
    assert job["outcome"] == "1 deployed, 1 failed"
    assert [i["jid"] for i in ledger.history(entries, deployment="other")] == ["J8"]


def test_a_rollout_whose_runner_died_shows_how_far_it_got():
    entries = rollout_events("R2", "app", [["h1"], ["h2"], ["h3"]], None, [("J1", ["h1"]), ("J2", ["h2"])])
    entries.append(host_line("J1", "h1", "deployed", release="b" * 40))
    [item] = ledger.history(entries)
    assert item["outcome"].startswith("interrupted")
    assert item["hosts"] == {
        "h1": {"outcome": "deployed", "release": "b" * 40},
        "h2": {"outcome": "sent, no return recorded"},
        "h3": {"outcome": "not touched", "release": "a" * 40},
    }
    [still] = ledger.history(entries, running={"R2"})
    assert still["outcome"] == "running"


def test_host_entry_reads_name_and_rev_from_positional_or_named_arguments():
    row = {"outcome": "deployed", "release": "b" * 40}
    named = ledger.host_entry(
        "J", "h1", "deployment.update_code", [{"name": "app", "rev": "v3", "__kwarg__": True}], "u", row
    )
    assert (named["deployment"], named["rev"], named["user"]) == ("app", "v3", "u")
    back = ledger.host_entry("J", "h1", "deployment.rollback", ["app"], "u", row)
    assert (back["deployment"], back["rev"]) == ("app", "the release before the serving one")


# -------------------------------------------------------------------- lock


def _hold(opts, name, ready, command="fleet.deploy app rev=v2", then=None):
    lock = deploylock.lock(opts, name)
    lock.acquire("alice", command)
    if then == "fork-and-exit":
        if os.fork() == 0:  # the child keeps the lock's file open, and so the lock
            ready.send(os.getpid())
            signal.pause()
        os._exit(0)
    ready.send(os.getpid())
    if then == "check-after-break":
        ready.recv()
        try:
            lock.check()
            ready.send("not broken")
        except CommandExecutionError as exc:
            ready.send(str(exc))
    signal.pause()


def holder(opts, name="app", then=None):
    parent, child = FORK.Pipe()
    proc = FORK.Process(target=_hold, args=(opts, name, child), kwargs={"then": then}, daemon=True)
    proc.start()
    pid = parent.recv()
    return proc, parent, pid


def kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def test_a_second_rollout_is_refused_at_once_naming_the_holder_and_since_when(opts):
    proc, _, pid = holder(opts)
    try:
        with pytest.raises(CommandExecutionError) as refused:
            deploylock.lock(opts, "app").acquire("bob", "fleet.deploy app rev=v3")
        message = str(refused.value)
        assert f"alice (fleet.deploy app rev=v2, pid {pid} on" in message
        assert " since 20" in message
        assert "lock_wait=SECONDS" in message and "fleet.unlock app" in message
        # Another deployment's lock is another lock.
        other = deploylock.lock(opts, "other")
        other.acquire("bob", "fleet.deploy other rev=v1")
        other.release()
    finally:
        kill(proc.pid)


def test_a_runner_killed_holding_the_lock_leaves_no_lock_only_a_stale_record(opts):
    proc, _, pid = holder(opts)
    kill(proc.pid)
    info = deploylock.inspect(opts, "app")
    assert info["state"] == "stale" and info["locked"] is False
    assert info["record"]["pid"] == pid
    # The next rollout takes the lock at once and knows whose rollout died.
    lock = deploylock.lock(opts, "app")
    lock.acquire("bob", "fleet.deploy app rev=v3")
    assert lock.replaced["pid"] == pid
    lock.release()
    assert deploylock.inspect(opts, "app")["state"] == "free"


def test_unlock_clears_a_dead_runners_record_and_the_ledger_says_who(opts):
    proc, _, pid = holder(opts)
    kill(proc.pid)
    result = deploylock.unlock(opts, "app", "carol")
    assert result["result"] is True and result["state"] == "stale"
    assert "whose runner died" in result["comment"]
    assert deploylock.inspect(opts, "app") == {"state": "free", "record": None, "locked": False}
    [entry] = ledger.history(ledger.read(opts))
    assert (entry["what"], entry["who"], entry["holder"]["pid"]) == ("fleet.unlock", "carol", pid)


def test_a_live_holder_is_only_shown_unless_forced_and_then_stops_at_its_next_check(opts):
    proc, pipe, pid = holder(opts, then="check-after-break")
    try:
        shown = deploylock.unlock(opts, "app", "carol")
        assert shown["result"] is False and shown["state"] == "held"
        assert f"pid {pid}" in shown["comment"] and "force=True" in shown["comment"]
        broken = deploylock.unlock(opts, "app", "carol", force=True)
        assert broken["result"] is True and "broken by force" in broken["comment"]
        # A new rollout takes a new lock while the old holder still runs...
        lock = deploylock.lock(opts, "app")
        lock.acquire("bob", "fleet.deploy app rev=v3")
        # ...and the old holder stops before its next batch.
        pipe.send("check")
        assert "was broken" in pipe.recv()
        lock.release()
    finally:
        kill(proc.pid)


def test_a_lock_kept_by_a_process_the_dead_holder_left_behind_is_stale_and_unlock_breaks_it(opts):
    proc, _, orphan = holder(opts, then="fork-and-exit")
    proc.join()
    try:
        info = deploylock.inspect(opts, "app")
        assert info["locked"] is True and info["state"] == "stale"
        assert deploylock.unlock(opts, "app", "carol")["result"] is True
        lock = deploylock.lock(opts, "app")
        lock.acquire("bob", "fleet.deploy app rev=v3")
        lock.release()
    finally:
        kill(orphan)


def test_lock_wait_takes_the_lock_once_the_holder_is_gone(opts):
    proc, _, _ = holder(opts)
    waiter_parent, waiter_child = FORK.Pipe()

    def wait_for_lock():
        lock = deploylock.lock(opts, "app")
        record = lock.acquire("bob", "fleet.deploy app rev=v3", wait=600, poll=0.05)
        waiter_child.send(record["user"])

    waiter = FORK.Process(target=wait_for_lock, daemon=True)
    waiter.start()
    assert not waiter_parent.poll(1), "the waiter waits while the lock is held"
    kill(proc.pid)
    assert waiter_parent.recv() == "bob"
    waiter.join()


def test_a_verdict_given_while_the_rollout_reads_the_last_one_waits_for_its_next_look(opts):
    """An operator's abort just after a promote is never lost with it: the rollout sees each, in turn."""
    lock = deploylock.lock(opts, "app")
    lock.acquire("alice", "fleet.deploy app rev=v2 steps=...")
    try:
        deploylock.tell(opts, "app", "promote", "carol")
        read = lock._read

        def read_then_abort(path, default):
            said = read(path, default)
            deploylock.tell(opts, "app", "abort", "dave")
            lock._read = read
            return said

        lock._read = read_then_abort
        assert lock.told()["verdict"] == "promote"
        assert lock.told()["user"] == "dave"
        assert lock.told() is None
    finally:
        lock.release()


def test_a_name_that_would_leave_the_locks_folder_is_refused(opts):
    for name in ("../x", ".hidden", "a/b"):
        with pytest.raises(CommandExecutionError, match="not a deployment name"):
            deploylock.inspect(opts, name)


# ------------------------------------------- what a minion's return may record


@pytest.fixture
def master(tmp_path):
    """A master's opts with its job cache, and the fleet runner as salt-run loads it."""
    from tests.unit.test_fleet_cli import fleet

    opts = salt.config.master_config(None)
    opts.update(
        root_dir=str(tmp_path),
        pki_dir=str(tmp_path / "pki"),
        cachedir=str(tmp_path / "cache"),
        sock_dir=str(tmp_path / "sock"),
        output="json",
        runner_dirs=[str(REPO / "_runners")],
        utils_dirs=[str(REPO / "_utils")],
    )
    for folder_ in ("minions", "minions_pre", "minions_rejected", "minions_denied"):
        (tmp_path / "pki" / folder_).mkdir(parents=True)
    load = {
        "fun": "deployment.update_code",
        "arg": ["app", "v2"],
        "tgt": "w1",
        "tgt_type": "glob",
        "user": "alice",
        "jid": JID,
    }
    salt.loader.returners(opts, {})["local_cache.save_load"](JID, load, minions=["w1"])
    return opts, fleet(opts)


JID = "20260101000000000042"
DONE = {"result": True, "comment": "ok", "release": "b" * 40}


def test_a_return_is_recorded_only_when_the_master_sent_that_job_to_that_minion(master):
    _, runners = master
    record = runners["fleet.record"]
    assert record(JID, "w1", "deployment.rollback", ["app", "v2"], DONE)["recorded"] is False
    assert record(JID, "w1", "deployment.update_code", ["other-app", "v9"], DONE)["recorded"] is False
    assert record(JID, "w2", "deployment.update_code", ["app", "v2"], DONE)["recorded"] is False
    assert record("20260101000000000043", "w1", "deployment.update_code", ["app", "v2"], DONE)["recorded"] is False
    assert runners["fleet.history"]() == []
    done = record(JID, "w1", "deployment.update_code", ["app", "v2"], DONE)
    assert done["recorded"] is True
    [item] = runners["fleet.history"]()
    assert (item["who"], item["deployment"], item["rev"], item["hosts"]) == (
        "alice",
        "app",
        "v2",
        {"w1": {"outcome": "deployed", "release": "b" * 40}},
    )


def test_every_field_of_a_recorded_return_is_bounded(master):
    opts, runners = master
    huge = {"result": False, "comment": "x" * (10 * 1024 * 1024), "release": ["not", "a", "sha"], "extra": "y" * 10**6}
    assert runners["fleet.record"](JID, "w1", "deployment.update_code", None, huge)["recorded"] is True
    # A rev of 10 MB is no argument the job had: not recorded, whatever the rest says.
    runners["fleet.record"](JID, "w1", "deployment.update_code", ["app", "v" * (10 * 1024 * 1024)], DONE)
    raw = (Path(opts["cachedir"]) / "saltfleet" / "ledger.jsonl").read_bytes()
    assert len(raw) < 4000
    [item] = runners["fleet.history"]()
    assert item["hosts"]["w1"]["outcome"] == "failed"


def test_history_skips_and_counts_the_lines_it_cannot_read(master):
    opts, runners = master
    assert runners["fleet.record"](JID, "w1", "deployment.update_code", ["app", "v2"], DONE)["recorded"] is True
    with (Path(opts["cachedir"]) / "saltfleet" / "ledger.jsonl").open("a") as handle:
        handle.write(json.dumps({"type": "host", "jid": JID, "minion": ["w1"], "outcome": "deployed"}) + "\n")
        handle.write(json.dumps({"type": "rollout", "id": {"a": 1}, "event": "start"}) + "\n")
        handle.write('{"type": "host", "jid": \n')
    items = runners["fleet.history"]()
    assert items[0]["hosts"] == {"w1": {"outcome": "deployed", "release": "b" * 40}}
    assert items[-1]["what"] == "skipped" and items[-1]["skipped"] == 3
