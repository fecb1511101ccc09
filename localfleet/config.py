"""The master settings saltfleet needs, read from etc/master.d/saltfleet.conf."""

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
INSTALL_PATH = "/srv/saltfleet"


def master_config(repo=REPO):
    """etc/master.d/saltfleet.conf with the repository's real path in place of /srv/saltfleet."""
    text = (Path(repo) / "etc" / "master.d" / "saltfleet.conf").read_text()
    return yaml.safe_load(text.replace(INSTALL_PATH, str(repo)))
