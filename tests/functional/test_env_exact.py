"""
A deployment's env reaches its programs exactly as pillar wrote it, whatever
it holds, read back inside the running program; and nothing supervisord says
when it refuses to start carries a value of it into the state's comment.
"""

import uuid

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.functional.conftest import report, tiny_app
from tests.unit.test_env_carried import VALUES

STATE = "saltfleet-deployment-tiny"
NAMES = st.from_regex(r"\ASF_[A-Z0-9_]{1,10}\Z")


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(env=st.dictionaries(NAMES, VALUES, min_size=12, max_size=12))
def test_env_values_reach_the_program_byte_for_byte(host, tiny, out, env):
    # Beside them a value found nowhere else (a random one may be a word the config holds anyway: "file").
    token = f"tok-{uuid.uuid4().hex}"
    env = {**env, "SF_TOKEN": token}
    states = host.apply(host.pillar({"tiny": tiny_app(tiny, out, env={"TINYAPP_OUT": str(out), **env})}))
    assert states[STATE]["result"] is True, states[STATE]
    seen = report(out)["env"]
    assert {key: seen.get(key) for key in env} == env
    # The values went nowhere root writes for others to read: not the state's return, not the config.
    text = host.paths("tiny")["conf"].read_text()
    assert token not in text and token not in repr(states)


def test_supervisord_refusing_its_config_says_so_without_the_env(host, tiny, out):
    secret = "tok-4f2a91c0"
    # supervisord expands %(ENV_NPROCS)s when it reads its config, and quotes what is not a number.
    conf = host.loaders.file_root / "deployments" / "tiny" / "files" / "supervisord.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text("[program:a]\ncommand=python app.py a\nnumprocs=%(ENV_NPROCS)s\n")
    deployment = tiny_app(tiny, out, env={"TINYAPP_OUT": str(out), "NPROCS": secret}, programs=())
    deployment["supervisord_conf"] = "salt://deployments/tiny/files/supervisord.conf"
    state = host.apply(host.pillar({"tiny": deployment}))[STATE]
    assert state["result"] is False
    assert "supervisord did not start" in state["comment"] and "<env:NPROCS>" in state["comment"], state["comment"]
    assert secret not in state["comment"]
