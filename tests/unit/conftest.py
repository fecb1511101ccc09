"""What the unit tests share: a master's opts under the test's own folder (tests/support/master.py)."""

import pytest

from tests.support import master


@pytest.fixture
def master_opts(tmp_path):
    return master.master_opts(tmp_path)
