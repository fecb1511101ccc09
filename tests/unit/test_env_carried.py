"""
A deployment's env reaches its programs exactly as pillar wrote it: through
supervisord's own environment, which the boot script exports (property-tested
through a real shell here), and never through supervisord's environment=
option, which cannot carry every value (what it can, saltfleet writes so that
supervisord's own parser reads it back byte for byte).
"""

import json
import subprocess

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from supervisor.datatypes import dict_of_key_value_pairs
from supervisor.options import UnhosedConfigParser, expand

from localfleet.config import saltfleet_utils

utils = saltfleet_utils()
conf = utils.saltfleet_supervisor_conf
HOST, _ = utils.saltfleet_schema.validate_host({"root": "/srv/sandbox", "user": "ubuntu"})
P = utils.saltfleet_paths.paths("/srv/sandbox", "ubuntu", "fetcher")

# Any text of one line (pillar refuses line breaks and NUL): quotes, backslashes, %, ;, #,
# spaces at either end, non-ASCII, control characters and what Python alone splits lines on.
VALUES = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r\0"), max_size=40) | (
    st.sampled_from(
        ["", " ", "'", '"', "\\", "%", "%(x)s", " ;x", " #x", "a ; b", "'\"", "é ü 中", "a\x0cb", "a\u2028b"]
    )
)
NAMES = st.from_regex(r"\A[A-Z_][A-Z0-9_]{0,11}\Z")
ENVS = st.dictionaries(NAMES.filter(lambda n: n not in ("PATH", "LANG")), VALUES, max_size=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(env=ENVS)
def test_the_env_script_exports_every_value_byte_for_byte(tmp_path, env):
    cfg, errors = utils.saltfleet_schema.validate_deployment("fetcher", {"repo": "/r", "env": env}, HOST)
    assert errors == []
    script = conf.env_script(cfg)
    (tmp_path / "env").write_text(script)
    # As the boot script's shell does: source it, then run (here: a dump of the environment).
    dumped = subprocess.run(
        [
            "/bin/sh",
            "-c",
            f'. {tmp_path / "env"} && exec python3 -c "import os, json; print(json.dumps(dict(os.environ)))"',
        ],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        check=True,
    ).stdout
    got = json.loads(dumped)
    assert {k: got.get(k) for k in env} == env
    assert conf.boot_env(script) == {"LANG": "C.UTF-8", **env}


def read_back(value):
    """A program's environment= option holding KEY=value, as supervisord's own parsers read it."""
    text = f"[program:x]\nenvironment={conf.environment({'KEY': value, 'OTHER': 'o'})}\n"
    parser = UnhosedConfigParser()
    parser.read_string(text)
    return dict_of_key_value_pairs(expand(parser.get("program:x", "environment"), {}, "environment"))


@settings(max_examples=500, deadline=None)
@given(VALUES)
def test_environment_writes_what_supervisord_reads_back_or_the_schema_refuses_it(value):
    why = conf.carried(value)
    if why is None:
        assert read_back(value) == {"KEY": value, "OTHER": "o"}
    else:
        spec = {"repo": "/r", "programs": {"w": {"command": "x", "environment": {"KEY": value}}}}
        _, errors = utils.saltfleet_schema.validate_deployment("fetcher", spec, HOST)
        assert errors and "deployments:fetcher:programs:w:environment:KEY" in errors[0] and why in errors[0]


def test_what_supervisord_would_mangle_is_named():
    for value, why in [
        (" x", "space"),
        ("x'", "quote"),
        ("a'b\"c", "both kinds of quotes"),
        ("a ;b", "comment"),
        ("a #b", "comment"),
    ]:
        assert why in conf.carried(value)
    assert conf.carried("a;b#c%d 'e'f") is None
