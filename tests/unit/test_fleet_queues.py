"""fleet.queues from a master's cache (the mine's deployment.status rows), no daemons."""

from tests.unit.test_inventory import add_minion, load_runner


def row(workers):
    """A deployment.status row of the mine, with its serving Celery workers."""
    return {"release": "a" * 40, "supervisord": "running", "programs": {}, "running": 0, "workers": workers}


def mine(deployments, heartbeat="30"):
    return {"saltfleet.heartbeat": heartbeat, "deployment.status": deployments}


def test_each_queue_lists_its_consumers_across_the_fleet(master_opts):
    add_minion(
        master_opts,
        "w1",
        mine=mine(
            {
                "fetcher": row(
                    {
                        "fetcher-alpha.g2@w1": {"queues": ["fetch.alpha"], "active": 1},
                        "fetcher-both.g2@w1": {"queues": ["fetch.alpha", "fetch.beta"], "active": 0},
                    }
                ),
                "reporter": row({"reporter.g1@w1": {"queues": ["reports"], "active": 2}}),
            }
        ),
        age=5,
    )
    add_minion(
        master_opts,
        "w2",
        mine=mine({"fetcher": row({"fetcher-alpha.g1@w2": {"queues": ["fetch.alpha"], "active": 0}})}),
        age=5,
    )
    report = load_runner(master_opts).queues()
    assert report["unanswered"] == []
    assert sorted(report["queues"]) == ["fetch.alpha", "fetch.beta", "reports"]
    alpha = report["queues"]["fetch.alpha"]
    assert alpha["up"] == 3
    assert [(c["minion"], c["deployment"], c["node"], c["active"]) for c in alpha["consumers"]] == [
        ("w1", "fetcher", "fetcher-alpha.g2@w1", 1),
        ("w1", "fetcher", "fetcher-both.g2@w1", 0),
        ("w2", "fetcher", "fetcher-alpha.g1@w2", 0),
    ]
    assert [c["node"] for c in report["queues"]["fetch.beta"]["consumers"]] == ["fetcher-both.g2@w1"]
    assert report["queues"]["reports"]["consumers"][0]["active"] == 2


def test_filters_by_deployment_minion_and_queue(master_opts):
    add_minion(
        master_opts,
        "w1",
        mine=mine(
            {
                "fetcher": row({"f.g1@w1": {"queues": ["fetch.alpha", "fetch.beta"], "active": 0}}),
                "reporter": row({"r.g1@w1": {"queues": ["reports"], "active": 0}}),
            }
        ),
    )
    add_minion(master_opts, "w2", mine=mine({"fetcher": row({"f.g1@w2": {"queues": ["fetch.alpha"], "active": 0}})}))
    runner = load_runner(master_opts)
    assert sorted(runner.queues(deployment="reporter")["queues"]) == ["reports"]
    assert sorted(runner.queues(queue="fetch.*")["queues"]) == ["fetch.alpha", "fetch.beta"]
    only_w2 = runner.queues(tgt="w2")["queues"]
    assert list(only_w2) == ["fetch.alpha"]
    assert [c["minion"] for c in only_w2["fetch.alpha"]["consumers"]] == ["w2"]


def test_a_down_minion_and_workers_that_did_not_answer(master_opts):
    add_minion(
        master_opts,
        "quiet",
        mine=mine({"fetcher": row({"f.g1@quiet": {"queues": ["fetch"], "active": 3}})}, heartbeat="10"),
        age=600,
    )
    add_minion(
        master_opts, "live", mine=mine({"fetcher": row({"f.g4@live": {"queues": ["fetch"], "active": 0}})}), age=1
    )
    add_minion(
        master_opts, "deaf", mine=mine({"fetcher": row({"error": "asking the Celery workers of app tasks failed"})})
    )
    report = load_runner(master_opts).queues()
    fetch = report["queues"]["fetch"]
    assert fetch["up"] == 1, "the consumer of a minion that stopped reporting does not count as up"
    assert {c["minion"]: c["status"] for c in fetch["consumers"]} == {"live": "up", "quiet": "down"}
    assert report["unanswered"] == [
        {"minion": "deaf", "deployment": "fetcher", "error": "asking the Celery workers of app tasks failed"}
    ]


def test_deployments_without_celery_workers_and_old_rows(master_opts):
    plain = {"release": "a" * 40, "supervisord": "running", "programs": {"web": "RUNNING"}, "running": 1}
    add_minion(master_opts, "w1", mine=mine({"web": plain, "fetcher": row({})}))
    add_minion(master_opts, "w2", mine={"saltfleet.heartbeat": "30"})
    add_minion(master_opts, "w3")
    assert load_runner(master_opts).queues() == {"queues": {}, "unanswered": [], "bad data": []}


def test_without_out_a_table_for_people(master_opts):
    master_opts["output"] = None
    add_minion(
        master_opts, "w1", mine=mine({"fetcher": row({"f.g2@w1": {"queues": ["fetch.alpha"], "active": 1}})}), age=1
    )
    add_minion(master_opts, "w2", mine=mine({"fetcher": row({"error": "no broker"})}), age=1)
    text = load_runner(master_opts).queues()
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["QUEUE", "CONSUMERS"]
    assert lines[1].split() == ["fetch.alpha", "1", "up/1", "f.g2@w1", "(1)"]
    assert lines[2] == "not answering: fetcher on w2: no broker"
