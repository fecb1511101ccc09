"""Real salt-master and salt-minion daemons (pytest-salt-factories), shared per module."""

import copy
import shutil
import uuid

import pytest
import yaml
from saltfactories.utils import random_string

from localfleet.config import stop_deployments
from localfleet.rabbitmq import RabbitMQ
from tests.apps import sample_repo
from tests.conftest import broker_folder, sandbox_root, short_tmpdir


def write_pillar(pillar_dir, data, minions="*"):
    """Write pillar/top.sls and pillar/saltfleet.sls assigning data to minions."""
    pillar_dir.mkdir(parents=True, exist_ok=True)
    (pillar_dir / "top.sls").write_text(yaml.safe_dump({"base": {minions: ["saltfleet"]}}))
    (pillar_dir / "saltfleet.sls").write_text(yaml.safe_dump(data))


@pytest.fixture(scope="module")
def rabbitmq():
    """A private rabbitmq-server on 127.0.0.1 for the module, stopped (with its epmd) after it."""
    with RabbitMQ() as broker:
        yield broker


@pytest.fixture
def broker(rabbitmq):
    """The URL of a virtual host of this test's own: no queue or message is shared with another test."""
    return rabbitmq.vhost(f"t-{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="module")
def pillar_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("pillar")


@pytest.fixture(scope="module")
def master_file_root(tmp_path_factory):
    """A file root of the module's master that a test writes to (a deployment's folder added meanwhile)."""
    return tmp_path_factory.mktemp("fileroot")


@pytest.fixture(scope="module")
def salt_master(salt_factories, saltfleet_master_config, pillar_dir, repo_root, master_file_root):
    """A master serving this repository's salt/ tree and a test's own pillar."""
    overrides = copy.deepcopy(saltfleet_master_config)
    overrides["pillar_roots"] = {"base": [str(pillar_dir)]}
    # Deployments the tests own, beside the repository's (which the demo owns), and one a test adds to.
    overrides["file_roots"]["base"].append(str(repo_root / "tests" / "fixtures" / "fileroot"))
    overrides["file_roots"]["base"].append(str(master_file_root))
    # A master lists its files from a cache (Salt's default: 20 s; salt-factories' 0 hides it): long enough
    # here that a folder a test adds is not listed at once however loaded the machine (no test adds files
    # to the file roots but the one that shows what the cache does).
    overrides["fileserver_list_cache_time"] = 600
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


@pytest.fixture(scope="module")
def synced(salt_minion, salt_cli):
    """The module's minion with saltfleet's modules synced (what provisioning does once)."""
    ret = salt_cli.run("saltutil.sync_all", minion_tgt=salt_minion.id)
    assert ret.returncode == 0, ret
    return salt_minion


class Host:
    """A sandbox host behind a real minion: pillar in, the real `salt` CLI's returns out."""

    def __init__(self, salt_cli, minion, pillar_dir, root, user, settings):
        self.cli, self.minion, self.pillar_dir = salt_cli, minion, pillar_dir
        self.root, self.user, self.settings = root, user, settings
        self.outputs = []

    def pillar(self, deployments, **saltfleet):
        host = {"root": str(self.root), **self.settings, **saltfleet}
        return {"saltfleet": host, "deployments": deployments}

    def set_pillar(self, data):
        write_pillar(self.pillar_dir, data)
        self.run("saltutil.refresh_pillar", "wait=True")

    def run(self, *args, **kwargs):
        ret = self.cli.run(*args, minion_tgt=self.minion.id, **kwargs)
        self.outputs.append(ret)
        return ret

    def apply(self, data, test=False, check=True):
        """state.apply with ``data`` as pillar: {state id: return}; with ``check``, every state must succeed."""
        self.set_pillar(data)
        ret = self.run("state.apply", *(["test=True"] if test else []), _timeout=900)
        assert isinstance(ret.data, dict), ret
        states = {state["__id__"]: state for state in ret.data.values()}
        if check:
            assert all(s["result"] is not False for s in states.values()), states
        return states

    def status(self, name=None):
        return self.run("deployment.status", *([name] if name else [])).data


@pytest.fixture(scope="module")
def sample():
    """The sample app's bare repository and its revisions, for one module."""
    base = short_tmpdir("sfr-")
    repo, shas = sample_repo(base)
    yield {"repo": repo, "shas": shas}
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def host(request, salt_cli, synced, pillar_dir, deploy_user, host_settings):
    """A sandbox host of one test behind the module's minion; its deployments stop when the test ends."""
    # The test's broker and data folders outlive its workers: made before the host, removed after
    # it (a worker whose broker folder vanished may not stop on SIGTERM).
    for name in ("celery_data", "second_celery_data", "data"):
        if name in request.fixturenames:
            request.getfixturevalue(name)
    root = sandbox_root("sfi-", deploy_user)
    yield Host(salt_cli, synced, pillar_dir, root, deploy_user, host_settings)
    stop_deployments(root, timeout=60)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def celery_data(deploy_user):
    """
    The sample app's broker and result folders of one test: the workers (the
    deployment's user) and the test share them; no message outlives its test.
    """
    data = broker_folder(deploy_user)
    yield data
    shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def second_celery_data(second_user):
    """The broker and result folders of a second deployment of the host, whose user is the second user."""
    data = broker_folder(second_user)
    yield data
    shutil.rmtree(data, ignore_errors=True)
