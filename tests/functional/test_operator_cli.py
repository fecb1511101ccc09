"""
What an operator reads on a host, through the loaders: verbs that pair
(``stop`` then ``start``), hints that name a command typed on the master, a
pinned rev that shows in ``deployment.status`` and in every ``state_output``,
``unpin`` saying what still serves, and a deployment without programs whose
error says how to refresh the master's file list.
"""

import pytest
import salt.loader
from salt.exceptions import CommandExecutionError

from tests.functional.conftest import report, tiny_app

# The loaders' minion id (tests/functional/conftest.py): what the operator types after `salt`.
ID = "functional"


@pytest.fixture
def pillar(host, tiny, out):
    return host.pillar({"tiny": tiny_app(tiny, out, programs=["a", "b"])})


@pytest.fixture
def mod(host, pillar):
    host.apply(pillar)
    return host.loaders.modules.deployment


def test_start_after_stop_brings_back_the_same_release_and_programs(mod, tiny, out):
    before = report(out, "a")["pid"]
    assert mod.stop("tiny") == {"stopped": ["a", "b"]}
    assert mod.status("tiny")["tiny"]["supervisord"] == "stopped"
    assert mod.start("tiny") == {"running": ["a", "b"]}
    status = mod.status("tiny")["tiny"]
    assert (status["state"], status["release"]) == ("up", tiny["shas"]["v1"])
    assert status["programs"] == {"a": "RUNNING", "b": "RUNNING"}
    assert report(out, "a")["pid"] != before
    # Stopping what is stopped stops nothing, and says so in the same shape.
    assert mod.stop("tiny") == {"stopped": ["a", "b"]}
    assert mod.stop("tiny") == {"stopped": []}
    assert mod.start("tiny") == {"running": ["a", "b"]}


def test_every_hint_names_a_command_that_works_on_the_master(mod):
    mod.stop("tiny")
    for verb, args in ((mod.restart, []), (mod.force_restart, []), (mod.supervisorctl, ["status"])):
        with pytest.raises(CommandExecutionError) as error:
            verb("tiny", *args)
        assert f"`salt {ID} deployment.start tiny` starts it" in str(error.value)
        assert "salt-call" not in str(error.value)
    with pytest.raises(CommandExecutionError, match=rf"`salt {ID} deployment.list` shows those that are"):
        mod.status("nosuch")
    mod.start("tiny")
    mod.hold("tiny", "a", reason="db maintenance")
    with pytest.raises(CommandExecutionError, match=rf"held \(db maintenance\); `salt {ID} deployment.unhold tiny`"):
        mod.start("tiny", "a")


def test_a_pinned_rev_shows_in_status_and_in_every_state_output(mod, host, pillar, tiny):
    assert mod.status("tiny")["tiny"]["pinned"] is None
    assert mod.update_code("tiny", "v2")["result"] is True
    pin = mod.status("tiny")["tiny"]["pinned"]
    assert (pin["rev"], pin["by"]) == ("v2", "deployment.update_code")
    state = host.apply(pillar)["saltfleet-deployment-tiny"]
    assert state["changes"] == {}
    [warning] = state["warnings"]
    assert "rev 'v2' set by deployment.update_code at" in warning and "pillar says 'v1'" in warning
    assert f"`salt {ID} deployment.unpin tiny` follows pillar again" in warning
    # Salt's highstate output, as a master with `state_output: changes` (the demo's) or terse prints it.
    for mode in ("changes", "terse", "full"):
        opts = {**host.loaders.opts, "state_output": mode, "color": False}
        text = salt.loader.outputters(opts)["highstate"]({ID: {"deployment_|-tiny_|-tiny_|-present": state}})
        assert "rev 'v2' set by deployment.update_code" in text, (mode, text)


def test_unpin_says_what_still_serves_until_the_next_apply(mod, host, pillar, tiny, out):
    mod.update_code("tiny", "v2")
    unpinned = mod.unpin("tiny")
    assert (unpinned["pinned"], unpinned["rev"], unpinned["serving"]) == (False, "v1", tiny["shas"]["v2"])
    assert f"serves {tiny['shas']['v2'][:12]} until `salt {ID} state.apply` deploys v1" in unpinned["comment"], unpinned
    assert report(out)["version"] == "2"
    host.apply(pillar)
    assert report(out)["version"] == "1"
    assert "was not pinned" in mod.unpin("tiny")["comment"]


def test_after_a_pin_to_the_commit_pillar_names_the_next_apply_records_pillars_rev(mod, host, pillar, tiny):
    mod.update_code("tiny", tiny["shas"]["v1"])
    assert mod.status("tiny")["tiny"]["rev"] == tiny["shas"]["v1"]
    mod.unpin("tiny")
    state = host.apply(pillar)["saltfleet-deployment-tiny"]
    assert state["changes"] == {"rev": {"old": tiny["shas"]["v1"], "new": "v1"}}, state
    assert f"rev was recorded as v1: it names {tiny['shas']['v1'][:12]}, which serves already" in state["comment"]
    assert mod.status("tiny")["tiny"]["rev"] == "v1"
    assert host.apply(pillar)["saltfleet-deployment-tiny"]["changes"] == {}


def test_a_comment_of_plural_changes_reads_were(mod, host, tiny, out):
    more = host.pillar({"tiny": tiny_app(tiny, out, programs=["a", "b", "c"])})
    state = host.apply(more)["saltfleet-deployment-tiny"]
    assert "programs were updated: added c" in state["comment"], state["comment"]


def test_a_deployment_without_programs_says_the_masters_file_list_may_be_stale(host, tiny, out):
    spec = tiny_app(tiny, out)
    del spec["programs"]
    state = host.apply(host.pillar({"tiny": spec}))["saltfleet-deployment-tiny"]
    assert state["result"] is False
    assert "deployments:tiny:programs: the deployment runs nothing" in state["comment"]
    assert "up to fileserver_list_cache_time seconds old" in state["comment"]
    assert "`salt-run fileserver.clear_file_list_cache` refreshes it" in state["comment"]
