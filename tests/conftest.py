"""Fixtures shared by every test: the repository, the master settings, sandboxes."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from localfleet.config import REPO, master_config

# uv's cache is shared by every sandbox of a run (and by `make demo`).
os.environ.setdefault("UV_CACHE_DIR", str(REPO / ".cache" / "uv"))


@pytest.fixture(scope="session")
def repo_root():
    return REPO


@pytest.fixture(scope="session")
def saltfleet_master_config():
    """Overrides for a salt-factories master: saltfleet's file, pillar and module dirs."""
    return master_config()


def short_tmpdir(prefix):
    """A directory with a short path: supervisord's unix socket paths must stay under 108 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@pytest.fixture
def short_tmp():
    path = short_tmpdir("sf-")
    yield path
    shutil.rmtree(path, ignore_errors=True)
