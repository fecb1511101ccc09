"""
One commit per wave, and never an old one: the master resolves a branch for
the hosts that apply together (ext_pillar saltfleet_revs), each from a git
request that began after the host asked, so every host of a wave deploys one
commit and an apply right after a push deploys the push.
"""

import re
import shutil

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


def serving(root):
    return utils.saltfleet_manifest.installed(root).get(NAME, {}).get("release")


def apply_all(salt_master):
    ret = salt_master.salt_cli(timeout=900).run("state.apply", minion_tgt="sha*-*", _timeout=900)
    assert ret.returncode == 0, ret
    return {
        mid: next(s for s in states.values() if s["__id__"] == f"saltfleet-deployment-{NAME}")
        for mid, states in ret.data.items()
    }


def test_a_wave_deploys_one_commit_and_an_apply_right_after_a_push_deploys_the_push(salt_master, minions, hosts, repo):
    apply_all(salt_master)
    head = repo["shas"]["v3"]  # master's head
    assert {m.id: serving(hosts[m.id]) for m in minions} == {m.id: head for m in minions}
    # Someone pushes, and the next apply is typed at once: it deploys the push, on every host.
    pushed = advance(repo["bare"])
    states = apply_all(salt_master)
    assert {m.id: serving(hosts[m.id]) for m in minions} == {m.id: pushed for m in minions}
    for state in states.values():
        # The comment says which commit rev resolved to, and when.
        assert re.search(rf"master resolved to {pushed[:12]} at \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ", state["comment"]), (
            state
        )
    # Nothing new: every host says so, naming the commit the master found just now.
    again = apply_all(salt_master)
    assert all(s["changes"] == {} and f"master resolved to {pushed[:12]} at" in s["comment"] for s in again.values())
