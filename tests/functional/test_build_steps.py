"""
A deployment's build steps (pillar ``build``): run once per release, as the
deployment's user, in the new release with its venv and env, before it
serves; a failing one keeps the old release serving and is not retried until
the release or the steps change.
"""

import json
import subprocess
import uuid

from tests.functional.conftest import report, tiny_app

STATE = "saltfleet-deployment-tiny"


def counted(out, name):
    """Each build step below appends a line to out/<name>.steps: the times it ran, by release."""
    steps = out / f"{name}.steps"
    return steps.read_text().splitlines() if steps.exists() else []


def step(name):
    """A step that says where it ran, with which Python and env (the venv's bin first on PATH)."""
    return (
        f'echo "$(git rev-parse HEAD) $(command -v python) $BUILD_LEVEL" >> "$TINYAPP_OUT/{name}.steps" && '
        "echo compiled > compiled.txt"
    )


def app(tiny, out, rev, build, **env):
    return tiny_app(tiny, out, rev=rev, env={"TINYAPP_OUT": str(out), **env}, build=build)


def test_steps_run_once_per_release_as_the_user_with_venv_and_env_before_it_serves(host, tiny, out):
    pillar = host.pillar({"tiny": app(tiny, out, "v1", [step("s"), ["sh", "-c", "id -u > uid.txt"]], BUILD_LEVEL="3")})
    dry = host.apply(pillar, test=True)[STATE]
    assert dry["result"] is None and len(dry["changes"]["build"]) == 2, dry
    assert "2 build step(s) would be run" in dry["comment"], dry["comment"]
    assert counted(out, "s") == [], "the dry run ran a build step"

    state = host.apply(pillar)[STATE]
    assert state["result"] is True, state
    assert "2 build step(s) were run" in state["comment"], state["comment"]
    release = host.paths("tiny")["project"]
    [line] = counted(out, "s")
    sha, python, level = line.split()
    assert sha == tiny["shas"]["v1"] and level == "3"
    venv = host.paths("tiny")["venvs"] / json.loads(host.paths("tiny")["manifest"].read_text())["venv"]
    assert python == str(venv / "bin" / "python"), python
    assert (release / "compiled.txt").read_text() == "compiled\n"
    assert int((release / "uid.txt").read_text()) == host.user.pw_uid
    assert report(out)["version"] == "1"

    # A no-op runs none, and a dry run of it lists none.
    again = host.apply(pillar)[STATE]
    assert again["changes"] == {} and counted(out, "s") == [line]
    assert "build" not in host.apply(pillar, test=True)[STATE]["changes"]


def test_a_failing_step_keeps_the_old_release_serving_and_is_not_retried(host, tiny, out):
    token = f"tok-{uuid.uuid4().hex[:12]}"
    host.apply(host.pillar({"tiny": app(tiny, out, "v1", [step("s")], API_TOKEN=token)}))
    serving = report(out)
    assert serving["version"] == "1"
    failing = [step("s"), 'echo "cannot reach the CDN with $API_TOKEN" >&2; exit 3']
    pillar = host.pillar({"tiny": app(tiny, out, "v2", failing, API_TOKEN=token)})

    state = host.apply(pillar)[STATE]
    assert state["result"] is False, state
    assert "exited 3" in state["comment"] and "cannot reach the CDN with <env:API_TOKEN>" in state["comment"], state
    assert token not in repr(state)
    # The old release serves still: the same program, the same process.
    assert report(out) == serving
    assert host.loaders.modules.deployment.status("tiny")["tiny"]["release"] == tiny["shas"]["v1"]

    # The user writes the token into why the release failed (their tree's marker): root hides it reading it back.
    marker = host.sf.saltfleet_paths.release(host.paths("tiny"), tiny["shas"]["v2"]) / ".git" / "saltfleet-failed"
    rewrite = "import json, sys; r = json.load(open(sys.argv[1])); r['reason'] = 'it said ' + sys.argv[2]; "
    rewrite += "json.dump(r, open(sys.argv[1], 'w'))"
    subprocess.run(["python3", "-c", rewrite, marker, token], user=host.user.pw_uid, group=host.user.pw_gid, check=True)

    # Not retried until the release or the steps change.
    ran = len(counted(out, "s"))
    again = host.apply(pillar)[STATE]
    assert again["result"] is False and "not run again until the release or the steps change" in again["comment"]
    assert "it said <env:API_TOKEN>" in again["comment"], again
    assert len(counted(out, "s")) == ran and token not in repr(again)
    fixed = host.apply(host.pillar({"tiny": app(tiny, out, "v2", [step("s")], API_TOKEN=token)}))[STATE]
    assert fixed["result"] is True, fixed
    assert report(out)["version"] == "2"
    assert counted(out, "s")[-1].split()[0] == tiny["shas"]["v2"]


def test_a_release_that_built_once_never_builds_again(host, tiny, out):
    for rev in ("v1", "v2"):
        assert host.apply(host.pillar({"tiny": app(tiny, out, rev, [step("s")])}))[STATE]["result"] is True
    ran = counted(out, "s")
    back = host.apply(host.pillar({"tiny": app(tiny, out, "v1", [step("s")])}))[STATE]
    assert back["result"] is True and "build" not in back["changes"], back
    assert report(out)["version"] == "1"
    assert counted(out, "s") == ran, "rolling back to a built release ran its build steps again"
