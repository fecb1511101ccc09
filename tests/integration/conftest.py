"""Real salt-master and salt-minion daemons (pytest-salt-factories), shared per module."""

import copy

import pytest
import yaml
from saltfactories.utils import random_string


def write_pillar(pillar_dir, data, minions="*"):
    """Write pillar/top.sls and pillar/saltfleet.sls assigning data to minions."""
    pillar_dir.mkdir(parents=True, exist_ok=True)
    (pillar_dir / "top.sls").write_text(yaml.safe_dump({"base": {minions: ["saltfleet"]}}))
    (pillar_dir / "saltfleet.sls").write_text(yaml.safe_dump(data))


@pytest.fixture(scope="module")
def pillar_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("pillar")


@pytest.fixture(scope="module")
def salt_master(salt_factories, saltfleet_master_config, pillar_dir, repo_root):
    """A master serving this repository's salt/ tree and a test's own pillar."""
    overrides = copy.deepcopy(saltfleet_master_config)
    overrides["pillar_roots"] = {"base": [str(pillar_dir)]}
    # Deployments the tests own, beside the repository's (which the demo owns).
    overrides["file_roots"]["base"].append(str(repo_root / "tests" / "fixtures" / "fileroot"))
    overrides["interface"] = "127.0.0.1"
    factory = salt_factories.salt_master_daemon(random_string("master-"), overrides=overrides)
    with factory.started(start_timeout=120):
        yield factory


@pytest.fixture(scope="module")
def salt_minion(salt_master):
    factory = salt_master.salt_minion_daemon(random_string("minion-"), overrides={"log_level_logfile": "info"})
    with factory.started(start_timeout=120):
        yield factory


@pytest.fixture(scope="module")
def salt_cli(salt_master):
    return salt_master.salt_cli(timeout=900)


@pytest.fixture(scope="module")
def salt_run_cli(salt_master):
    return salt_master.salt_run_cli(timeout=300)
