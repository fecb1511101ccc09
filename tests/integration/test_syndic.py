"""
saltfleet under a master of masters, with real daemons: a top salt-master
(``order_masters``) over two syndic masters, each a salt-master with the
salt-syndic that connects it to the top and the salt-minion beside them (the
syndic's id, as on a packaged syndic host), each with one worker minion.
`salt '*' state.apply` from the top reaches every minion below the syndics,
and `salt-run fleet.inventory` on the top lists every one of them, from
their own syndic master's cache (README, "Scaling").

Shaped as Salt's own syndic scenario tests are: every master has the top's
publish and ret port numbers, as masters on hosts of their own have (4505
and 4506), each on an address of its own (127.0.0.1 for the top, 127.0.0.2
and .3 for the syndic masters: all loopback). Everything runs Salt's TCP
transport: on Salt 3008.4 a syndic on ZeroMQ delivers only its first request
to the top (README).

The daemons, hosts and deployments are the module's, set up once by fixtures.
"""

import contextlib
import copy
import shutil

import pytest
import yaml
from saltfactories.utils import random_string

from localfleet.config import stop_deployments
from tests.apps import celery_client, run_task, sample_repo
from tests.conftest import sandbox_root, short_tmpdir, wait_for

HEARTBEAT = 4  # seconds; pillar/fleet.sls says 60, tests cannot wait that long
APP = "syn-app"
# The syndic masters' addresses: their own, beside the top's 127.0.0.1, with the top's port numbers.
BRANCHES = {"syn-a-": "127.0.0.2", "syn-b-": "127.0.0.3"}


@pytest.fixture(scope="module")
def pillar_root(tmp_path_factory, repo_root):
    """The pillar tree the syndic masters serve: the repository's fleet.sls (a faster heartbeat) and a file per host."""
    path = tmp_path_factory.mktemp("syn-pillar")
    fleet = (
        (repo_root / "pillar" / "fleet.sls").read_text().replace("set heartbeat = 60", f"set heartbeat = {HEARTBEAT}")
    )
    assert f"set heartbeat = {HEARTBEAT}" in fleet
    (path / "fleet.sls").write_text(fleet)
    return path


def master_overrides(saltfleet_master_config, pillar_root, **settings):
    """saltfleet.conf (the reactor and ext_pillar included) with the module's pillar, and ``settings``."""
    overrides = copy.deepcopy(saltfleet_master_config)
    overrides["pillar_roots"] = {"base": [str(pillar_root)]}
    overrides.update(settings)
    return overrides


@pytest.fixture(scope="module")
def top(salt_factories, saltfleet_master_config, pillar_root):
    """The master of masters; its transport (TCP) is every daemon's below it (salt-factories matches it)."""
    overrides = master_overrides(saltfleet_master_config, pillar_root, interface="127.0.0.1", transport="tcp")
    factory = salt_factories.salt_master_daemon(random_string("top-"), order_masters=True, overrides=overrides)
    with factory.started(start_timeout=120):
        yield factory


@pytest.fixture(scope="module")
def tree(top, saltfleet_master_config, pillar_root):
    """
    Two syndic masters under the top, each with a worker minion: [(syndic
    A, its worker), (syndic B, its worker)]. ``syndic.master`` is the
    syndic master, ``syndic.minion`` the minion beside the syndic (its id).
    """
    ports = {"publish_port": top.config["publish_port"], "ret_port": top.config["ret_port"]}
    branches = []
    with contextlib.ExitStack() as stack:
        for prefix, address in BRANCHES.items():
            syndic = top.salt_syndic_daemon(
                random_string(prefix),
                # The syndic reads the master's config and the minion's; the master has the top's port numbers, so
                # the publish port the syndic takes from it is the top's (syndic_master_port is the top's ret port).
                master_overrides=master_overrides(saltfleet_master_config, pillar_root, interface=address, **ports),
                minion_overrides={"master": address, "log_level_logfile": "info"},
                overrides={"syndic_master": top.config["interface"], "syndic_master_port": top.config["ret_port"]},
            )
            # salt-factories starts the syndic's master and minion with it; they stop with it too.
            syndic.after_terminate(syndic.minion.terminate)
            syndic.after_terminate(syndic.master.terminate)
            stack.enter_context(syndic.started(start_timeout=180))
            worker = syndic.master.salt_minion_daemon(
                random_string(prefix.replace("syn", "worker")),
                overrides={"master": address, "log_level_logfile": "info"},
            )
            stack.enter_context(worker.started(start_timeout=120))
            branches.append((syndic, worker))
        yield branches


def minions_below(tree):
    """Every minion below the syndics: the minion beside each syndic and its worker."""
    return sorted(m.id for syndic, worker in tree for m in (syndic.minion, worker))


@pytest.fixture(scope="module")
def places(deploy_user, tree):
    """The sample app's repo, the broker folder, and a sandbox root for every minion: {..., roots: {minion: root}}."""
    base = short_tmpdir("sfs-")
    repo, shas = sample_repo(base)
    data = short_tmpdir("sfd-", owner=deploy_user)
    for folder in ("queue", "control", "results", "processed", "executions"):
        (data / folder).mkdir()
        shutil.chown(data / folder, deploy_user.pw_uid, deploy_user.pw_gid)
    roots = {minion: sandbox_root("sfh-", deploy_user) for minion in minions_below(tree)}
    yield {"repo": repo, "shas": shas, "data": data, "roots": roots}
    for root in roots.values():
        stop_deployments(root, timeout=60)
    for path in (base, data, *roots.values()):
        shutil.rmtree(path, ignore_errors=True)


def queue(worker_id):
    return f"{APP}.{worker_id}"


@pytest.fixture(scope="module")
def applied(top, tree, places, pillar_root, deploy_user, host_settings):
    """
    Every minion's pillar (each worker runs APP on a queue of its own, the
    minions beside the syndics nothing), then from the top `salt '*'
    saltutil.sync_all` (what provisioning does once) and `salt '*'
    state.apply`: the apply's returns, {minion: {state id: return}}.
    """
    workers = {worker.id for _, worker in tree}
    top_sls = {"base": {"*": ["fleet"], **{minion: [f"host-{minion}"] for minion in places["roots"]}}}
    (pillar_root / "top.sls").write_text(yaml.safe_dump(top_sls))
    for minion, root in places["roots"].items():
        host = {"root": str(root), **host_settings}
        deployments = {}
        if minion in workers:
            command = f"celery -A sampleapp worker -Q {queue(minion)} -c 1 -n {queue(minion)}@%%h"
            deployments[APP] = {
                "repo": str(places["repo"]),
                "rev": "v2",
                "env": {"SAMPLEAPP_DATA": str(places["data"])},
                "programs": {"worker": {"command": command, "startsecs": 3}},
            }
        (pillar_root / f"host-{minion}.sls").write_text(yaml.safe_dump({"saltfleet": host, "deployments": deployments}))
    cli = top.salt_cli(timeout=900)
    ret = cli.run("saltutil.sync_all", minion_tgt="*")
    assert ret.returncode == 0, ret
    assert sorted(ret.data) == sorted(places["roots"]), ret
    ret = cli.run("state.apply", minion_tgt="*", _timeout=900)
    assert ret.returncode == 0, ret
    assert isinstance(ret.data, dict), ret
    return {minion: {s["__id__"]: s for s in states.values()} for minion, states in ret.data.items()}


def test_state_apply_from_the_top_reaches_every_minion_below_the_syndics(applied, tree, places):
    assert sorted(applied) == minions_below(tree)
    for minion, states in applied.items():
        assert states, minion
        assert all(s["result"] is True for s in states.values()), (minion, states)
    tasks = celery_client(places["data"])
    for syndic, worker in tree:
        deployed = applied[worker.id][f"saltfleet-deployment-{APP}"]
        assert deployed["changes"]["release"]["new"] == places["shas"]["v2"], deployed
        # The worker serves v2: it answers a task on its own queue.
        assert run_task(tasks, queue(worker.id), timeout=120)["version"] == "2"
        # The minion beside the syndic applied its (empty) pillar: no deployment there.
        assert f"saltfleet-deployment-{APP}" not in applied[syndic.id], applied[syndic.id]


def inventory(run, *args):
    ret = run.run("fleet.inventory", *args)
    assert ret.returncode == 0, ret
    assert isinstance(ret.data, list), ret
    return ret.data


@pytest.fixture(scope="module")
def settled(applied, top, tree):
    """
    The top's inventory once every minion below is up and both workers
    RUNNING (the minions report to their syndic master's cache a heartbeat
    after the apply): its rows as listed.
    """
    run = top.salt_run_cli(timeout=300)
    workers = [worker.id for _, worker in tree]

    def serving():
        listed = inventory(run)
        rows = {row["id"]: row for row in listed}
        if any((rows.get(minion) or {}).get("status") != "up" for minion in minions_below(tree)):
            return None
        if any((rows[minion]["deployments"].get(APP) or {}).get("running") != 1 for minion in workers):
            return None
        return listed

    return wait_for(serving, 120, f"every minion up, both workers with {APP} RUNNING, in the top's inventory")


def test_fleet_inventory_on_the_top_lists_every_minion_below_it(settled, top, tree, places):
    # The top's own keys are its syndics' only: every other row below comes from a syndic master's cache.
    keys = top.salt_key_cli().run("-L").data
    assert sorted(keys["minions"]) == sorted(syndic.id for syndic, _ in tree), keys
    # Every minion once: the workers and the minions beside the syndics, none twice, no other row.
    assert sorted(row["id"] for row in settled) == minions_below(tree), settled
    rows = {row["id"]: row for row in settled}
    for syndic, worker in tree:
        for minion in (syndic.id, worker.id):
            assert rows[minion]["status"] == "up", rows[minion]
            assert rows[minion]["syndic"] == syndic.id, rows[minion]
            assert rows[minion]["last_seen"] is not None, rows[minion]
        facts = rows[worker.id]["deployments"][APP]
        assert facts["rev"] == "v2", facts
        assert facts["release"] == places["shas"]["v2"], facts
        assert facts["supervisord"] == "running", facts
        assert rows[syndic.id]["deployments"] == {}, rows[syndic.id]


def test_fleet_inventory_filters_on_the_top_apply_to_the_minions_below(settled, top, tree):
    run = top.salt_run_cli(timeout=300)
    (syndic_a, worker_a), (syndic_b, worker_b) = tree
    assert [row["id"] for row in inventory(run, f"tgt={worker_b.id}")] == [worker_b.id]
    # A glob matching under both syndics.
    assert sorted(row["id"] for row in inventory(run, "tgt=worker-*")) == sorted([worker_a.id, worker_b.id])
    assert sorted(row["id"] for row in inventory(run, "tgt=syn-*")) == sorted([syndic_a.id, syndic_b.id])
    assert sorted(row["id"] for row in inventory(run, f"deployment={APP}")) == sorted([worker_a.id, worker_b.id])
    # A filter that matches no minion below either syndic says so, and exits 1.
    for args, said in (("deployment=no-such-deployment", "'no-such-deployment'"), ("provider=ec2", "'ec2'")):
        ret = run.run("fleet.inventory", args)
        assert ret.returncode == 1 and said in str(ret.data), ret


def test_a_syndic_master_that_does_not_answer_leaves_its_syndic_one_row_down(settled, top, tree):
    run = top.salt_run_cli(timeout=300)
    (syndic_a, _), (syndic_b, worker_b) = tree
    # The minion beside syndic A stopped: nothing answers for that syndic master.
    with syndic_a.minion.stopped():
        rows = {row["id"]: row for row in inventory(run)}
    # What the top itself knows of syndic A (its key, no heartbeat: down), and syndic B's part as ever.
    assert sorted(rows) == sorted([syndic_a.id, syndic_b.id, worker_b.id]), rows
    assert rows[syndic_a.id]["status"] == "down", rows[syndic_a.id]
    assert rows[syndic_a.id]["syndic"] is None, rows[syndic_a.id]
    assert rows[worker_b.id]["syndic"] == syndic_b.id, rows[worker_b.id]
