"""
Attacks on the deployment's secrets from the app's side: what its code
prints comes back to root (a state comment, the job cache) with the env's
values hidden. Each test is one attack, run for real as the deployment's
user; it passes when the attack fails.
"""

import uuid

from tests.functional.conftest import tiny_app

STATE = "saltfleet-deployment-tiny"
# What root keeps of a command's output: its last bytes (saltfleet_user.OUTPUT_LIMIT).
LIMIT = 1 << 20
# How many of the secret's first characters fall before the kept part.
CUT = 6


def cut_through(token):
    """
    A shell script that prints ``$API_TOKEN`` so that the kept part of its
    output begins CUT characters into the value: the rest of the secret is
    left whole at the start of what root reads, where no whole value matches.
    """
    filler = LIMIT - (len(token) - CUT) - 2
    return f'printf "%s\\n" "$API_TOKEN"; head -c {filler} /dev/zero | tr "\\0" y; printf "\\n"'


def secret_app(tiny, out, token, **spec):
    return tiny_app(tiny, out, env={"TINYAPP_OUT": str(out), "API_TOKEN": token}, **spec)


def test_a_build_step_cannot_leak_most_of_the_secret_through_the_kept_tail(host, tiny, out):
    token = f"tok-{uuid.uuid4().hex}"
    step = cut_through(token) + "; exit 4"
    state = host.apply(host.pillar({"tiny": secret_app(tiny, out, token, build=[step])}))[STATE]
    assert state["result"] is False and "exited 4" in state["comment"], state["comment"][:300]
    leaked = token[CUT:]
    assert leaked not in state["comment"], f"the state comment holds {leaked!r}, all of API_TOKEN but {CUT} chars"


def test_deployment_run_cannot_return_most_of_the_secret_through_the_kept_tail(host, tiny, out):
    token = f"tok-{uuid.uuid4().hex}"
    assert host.apply(host.pillar({"tiny": secret_app(tiny, out, token)}))[STATE]["result"] is True
    ret = host.loaders.modules.deployment.run("tiny", "sh", "-c", cut_through(token))
    leaked = token[CUT:]
    assert leaked not in ret["stdout"], f"deployment.run returned {leaked!r}, all of API_TOKEN but {CUT} chars"


def test_a_build_step_cannot_leak_a_one_line_secret_that_python_splits_as_lines(host, tiny, out):
    # One line as the schema counts lines (no CR, LF or NUL), two as str.splitlines does (\x1e, \x0c, \u2028...).
    first, second = uuid.uuid4().hex, uuid.uuid4().hex
    token = f"tok-{first}\x1e{second}"
    step = 'printf "%s\\n" "$API_TOKEN"; exit 4'
    state = host.apply(host.pillar({"tiny": secret_app(tiny, out, token, build=[step])}))[STATE]
    assert state["result"] is False and "exited 4" in state["comment"], state["comment"][:300]
    assert first not in state["comment"] and second not in state["comment"], state["comment"]
