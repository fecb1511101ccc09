"""fleet.inventory and fleet.ansible_inventory from a master's cache, no daemons."""

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import salt.cache
import salt.config

from localfleet.config import REPO


def load_runner(opts):
    spec = importlib.util.spec_from_file_location("saltfleet_fleet_runner", REPO / "_runners" / "fleet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.__opts__ = opts
    return module


@pytest.fixture
def master_opts(tmp_path):
    opts = salt.config.master_config(None)
    opts.update(
        root_dir=str(tmp_path),
        pki_dir=str(tmp_path / "pki"),
        cachedir=str(tmp_path / "cache"),
        sock_dir=str(tmp_path / "sock"),
        output=None,
    )
    for folder in ("minions", "minions_pre", "minions_rejected", "minions_denied"):
        (tmp_path / "pki" / folder).mkdir(parents=True)
    return opts


def add_minion(opts, minion_id, grains=None, mine=None, *, age=0, accepted=True):
    """A minion as the master remembers it: an accepted key, cached grains and mine, last seen `age` s ago."""
    if accepted:
        Path(opts["pki_dir"], "minions", minion_id).write_text(
            "-----BEGIN PUBLIC KEY-----\nx\n-----END PUBLIC KEY-----\n"
        )
    cache = salt.cache.factory(opts)
    seen = time.time() - age
    if grains is not None:
        cache.store("grains", minion_id, grains)
        os.utime(os.path.join(opts["cachedir"], "grains", f"{minion_id}.p"), (seen, seen))
    if mine is not None:
        cache.store("mine", minion_id, mine)
        os.utime(os.path.join(opts["cachedir"], "mine", f"{minion_id}.p"), (seen, seen))


def cloud(provider="local", region="local", size="sandbox", ip="127.0.0.1"):
    return {
        "saltfleet_cloud": {
            "provider": provider,
            "region": region,
            "size": size,
            "instance_id": f"{provider}-1234",
            "public_ips": [ip],
            "private_ips": ["10.0.0.5"],
        },
        "ipv4": ["127.0.0.1", "10.0.0.5"],
    }


def status(running, programs, release="a" * 40):
    states = {f"p{i}": "RUNNING" if i < running else "FATAL" for i in range(programs)}
    return {"release": release, "rev": "main", "supervisord": "running", "programs": states, "running": running}


def test_up_minion_with_deployments(master_opts):
    grains = {
        **cloud(),
        "saltfleet_deployments": {"fetcher": {"rev": "main", "release": "b" * 40}},
    }
    mine = {"saltfleet.heartbeat": "30", "deployment.status": {"fetcher": status(2, 3, release="c" * 40)}}
    add_minion(master_opts, "w1", grains, mine, age=5)
    rows = load_runner(master_opts).inventory()
    assert isinstance(rows, str)  # no --out: a table for people
    master_opts["output"] = "json"
    [row] = load_runner(master_opts).inventory()
    assert row["id"] == "w1"
    assert row["status"] == "up"
    assert (row["provider"], row["region"], row["size"], row["instance_id"]) == (
        "local",
        "local",
        "sandbox",
        "local-1234",
    )
    assert row["public_ips"] == ["127.0.0.1"]
    assert row["private_ips"] == ["10.0.0.5"]
    # The mine (refreshed by the heartbeat) is fresher than the grains.
    assert row["deployments"] == {
        "fetcher": {"rev": "main", "release": "c" * 40, "running": 2, "programs": 3, "supervisord": "running"}
    }


def test_down_minion_keeps_its_last_facts(master_opts):
    master_opts["output"] = "json"
    grains = {**cloud(), "saltfleet_deployments": {"fetcher": {"rev": "v1", "release": "b" * 40}}}
    add_minion(master_opts, "gone-quiet", grains, {"saltfleet.heartbeat": 10, "deployment.status": {}}, age=60)
    [row] = load_runner(master_opts).inventory()
    assert row["status"] == "down"
    assert row["provider"] == "local"
    assert row["deployments"]["fetcher"]["release"] == "b" * 40
    assert row["last_seen"]


def test_a_minion_that_never_reported_is_down(master_opts):
    master_opts["output"] = "json"
    add_minion(master_opts, "new")
    [row] = load_runner(master_opts).inventory()
    assert row["status"] == "down"
    assert row["deployments"] == {}
    assert row["last_seen"] is None


def test_destroyed_minion_disappears(master_opts):
    """No accepted key, no row, whatever the cache still holds."""
    master_opts["output"] = "json"
    add_minion(master_opts, "kept", cloud(), {"saltfleet.heartbeat": 30})
    add_minion(master_opts, "destroyed", cloud(), {"saltfleet.heartbeat": 30}, accepted=False)
    assert [r["id"] for r in load_runner(master_opts).inventory()] == ["kept"]


def test_filters(master_opts):
    master_opts["output"] = "json"
    add_minion(master_opts, "a", cloud("ec2", "eu-west-1", "t3.small"), {"deployment.status": {"x": status(1, 1)}})
    add_minion(master_opts, "b", cloud("local"), {"deployment.status": {"y": status(1, 1)}})
    add_minion(master_opts, "c", cloud("local"), {"deployment.status": {"x": status(0, 1)}})
    runner = load_runner(master_opts)
    assert [r["id"] for r in runner.inventory(deployment="x")] == ["a", "c"]
    assert [r["id"] for r in runner.inventory(provider="local")] == ["b", "c"]
    assert [r["id"] for r in runner.inventory(provider="local", deployment="x")] == ["c"]
    assert [r["id"] for r in runner.inventory(tgt="[ab]")] == ["a", "b"]


def test_instance_id_from_the_shared_provisioning_grain(master_opts):
    """EC2 and Rackspace hosts carry their instance id as grain saltfleet_instance_id."""
    master_opts["output"] = "json"
    grains = {"saltfleet_cloud": {"provider": "ec2", "region": "eu-west-1"}, "saltfleet_instance_id": "i-0abc"}
    add_minion(master_opts, "ec2-host", {**grains, "ipv4": ["10.1.2.3"]}, {"saltfleet.heartbeat": 30})
    [row] = load_runner(master_opts).inventory()
    assert (row["provider"], row["instance_id"], row["private_ips"]) == ("ec2", "i-0abc", ["10.1.2.3"])


def test_host_without_cloud_facts_falls_back_to_its_addresses(master_opts):
    master_opts["output"] = "json"
    add_minion(master_opts, "bare", {"ipv4": ["127.0.0.1", "192.168.1.7"]}, {"saltfleet.heartbeat": 30})
    [row] = load_runner(master_opts).inventory()
    assert row["provider"] is None
    assert row["public_ips"] == []
    assert row["private_ips"] == ["192.168.1.7"]


def test_table(master_opts):
    add_minion(master_opts, "w1", cloud(), {"saltfleet.heartbeat": 30, "deployment.status": {"fetcher": status(2, 2)}})
    add_minion(
        master_opts,
        "w2",
        cloud("ec2", "eu-west-1", "t3.small", "3.3.3.3"),
        {"saltfleet.heartbeat": 30, "deployment.status": {"a": status(1, 1), "b": status(0, 1)}},
        age=500,
    )
    lines = load_runner(master_opts).inventory().splitlines()
    assert lines[0].split() == [
        "ID",
        "STATUS",
        "PROVIDER",
        "REGION",
        "SIZE",
        "PUBLIC",
        "IP",
        "PRIVATE",
        "IP",
        "DEPLOYMENTS",
    ]
    assert lines[1].split() == [
        "w1",
        "up",
        "local",
        "local",
        "sandbox",
        "127.0.0.1",
        "10.0.0.5",
        "fetcher",
        "main@aaaaaaaa",
        "2/2",
        "RUNNING",
    ]
    assert lines[2].split()[:2] == ["w2", "down"]
    assert lines[2].endswith("a main@aaaaaaaa 1/1 RUNNING")
    assert lines[3].strip() == "b main@aaaaaaaa 0/1 RUNNING"
    # The second deployment's line lines up under the first's.
    assert lines[3].index("b main") == lines[2].index("a main")
    assert lines[-1] == "2 minions, 1 up, 1 down"


def test_ansible_inventory(master_opts):
    add_minion(
        master_opts,
        "w1",
        {**cloud("ec2", ip="3.3.3.3"), "os": "Ubuntu"},
        {"saltfleet.heartbeat": 30, "deployment.status": {"daily-fetcher": status(1, 1)}},
    )
    add_minion(master_opts, "w2", cloud("local"), {"saltfleet.heartbeat": 30})
    inventory = json.loads(load_runner(master_opts).ansible_inventory(grains="os"))
    assert inventory["deployment_daily_fetcher"] == {"hosts": ["w1"]}
    assert inventory["provider_ec2"] == {"hosts": ["w1"]}
    assert inventory["provider_local"] == {"hosts": ["w2"]}
    assert sorted(inventory["salt_up"]["hosts"]) == ["w1", "w2"]
    assert "deployment_daily_fetcher" in inventory["all"]["children"]
    w1 = inventory["_meta"]["hostvars"]["w1"]
    assert w1["ansible_host"] == "3.3.3.3"
    assert w1["salt_grains"]["os"] == "Ubuntu"
    assert w1["saltfleet_deployments"]["daily-fetcher"]["running"] == 1
    master_opts["output"] = "json"
    assert load_runner(master_opts).ansible_inventory()["_meta"]["hostvars"]["w2"]["salt_status"] == "up"


class CountingCache:
    """A master cache that records every read, so a test can say what the runner looked at."""

    def __init__(self, cache, reads):
        self.cache = cache
        self.reads = reads

    def fetch(self, bank, key):
        self.reads.append(("fetch", bank, key))
        return self.cache.fetch(bank, key)

    def updated(self, bank, key):
        self.reads.append(("updated", bank, key))
        return self.cache.updated(bank, key)

    def __getattr__(self, name):
        def recorded(*args, **kwargs):
            self.reads.append((name, *args))
            return getattr(self.cache, name)(*args, **kwargs)

        return recorded


def test_inventory_reads_the_masters_cache_only(master_opts, monkeypatch):
    """Fifty minions: one grains and one mine read each, and no job, no minion contacted (speed is bench/'s)."""
    import salt.client

    master_opts["output"] = "json"
    names = [f"worker-{i:02d}" for i in range(50)]
    for name in names:
        grains = {**cloud(), "saltfleet_deployments": {"fetcher": {"rev": "main", "release": "b" * 40}}}
        add_minion(
            master_opts, name, grains, {"saltfleet.heartbeat": 30, "deployment.status": {"fetcher": status(4, 4)}}
        )

    def no_job(*args, **kwargs):
        raise AssertionError("fleet.inventory tried to publish a job to the minions")

    monkeypatch.setattr(salt.client, "LocalClient", no_job)
    monkeypatch.setattr(salt.client, "get_local_client", no_job)
    reads = []
    factory = salt.cache.factory
    monkeypatch.setattr(salt.cache, "factory", lambda opts, **kwargs: CountingCache(factory(opts, **kwargs), reads))

    rows = load_runner(master_opts).inventory()
    assert [row["id"] for row in rows] == names
    assert all(row["status"] == "up" and row["deployments"]["fetcher"]["running"] == 4 for row in rows)
    fetched = sorted((bank, key) for op, bank, key in reads if op == "fetch")
    assert fetched == sorted((bank, name) for name in names for bank in ("grains", "mine"))
    # Besides those reads, only when each bank was last written (the minion's last heartbeat).
    assert {op for op, *_ in reads} <= {"fetch", "updated"}
    assert {bank for _, bank, _ in reads} <= {"grains", "mine"}

    reads.clear()
    table = load_runner({**master_opts, "output": None}).inventory()
    assert table.splitlines()[-1] == "50 minions, 50 up, 0 down"
    assert len([r for r in reads if r[0] == "fetch"]) == 2 * len(names)


@pytest.mark.parametrize(("age", "expected"), [(29, "up"), (31, "down")])
def test_down_is_two_and_a_half_missed_heartbeats_plus_slack(master_opts, monkeypatch, age, expected):
    """A 10 s heartbeat: up while last seen within 10 * 2.5 + 5 = 30 s, down just past it."""
    master_opts["output"] = "json"
    # One clock for the cache's timestamps and the runner: a slow machine moves no row across the line.
    frozen = time.time()
    monkeypatch.setattr(time, "time", lambda: frozen)
    add_minion(master_opts, "w", cloud(), {"saltfleet.heartbeat": 10, "deployment.status": {}}, age=age)
    [row] = load_runner(master_opts).inventory()
    assert row["status"] == expected


def test_celery_workers_with_their_queues_and_tasks_in_hand(master_opts):
    master_opts["output"] = "json"
    row = status(1, 1)
    workers = {"fetch.g1@vm": {"queues": ["fetch.instagram"], "active": 2}}
    row["workers"] = dict(workers)
    add_minion(master_opts, "w", cloud(), {"saltfleet.heartbeat": 10, "deployment.status": {"fetcher": row}}, age=1)
    [inventory] = load_runner(master_opts).inventory()
    assert inventory["deployments"]["fetcher"]["workers"] == workers
    master_opts["output"] = None
    table = load_runner(master_opts).inventory()
    assert table.splitlines()[1].endswith("fetcher main@aaaaaaaa 1/1 RUNNING fetch.instagram (2 active)"), table
