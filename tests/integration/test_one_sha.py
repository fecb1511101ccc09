"""
One commit per rollout: the master resolves a branch once (ext_pillar
saltfleet_revs) and every host of a batched apply deploys that commit, even
when someone pushes to the branch half way.
"""

import shutil
import threading
import time

import pytest
import yaml
from saltfactories.utils import random_string

from localfleet.config import saltfleet_utils, stop_deployments
from tests.apps import advance, tiny_repo
from tests.conftest import sandbox_root, short_tmpdir

NAME = "sf-one-sha"
utils = saltfleet_utils()


@pytest.fixture(scope="module")
def repo():
    base = short_tmpdir("sfr-")
    bare, shas = tiny_repo(base)
    yield {"bare": bare, "shas": shas}
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def minions(salt_master):
    factories = [salt_master.salt_minion_daemon(random_string(f"sha{i}-")) for i in range(3)]
    for factory in factories:
        factory.start(start_timeout=120)
    yield factories
    for factory in factories:
        factory.terminate()


@pytest.fixture(scope="module")
def hosts(minions, salt_cli, pillar_dir, repo, deploy_user, host_settings):
    roots = {m.id: sandbox_root("sfs-", deploy_user) for m in minions}
    top = {"base": {m.id: [m.id] for m in minions}}
    pillar_dir.mkdir(parents=True, exist_ok=True)
    (pillar_dir / "top.sls").write_text(yaml.safe_dump(top))
    for m in minions:
        deployment = {
            "repo": str(repo["bare"]),
            "rev": "master",
            "programs": {"idle": {"command": "sleep 3600", "startsecs": 1}},
        }
        host = {"root": str(roots[m.id]), **host_settings}
        (pillar_dir / f"{m.id}.sls").write_text(yaml.safe_dump({"saltfleet": host, "deployments": {NAME: deployment}}))
    for m in minions:
        assert salt_cli.run("saltutil.sync_all", minion_tgt=m.id).returncode == 0
    yield roots
    for root in roots.values():
        stop_deployments(root, timeout=30)
        shutil.rmtree(root, ignore_errors=True)


def serving(root, user):
    return utils.saltfleet_files.installed(root).get(NAME, {}).get("release")


def test_a_push_half_way_through_a_batched_apply_leaves_every_host_on_one_commit(
    salt_master, minions, hosts, repo, deploy_user
):
    before = repo["shas"]["v3"]  # master's head
    cli = salt_master.salt_cli(timeout=900)
    done = {}
    rollout = threading.Thread(
        target=lambda: done.update(ret=cli.run("-b", "1", "state.apply", minion_tgt="sha*-*", _timeout=900))
    )
    rollout.start()
    # Once the first host serves, someone pushes to the branch.
    deadline = time.monotonic() + 300
    while not any(serving(root, deploy_user) for root in hosts.values()):
        assert time.monotonic() < deadline, "no host deployed within 300 s"
        time.sleep(0.2)
    pushed = advance(repo["bare"])
    rollout.join(900)
    assert done["ret"].returncode == 0, done["ret"]
    assert {m.id: serving(hosts[m.id], deploy_user) for m in minions} == {m.id: before for m in minions}
    assert pushed != before
