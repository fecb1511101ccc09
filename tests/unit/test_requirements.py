"""What a virtualenv is built from (_utils/saltfleet_venv.py): the digest, and includes that leave the repo."""

import pytest
from salt.exceptions import CommandExecutionError

from localfleet.config import saltfleet_utils

venv = saltfleet_utils().saltfleet_venv
CFG = {"name": "f", "python": "python3", "requirements": "requirements.txt"}


def reader(files, links=()):
    return lambda rel: (
        ("link", files[rel]) if rel in links else (("file", files[rel]) if rel in files else (None, None))
    )


def test_digest_follows_included_files():
    files = {"requirements.txt": "-r base.txt\ncelery\n", "base.txt": "kombu==5\n"}
    before = venv.digest(reader(files), CFG)
    files["base.txt"] = "kombu==6\n"
    assert venv.digest(reader(files), CFG) != before
    assert venv.digest(reader(files), dict(CFG, python="3.12")) != venv.digest(reader(files), CFG)


def test_missing_requirements_file_names_the_key():
    with pytest.raises(CommandExecutionError, match=r"f:requirements: 'nope\.txt' is not in the repository"):
        venv.digest(reader({}), dict(CFG, requirements="nope.txt"))


@pytest.mark.parametrize(
    ("files", "links", "message"),
    [
        ({"requirements.txt": "-r /etc/shadow\n"}, (), "includes '/etc/shadow', outside the repository"),
        ({"requirements.txt": "-c ../../secret.txt\n"}, (), "includes '../../secret.txt', outside the repository"),
        ({"requirements.txt": "--requirement=sub/../../x\n"}, (), "outside the repository"),
        ({"requirements.txt": "/etc/shadow"}, ("requirements.txt",), "'requirements.txt' is a symlink"),
        ({"requirements.txt": "-r base.txt\n", "base.txt": "/etc/x"}, ("base.txt",), "'base.txt' (included by"),
    ],
)
def test_files_outside_the_release_are_refused_without_their_content(files, links, message):
    with pytest.raises(CommandExecutionError) as info:
        venv.digest(reader(files, links), CFG)
    assert message in str(info.value)
    assert str(info.value).startswith("deployments:f:requirements: ")
