"""What the demo, the bench and the tests share: the master settings and saltfleet's utils."""

import functools
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
INSTALL_PATH = "/srv/saltfleet"


def master_config(repo=REPO):
    """etc/master.d/saltfleet.conf with the repository's real path in place of /srv/saltfleet."""
    text = (Path(repo) / "etc" / "master.d" / "saltfleet.conf").read_text()
    return yaml.safe_load(text.replace(INSTALL_PATH, str(repo)))


@functools.cache
def saltfleet_utils():
    """
    saltfleet's _utils through Salt's own utils loader, as a minion loads them:
    ``saltfleet_utils().saltfleet_paths.paths(root, user, name)``.
    """
    import salt.config
    import salt.loader

    opts = salt.config.minion_config(None)
    opts.update(utils_dirs=[str(REPO / "_utils")], file_client="local")
    return salt.loader.utils(opts)


def stop_deployments(root, timeout=60):
    """
    Stop every saltfleet deployment's supervisords under ``root`` (a
    sandbox), and whatever else runs in their cgroups; the names stopped.
    """
    utils = saltfleet_utils()
    stopped = []
    for name, manifest in utils.saltfleet_manifest.installed(root).items():
        p = utils.saltfleet_paths.paths(root, manifest["user"], name)
        uid = utils.saltfleet_user.account(manifest["user"]).pw_uid
        if utils.saltfleet_supervisor.stop_all(p, uid, manifest.get("draining"), timeout):
            stopped.append(name)
        utils.saltfleet_cgroup.kill(p)
    return stopped
