"""
The functional tier: saltfleet's states and execution module through Salt's
own loaders in this process (pytest-salt-factories' ``Loaders``), with a
local file client serving the repository's state tree. No daemons: a state's
plan, dry run, validation and retention are tested in seconds. Deployments
still run for real (git, uv, supervisord) as the unprivileged test user.
"""

import shutil

import pytest
import salt.config
import yaml
from saltfactories.utils.functional import Loaders

from localfleet.config import REPO, saltfleet_utils, stop_deployments
from tests.apps import tiny_repo
from tests.conftest import sandbox_root, short_tmpdir


@pytest.fixture(scope="session")
def tiny():
    """The tiny app's bare repository and its revisions."""
    base = short_tmpdir("sft-")
    repo, shas = tiny_repo(base)
    yield {"repo": repo, "shas": shas}
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def loaders():
    base = short_tmpdir("sfl-")
    pillar_dir = base / "pillar"
    pillar_dir.mkdir()
    # Files a test ships from the master (sysfiles, templates), beside the repository's.
    file_root = base / "fileroot"
    file_root.mkdir()
    (pillar_dir / "top.sls").write_text(yaml.safe_dump({"base": {"*": ["saltfleet"]}}))
    (pillar_dir / "saltfleet.sls").write_text("{}\n")
    opts = salt.config.minion_config(None)
    opts.update(
        id="functional",
        root_dir=str(base),
        cachedir=str(base / "cache"),
        pki_dir=str(base / "pki"),
        sock_dir=str(base / "sock"),
        extension_modules=str(base / "extmods"),
        log_file=str(base / "minion.log"),
        file_client="local",
        file_roots={"base": [str(REPO / "salt"), str(REPO / "tests" / "fixtures" / "fileroot"), str(file_root)]},
        pillar_roots={"base": [str(pillar_dir)]},
        module_dirs=[str(REPO / "_modules")],
        states_dirs=[str(REPO / "_states")],
        utils_dirs=[str(REPO / "_utils")],
        grains_dirs=[str(REPO / "_grains")],
        autoload_dynamic_modules=False,
    )
    loaders = Loaders(opts)
    loaders.pillar_dir = pillar_dir
    loaders.file_root = file_root
    yield loaders
    shutil.rmtree(base, ignore_errors=True)


class Host:
    """A sandbox host converged through the loaders: pillar in, state returns out."""

    def __init__(self, loaders, root, user, settings):
        self.loaders = loaders
        self.root = root
        self.user = user
        self.settings = settings
        self.sf = saltfleet_utils()

    def pillar(self, deployments, **saltfleet):
        host = {"root": str(self.root), **self.settings, **saltfleet}
        return {"saltfleet": host, "deployments": deployments}

    def set_pillar(self, data):
        (self.loaders.pillar_dir / "saltfleet.sls").write_text(yaml.safe_dump(data))
        # The loaded modules hold the pillar they were loaded with: load them afresh, as a minion job does.
        self.loaders.reload_all()

    def apply(self, data, test=False):
        """state.apply of the fleet SLS (what every host runs): {state id: state return}."""
        self.set_pillar(data)
        ret = self.loaders.modules.state.sls("fleet", test=test)
        assert isinstance(ret.raw, dict), ret.raw
        return {state["__id__"]: state for state in ret.raw.values()}

    def ship(self, name, files):
        """Make the master ship exactly ``files`` ({path under root: text}) as deployment ``name``'s sysfiles."""
        folder = self.loaders.file_root / "deployments" / name / "sysfiles"
        shutil.rmtree(folder, ignore_errors=True)
        for rel, text in files.items():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / rel).write_text(text)

    def paths(self, name):
        return self.sf.saltfleet_paths.paths(self.root, self.user.pw_name, name)


@pytest.fixture
def host(loaders, deploy_user, host_settings):
    root = sandbox_root("sfh-", deploy_user)
    yield Host(loaders, root, deploy_user, host_settings)
    stop_deployments(root, timeout=30)
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(loaders.file_root / "deployments", ignore_errors=True)


@pytest.fixture(params=[False, True], ids=["real", "dry"])
def testmode(request):
    """Each state test both for real and as a dry run (Salt's test=True)."""
    return request.param


@pytest.fixture
def out(deploy_user):
    """Where the tiny app's programs report which release runs them (every test user's: sticky, as /tmp)."""
    path = short_tmpdir("sfo-", owner=deploy_user)
    path.chmod(0o1777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def other_app(tiny, out, second_user, second_uv_cache):
    """A second deployment of the tiny app on the host, as the second user, running program ``o``."""

    def app(**spec):
        return tiny_app(
            tiny, out, **{"programs": ["o"], **spec}, user=second_user.pw_name, uv_cache=str(second_uv_cache)
        )

    return app


def tiny_app(tiny, out, rev="v1", programs=("a",), **spec):
    """A deployment of the tiny app running one program per name, each reporting to ``out``."""
    return {
        "repo": str(tiny["repo"]),
        "rev": rev,
        "env": {"TINYAPP_OUT": str(out)},
        "programs": {name: {"command": f"python app.py {name}"} for name in programs},
        **spec,
    }


def report(out, program="a"):
    """What a tiny app program said about itself: version, pid, cwd, user."""
    import json

    return json.loads((out / f"{program}.json").read_text())
