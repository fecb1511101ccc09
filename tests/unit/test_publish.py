"""
A rollout's job (saltfleet_jobs.publish): a return counts only as the
master stored it from the minion it names, and a job ends at its deadline
whatever a host says.
"""

import threading

import pytest
import salt.client

from localfleet.config import saltfleet_utils
from tests.unit.test_hostile_minion_data import Minions

utils = saltfleet_utils()
rollout, jobs = utils.saltfleet_rollout, utils.saltfleet_jobs


def deployed(minion, fun):
    return {"result": True, "release": "b" * 40, "comment": f"{minion} deployed"}


@pytest.fixture
def publish(master_opts, monkeypatch):
    def run(minions, hosts, timeout=2):
        monkeypatch.setattr(salt.client, "get_local_client", minions)
        # The module's own globals, as the loader loaded them: its wait for the job cache, short.
        monkeypatch.setitem(jobs.publish.func.__globals__, "STORED_WAIT", 0.5)
        return jobs.publish(master_opts, hosts, "deployment.update_code", ["fetcher", "v2"], timeout=timeout)

    return run


def test_a_return_another_minion_fires_under_a_hosts_id_counts_for_nothing(publish):
    # w2 never returned: an event under its id says it deployed, which the master holds no return for.
    forged = {"w2": {"result": True, "release": "f" * 40, "comment": "deployed, says someone"}}
    minions = Minions(deployed, forged=forged)
    jid, returns = publish(minions, ["w1", "w2"])
    assert sorted(returns) == ["w1"], returns
    assert returns["w1"]["ret"]["comment"] == "w1 deployed"
    assert rollout.outcome(returns.get("w2")) == {"outcome": "no answer"}
    assert jid


def test_a_host_that_never_returns_ends_the_job_at_its_deadline(publish):
    """A host that keeps saying it runs the job (saltutil.find_job) holds the rollout no longer than its deadline."""
    minions = Minions(deployed, silent=["w2"])
    box = {}
    worker = threading.Thread(target=lambda: box.update(ret=publish(minions, ["w1", "w2"], timeout=1)), daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "publish still waits on a host that never returns"
    _, returns = box["ret"]
    assert sorted(returns) == ["w1"]
