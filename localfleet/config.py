"""What the demo, the bench and the tests share: the master settings and saltfleet's utils."""

import functools
import importlib.util
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
    """_utils/saltfleet.py as a plain module: host paths, manifests, supervisord control."""
    spec = importlib.util.spec_from_file_location("saltfleet_utils", REPO / "_utils" / "saltfleet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
