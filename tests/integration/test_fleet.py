"""
A fleet provisioned by the real salt-cloud CLI with the local driver, deployed
with state.apply and listed by fleet.inventory, all through a real master.

The tests build on one another in file order (one master, two instances).
"""

import getpass
import shutil
import time

import pytest
import yaml

from localfleet import procs
from tests.conftest import short_tmpdir
from tests.apps import sample_repo

USER = getpass.getuser()
A, B = "inv-a", "inv-b"
HEARTBEAT = 4  # seconds; pillar/fleet.sls says 60, tests cannot wait that long


@pytest.fixture(scope="module")
def places():
    sandboxes = short_tmpdir("sfc-")
    data = short_tmpdir("sfd-")
    repo, shas = sample_repo(short_tmpdir("sfr-"))
    yield {"sandboxes": sandboxes, "data": data, "repo": repo, "shas": shas}
    for path in (sandboxes, data, repo.parent):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def fleet_pillar(pillar_dir, places, repo_root):
    """The repository's pillar/fleet.sls (faster heartbeat) and one deployment per instance."""
    fleet = (
        (repo_root / "pillar" / "fleet.sls").read_text().replace("set heartbeat = 60", f"set heartbeat = {HEARTBEAT}")
    )
    assert f"set heartbeat = {HEARTBEAT}" in fleet
    common = {
        "saltfleet": {"user": USER, "uv_cache": str(repo_root / ".cache" / "uv")},
    }

    def deployment(programs):
        return {
            "repo": str(places["repo"]),
            "rev": "master",
            "env": {"SAMPLEAPP_DATA": str(places["data"])},
            "programs": programs,
        }

    celery = "celery -A sampleapp worker -Q {q} -c 1 -n {q}@%%h"
    files = {
        "top.sls": {"base": {"*": ["fleet", "common"], A: ["inv-a"], B: ["inv-b"]}},
        "common.sls": common,
        "inv-a.sls": {"deployments": {"inv-app": deployment({"worker": {"command": celery.format(q="inv-app")}})}},
        "inv-b.sls": {
            "deployments": {
                "inv-pair": deployment(
                    {
                        "worker": {"command": celery.format(q="inv-pair"), "stopwaitsecs": 30},
                        "idle": {"command": "sleep 86400", "stopwaitsecs": 5},
                    }
                )
            }
        },
    }
    pillar_dir.mkdir(parents=True, exist_ok=True)
    (pillar_dir / "fleet.sls").write_text(fleet)
    for name, data in files.items():
        (pillar_dir / name).write_text(yaml.safe_dump(data))
    return files


@pytest.fixture(scope="module")
def cloud(salt_master, places, repo_root, fleet_pillar):
    """salt-cloud with the repository's local provider and profile, its sandboxes in a short tmp dir."""
    cli = salt_master.salt_cloud_cli(timeout=300)
    conf = cli.config["conf_file"].rsplit("/", 1)[0]
    provider = yaml.safe_load((repo_root / "cloud.providers.d" / "local.conf").read_text())
    provider["local"]["sandbox_dir"] = str(places["sandboxes"])
    provider["local"]["wait_for_minion_timeout"] = 120
    with open(f"{conf}/cloud.providers.d/local.conf", "w") as fh:
        yaml.safe_dump(provider, fh)
    shutil.copy(repo_root / "cloud.profiles.d" / "local.conf", f"{conf}/cloud.profiles.d/local.conf")
    yield cli
    remaining = [p.name for p in places["sandboxes"].iterdir() if (p / "instance.json").exists()]
    if remaining:
        cli.run("-y", "-d", *remaining)
    # Nothing an instance started may outlive the tests.
    leftovers = procs.processes_under(places["sandboxes"])
    procs.stop(list(leftovers), timeout=30)
    assert not leftovers, f"processes left running by destroyed instances: {leftovers}"


def inventory(salt_run_cli, *args):
    ret = salt_run_cli.run("fleet.inventory", *args)
    assert ret.returncode == 0, ret
    return {row["id"]: row for row in ret.data}


def wait_for(check, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout} s")
        time.sleep(1)


def test_salt_cloud_creates_minions_that_answer(cloud, salt_master, salt_cli, places):
    ret = cloud.run("-p", "local-worker", A, B)
    assert ret.returncode == 0, ret
    for name in (A, B):
        node = ret.data[name]
        assert node["state"] == "running", ret
        assert node["id"].startswith("local-")
        assert (places["sandboxes"] / name / "etc" / "salt" / "minion").exists()
    # The keys were pre-accepted on the master (no autosign, no salt-key -a).
    keys = salt_master.salt_key_cli().run("-L")
    assert {A, B} <= set(keys.data["minions"]), keys
    assert not keys.data["minions_pre"]
    # A minion the master just accepted takes a moment to subscribe to its jobs.
    wait_for(
        lambda: salt_cli.run("-t", "5", "test.ping", minion_tgt="inv-*").data == {A: True, B: True},
        60,
        "both minions answering test.ping",
    )
    # salt-cloud lists them, running, with the cloud facts that became grains.
    query = cloud.run("-Q")
    assert query.data["local"]["local"][A]["state"] == "running", query
    grains = salt_cli.run("grains.get", "saltfleet_cloud", minion_tgt=A)
    assert grains.data["provider"] == "local"
    assert grains.data["instance_id"] == ret.data[A]["id"]
    assert grains.data["size"] == "sandbox"


def test_state_apply_deploys_and_inventory_counts_running(cloud, salt_cli, salt_run_cli, places):
    assert salt_cli.run("saltutil.sync_all", minion_tgt="inv-*").returncode == 0
    ret = salt_cli.run("state.apply", minion_tgt="inv-*", _timeout=900)
    assert ret.returncode == 0, ret
    master_sha = places["shas"]["v2"]

    def deployed():
        rows = inventory(salt_run_cli)
        a, b = rows.get(A, {}).get("deployments", {}), rows.get(B, {}).get("deployments", {})
        ok = a.get("inv-app", {}).get("running") == 1 and b.get("inv-pair", {}).get("running") == 2
        return rows if ok else None

    rows = wait_for(deployed, 60, "both deployments RUNNING in the inventory")
    for name in (A, B):
        assert rows[name]["status"] == "up"
        assert rows[name]["provider"] == "local"
        assert rows[name]["size"] == "sandbox"
        assert rows[name]["public_ips"] == ["127.0.0.1"]
    assert rows[A]["deployments"]["inv-app"] == {
        "rev": "master",
        "release": master_sha,
        "running": 1,
        "programs": 1,
        "supervisord": "running",
    }
    assert rows[B]["deployments"]["inv-pair"]["programs"] == 2
    # The grain carries the release too, for whoever reads grains rather than the mine.
    salt_cli.run("saltutil.refresh_grains", minion_tgt=A)
    wait_for(
        lambda: (
            (salt_cli.run("grains.get", "saltfleet_deployments", minion_tgt=A).data or {})
            .get("inv-app", {})
            .get("release")
            == master_sha
        ),
        30,
        "grain saltfleet_deployments with the release",
    )
    # Filters.
    assert set(inventory(salt_run_cli, "deployment=inv-pair")) == {B}
    assert set(inventory(salt_run_cli, "provider=local")) == {A, B}
    assert inventory(salt_run_cli, "provider=ec2") == {}


def test_ansible_inventory(salt_run_cli):
    ret = salt_run_cli.run("fleet.ansible_inventory")
    assert ret.returncode == 0, ret
    assert ret.data["deployment_inv_app"]["hosts"] == [A]
    assert ret.data["deployment_inv_pair"]["hosts"] == [B]
    assert sorted(ret.data["provider_local"]["hosts"]) == [A, B]
    assert ret.data["_meta"]["hostvars"][A]["ansible_host"] == "127.0.0.1"
    assert ret.data["_meta"]["hostvars"][A]["salt_grains"]["id"] == A


def test_stopped_minion_shows_down_with_its_last_facts(cloud, salt_run_cli, places):
    ret = cloud.run("-y", "-a", "stop", B)
    assert ret.returncode == 0, ret
    assert ret.data["local"]["local"][B]["stopped_deployments"] == ["inv-pair"]
    assert not procs.processes_under(places["sandboxes"] / B)
    row = wait_for(
        lambda: inventory(salt_run_cli)[B] if inventory(salt_run_cli)[B]["status"] == "down" else None,
        HEARTBEAT * 3 + 20,
        f"{B} down in the inventory",
    )
    assert row["provider"] == "local"
    assert row["deployments"]["inv-pair"]["release"] == places["shas"]["v2"]
    assert inventory(salt_run_cli)[A]["status"] == "up"
    assert cloud.run("-Q").data["local"]["local"][B]["state"] == "stopped"


def test_destroy_removes_it_from_inventory_and_keys(cloud, salt_master, salt_run_cli, places):
    ret = cloud.run("-y", "-d", B)
    assert ret.returncode == 0, ret
    assert not (places["sandboxes"] / B).exists()
    assert B not in salt_master.salt_key_cli().run("-L").data["minions"]
    rows = inventory(salt_run_cli)
    assert B not in rows
    assert A in rows
    assert B not in cloud.run("-Q").data["local"]["local"]
