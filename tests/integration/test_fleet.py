"""
A fleet provisioned by the real salt-cloud CLI with the local driver, deployed
with state.apply and listed by fleet.inventory, all through a real master.

Two instances serve the whole module (provisioned and deployed once, by
fixtures; no test stops them): A runs one deployment, B another. A test that
stops or destroys an instance provisions its own. Deployments run as the
unprivileged test user.
"""

import shutil

import pytest
import yaml

from localfleet import procs
from tests.apps import sample_repo
from tests.conftest import short_tmpdir, wait_for

A, B = "inv-a", "inv-b"
# Instances of one test each (a glob apart from A and B: "inv-*" targets those two only).
STOPPED, DESTROYED = "tmp-stopped", "tmp-destroyed"
HEARTBEAT = 4  # seconds; pillar/fleet.sls says 60, tests cannot wait that long


@pytest.fixture(scope="module")
def places(deploy_user):
    sandboxes = short_tmpdir("sfc-")
    # The broker folder: the deployment user's Celery workers write there.
    data = short_tmpdir("sfd-", owner=deploy_user)
    repo, shas = sample_repo(short_tmpdir("sfr-"))
    yield {"sandboxes": sandboxes, "data": data, "repo": repo, "shas": shas}
    for path in (sandboxes, data, repo.parent):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def fleet_pillar(pillar_dir, places, repo_root, deploy_user, host_settings):
    """The repository's pillar/fleet.sls (faster heartbeat) and one deployment per instance."""
    fleet = (
        (repo_root / "pillar" / "fleet.sls").read_text().replace("set heartbeat = 60", f"set heartbeat = {HEARTBEAT}")
    )
    assert f"set heartbeat = {HEARTBEAT}" in fleet
    common = {"saltfleet": host_settings}

    def deployment(programs):
        return {
            "repo": str(places["repo"]),
            "rev": "master",
            "env": {"SAMPLEAPP_DATA": str(places["data"])},
            "programs": programs,
        }

    celery = "celery -A sampleapp worker -Q {q} -c 1 -n {q}@%%h"
    files = {
        "top.sls": {
            "base": {"*": ["fleet", "common"], A: ["inv-a"], B: ["inv-b"], STOPPED: ["tmp-stopped"]},
        },
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
        "tmp-stopped.sls": {"deployments": {"inv-idle": deployment({"idle": {"command": "sleep 86400"}})}},
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


def provision(cloud, salt_cli, *names):
    """`salt-cloud -p local-worker NAMES`, then wait until every new minion answers test.ping; the CLI's result."""
    ret = cloud.run("-p", "local-worker", *names)
    assert ret.returncode == 0, ret
    # A minion the master just accepted takes a moment to subscribe to its jobs.
    for name in names:
        wait_for(
            lambda name=name: salt_cli.run("-t", "5", "test.ping", minion_tgt=name).data is True,
            60,
            f"{name} answering test.ping",
        )
    return ret


def inventory(salt_run_cli, *args):
    ret = salt_run_cli.run("fleet.inventory", *args)
    assert ret.returncode == 0, ret
    return {row["id"]: row for row in ret.data}


def deployed_rows(salt_run_cli, wanted, workers=()):
    """
    The inventory once each of ``wanted`` ({minion: (deployment, RUNNING
    programs)}) shows them, and the deployments of ``workers`` (minions)
    their Celery workers: a worker that had not answered yet when its host
    first told the master is in the host's next report (its heartbeat).
    """

    def check():
        rows = inventory(salt_run_cli)
        for minion, (name, running) in wanted.items():
            row = rows.get(minion, {}).get("deployments", {}).get(name, {})
            if row.get("running") != running or (minion in workers and not row.get("workers")):
                return None
        return rows

    return wait_for(check, 150, f"{wanted} RUNNING in the inventory, with the workers of {workers}")


@pytest.fixture(scope="module")
def fleet(cloud, salt_cli):
    """A and B, provisioned by salt-cloud: its result."""
    return provision(cloud, salt_cli, A, B)


@pytest.fixture(scope="module")
def deployed(fleet, salt_cli, salt_run_cli):
    """A and B converged by one state.apply, no saltutil.sync_all before it: the inventory rows."""
    ret = salt_cli.run("-L", "state.apply", minion_tgt=f"{A},{B}", _timeout=900)
    assert ret.returncode == 0, ret
    return deployed_rows(salt_run_cli, {A: ("inv-app", 1), B: ("inv-pair", 2)}, workers=(A,))


def test_salt_cloud_creates_minions_that_answer(fleet, cloud, salt_master, salt_cli, places):
    for name in (A, B):
        node = fleet.data[name]
        assert node["state"] == "running", fleet
        assert node["id"].startswith("local-")
        assert (places["sandboxes"] / name / "etc" / "salt" / "minion").exists()
    # The keys were pre-accepted on the master (no autosign, no salt-key -a).
    keys = salt_master.salt_key_cli().run("-L")
    assert {A, B} <= set(keys.data["minions"]), keys
    assert not keys.data["minions_pre"]
    # salt-cloud lists them, running, with the cloud facts that became grains.
    query = cloud.run("-Q")
    assert query.data["local"]["local"][A]["state"] == "running", query
    grains = salt_cli.run("grains.get", "saltfleet_cloud", minion_tgt=A)
    assert grains.data["provider"] == "local"
    assert grains.data["instance_id"] == fleet.data[A]["id"]
    assert grains.data["size"] == "sandbox"


def test_provisioned_host_is_synced_once_and_does_not_autoload(fleet, salt_cli, places):
    # The minion config salt-cloud wrote turns autoload off: state.apply does not sync_all first...
    config = yaml.safe_load((places["sandboxes"] / A / "etc" / "salt" / "minion").read_text())
    assert config["autoload_dynamic_modules"] is False, config
    assert salt_cli.run("config.get", "autoload_dynamic_modules", minion_tgt=A).data is False
    # ...so saltfleet's modules are there only because provisioning synced them: nobody else did here.
    listed = salt_cli.run("sys.list_functions", "deployment", minion_tgt=A)
    assert "deployment.status" in listed.data, listed
    status = salt_cli.run("deployment.status", minion_tgt=A)
    assert status.returncode == 0, status
    assert isinstance(status.data, dict), status
    grains = salt_cli.run("grains.item", "saltfleet_deployments", minion_tgt=A)
    assert "saltfleet_deployments" in grains.data, grains


def test_state_apply_deploys_and_inventory_counts_running(deployed, salt_cli, salt_run_cli, places):
    rows = deployed
    master_sha = places["shas"]["v2"]
    for name in (A, B):
        assert rows[name]["status"] == "up"
        assert rows[name]["provider"] == "local"
        assert rows[name]["size"] == "sandbox"
        assert rows[name]["public_ips"] == ["127.0.0.1"]
    row = dict(rows[A]["deployments"]["inv-app"])
    # Its Celery worker, with the queue it consumes and its tasks in hand.
    assert [(w["queues"], w["active"]) for w in row.pop("workers").values()] == [(["inv-app"], 0)]
    assert row == {
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
    # A filter that matches no minion is an error naming what there is, as Salt's "No minions matched".
    none = salt_run_cli.run("fleet.inventory", "provider=ec2")
    assert none.returncode == 1 and "(providers of those minions: local)" in none.data["error"], none


def test_ansible_inventory(deployed, salt_run_cli):
    ret = salt_run_cli.run("fleet.ansible_inventory", "grains=id")
    assert ret.returncode == 0, ret
    assert ret.data["deployment_inv_app"]["hosts"] == [A]
    assert ret.data["deployment_inv_pair"]["hosts"] == [B]
    assert sorted(ret.data["provider_local"]["hosts"]) == [A, B]
    assert ret.data["_meta"]["hostvars"][A]["ansible_host"] == "127.0.0.1"
    assert ret.data["_meta"]["hostvars"][A]["salt_grains"]["id"] == A


@pytest.fixture
def own_instance(cloud, salt_cli):
    """Provision an instance for one test; destroyed after it (salt-cloud -d) unless the test did."""
    made = []

    def make(name):
        made.append(name)
        return provision(cloud, salt_cli, name)

    yield make
    for name in made:
        if name in (cloud.run("-Q").data["local"]["local"] or {}):
            cloud.run("-y", "-d", name)


def test_stopped_minion_shows_down_with_its_last_facts(own_instance, cloud, salt_cli, salt_run_cli, places):
    own_instance(STOPPED)
    assert salt_cli.run("state.apply", minion_tgt=STOPPED, _timeout=900).returncode == 0
    assert deployed_rows(salt_run_cli, {STOPPED: ("inv-idle", 1)})[STOPPED]["status"] == "up"
    ret = cloud.run("-y", "-a", "stop", STOPPED)
    assert ret.returncode == 0, ret
    assert ret.data["local"]["local"][STOPPED]["stopped_deployments"] == ["inv-idle"]
    assert not procs.processes_under(places["sandboxes"] / STOPPED)
    row = wait_for(
        lambda: inventory(salt_run_cli)[STOPPED] if inventory(salt_run_cli)[STOPPED]["status"] == "down" else None,
        HEARTBEAT * 3 + 20,
        f"{STOPPED} down in the inventory",
    )
    assert row["provider"] == "local"
    assert row["deployments"]["inv-idle"]["release"] == places["shas"]["v2"]
    assert cloud.run("-Q").data["local"]["local"][STOPPED]["state"] == "stopped"


def test_destroy_removes_it_from_inventory_and_keys(own_instance, cloud, salt_master, salt_run_cli, places):
    own_instance(DESTROYED)
    assert DESTROYED in inventory(salt_run_cli)
    ret = cloud.run("-y", "-d", DESTROYED)
    assert ret.returncode == 0, ret
    assert not (places["sandboxes"] / DESTROYED).exists()
    assert DESTROYED not in salt_master.salt_key_cli().run("-L").data["minions"]
    assert DESTROYED not in inventory(salt_run_cli)
    assert DESTROYED not in cloud.run("-Q").data["local"]["local"]
