"""
The fleet page in Debian's headless Chromium (selenium), against a real
salt-master, two real minions running the sample Celery app as the
unprivileged test user, and salt-api (rest_cherrypy) serving page/ with
etc/master.d/saltfleet-page.conf's settings and a file eauth of its own.

One master, two minions, one salt-api and one browser for the module. The
first minion hosts pg-a and pg-b (pg-b at a commit whose subject is markup),
the second pg-a; pg-a's workers share a queue with a floor of 1. Screenshots
of each view go to .test-output/page/ (SALTFLEET_TEST_OUTPUT to move it).
"""

import contextlib
import datetime
import json
import os
import re
import shutil
from pathlib import Path

import git
import pytest
import requests
import yaml
from saltfactories.utils import random_string
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.common.by import By

from localfleet.api import ACT, READ, page_settings, write_users
from localfleet.browser import OBSERVE_ROLLOUT, Chromium
from localfleet.config import REPO, stop_deployments
from localfleet.daemons import free_ports
from tests.apps import commit, sample_repo
from tests.conftest import broker_folder, sandbox_root, short_tmpdir, wait_for

HOSTILE = "<img src=x onerror=alert(1)>"
USERS = {
    "operator": [{"@runner": [ACT]}],
    "viewer": [{"@runner": [READ]}],
    # May read, and deploy pg-a only (anchored: Salt matches from the start of the value).
    "fetcher": [{"@runner": [READ, {r"fleet\.deploy$": {"args": ["pg-a$"]}}]}],
}
OUTPUT = Path(os.environ.get("SALTFLEET_TEST_OUTPUT", REPO / ".test-output")) / "page"
VIEWS = ("hosts", "deployments", "queues", "rollout", "history")


# ------------------------------------------------------------------ daemons


@pytest.fixture(scope="module")
def users(tmp_path_factory):
    path = tmp_path_factory.mktemp("eauth") / "users"
    return path, write_users(path, USERS)


@pytest.fixture(scope="module")
def salt_master(salt_factories, saltfleet_master_config, pillar_dir, users):
    """A master with the fleet page's settings: salt-api's rest_cherrypy on a free loopback port, a file eauth."""
    [port] = free_ports(1)
    overrides = {**saltfleet_master_config, **page_settings(port, users[0], USERS)}
    overrides.update(pillar_roots={"base": [str(pillar_dir)]}, interface="127.0.0.1")
    factory = salt_factories.salt_master_daemon(random_string("page-"), overrides=overrides)
    with factory.started(start_timeout=120):
        yield factory


@pytest.fixture(scope="module")
def api_url(salt_master):
    factory = salt_master.salt_api_daemon()
    with factory.started(start_timeout=120):
        yield f"http://127.0.0.1:{salt_master.config['rest_cherrypy']['port']}"


@pytest.fixture(scope="module")
def minions(salt_master):
    factories = sorted(
        (salt_master.salt_minion_daemon(random_string(f"pg{n}-")) for n in (1, 2)), key=lambda factory: factory.id
    )
    with contextlib.ExitStack() as stack:
        for factory in factories:
            stack.enter_context(factory.started(start_timeout=120))
        yield [factory.id for factory in factories]


def hostile_branch(bare):
    """Branch ``hostile`` of the sample app: v1 plus a commit whose subject is markup."""
    work = Path(bare).parent / "hostile-work"
    repo = git.Repo.clone_from(str(bare), work, branch="master")
    repo.git.checkout("-b", "hostile", "v1")
    (work / "NOTES").write_text("a commit whose subject is markup\n")
    sha = commit(work, HOSTILE)
    repo.remote().push("hostile")
    shutil.rmtree(work, ignore_errors=True)
    return sha


@pytest.fixture(scope="module")
def fleet(salt_master, salt_cli, minions, pillar_dir, deploy_user, user_uv_cache, second_user, second_uv_cache):
    """
    pg-a on both hosts (own queue and pg-a.shared, floor 1), pg-b at
    ``hostile`` on the first (as a user of its own, with its own broker
    folder); converged.
    """
    base = short_tmpdir("sfp-")
    repo, shas = sample_repo(base)
    shas["hostile"] = hostile_branch(repo)
    data, data_b = broker_folder(deploy_user), broker_folder(second_user)
    roots = [sandbox_root("sfq-", deploy_user) for _ in minions]

    def spec(rev, queues, node, floors=None, broker=data):
        command = f"celery -A sampleapp worker -Q {','.join(queues)} -c 1 -n {node}@%%h"
        found = {"repo": str(repo), "rev": rev, "env": {"SAMPLEAPP_DATA": str(broker)}}
        found["programs"] = {"worker": {"command": command, "startsecs": 3}}
        return {**found, "min_consumers": floors} if floors else found

    top = {"base": {"*": ["fleet"], **{minion: [f"host{n}"] for n, minion in enumerate(minions, 1)}}}
    shutil.copyfile(REPO / "pillar" / "fleet.sls", pillar_dir / "fleet.sls")
    (pillar_dir / "top.sls").write_text(yaml.safe_dump(top))
    for n, root in enumerate(roots, 1):
        deployments = {"pg-a": spec("v1", [f"pg-a.h{n}", "pg-a.shared"], f"pg-a-h{n}", {"pg-a.shared": 1})}
        if n == 1:
            own = {"user": second_user.pw_name, "uv_cache": str(second_uv_cache)}
            deployments["pg-b"] = {**spec("hostile", ["pg-b.h1"], "pg-b-h1", broker=data_b), **own}
        host = {"root": str(root), "user": deploy_user.pw_name, "uv_cache": str(user_uv_cache)}
        (pillar_dir / f"host{n}.sls").write_text(yaml.safe_dump({"saltfleet": host, "deployments": deployments}))
    tgt = ",".join(minions)
    for step in (("saltutil.sync_all",), ("saltutil.refresh_pillar", "wait=True"), ("state.apply", "fleet")):
        ret = salt_cli.run("-L", *step, minion_tgt=tgt, _timeout=900)
        assert ret.returncode == 0, ret

    def both_consume():
        # A worker that had not answered yet when its host told the master is in its next report.
        salt_cli.run("-L", "deployment.report", minion_tgt=tgt, _timeout=120)
        queues = salt_master.salt_run_cli(timeout=120).run("fleet.queues", "queue=pg-a.shared").data
        return ((queues or {}).get("queues", {}).get("pg-a.shared") or {}).get("up") == len(minions)

    # The floor of pg-a.shared counts what the hosts told the master: both consume it before any test deploys.
    wait_for(both_consume, 180, "both hosts' pg-a workers in fleet.queues")
    yield {"minions": minions, "repo": repo, "shas": shas, "roots": roots}
    for root in roots:
        stop_deployments(root, timeout=60)
    for path in (base, data, data_b, *roots):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    with Chromium() as driver:
        yield driver


# ------------------------------------------------------------------ helpers


def logs(salt_master):
    """The master's log and salt-api's (Salt reads a relative path from root_dir)."""
    root = Path(salt_master.config["root_dir"])
    return [root / salt_master.config[key] for key in ("log_file", "api_logfile")]


def salt_run(salt_run_cli, *args):
    ret = salt_run_cli.run(*args, "--out=json")
    assert ret.returncode == 0, ret
    return ret.data


def inventory(salt_run_cli):
    return {row["id"]: row for row in salt_run(salt_run_cli, "fleet.inventory")}


def ledger(salt_master):
    path = Path(salt_master.config["cachedir"]) / "saltfleet" / "ledger.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def find(driver, css):
    return driver.find_elements(By.CSS_SELECTOR, css)


def login(driver, url, user, password, expect_app=True):
    """Open the page afresh (no session kept), log in through its form."""
    driver.get(f"{url}/fleet")
    driver.execute_script("sessionStorage.clear()")
    driver.get(f"{url}/fleet")
    wait_for(lambda: find(driver, "#username") and find(driver, "#username")[0].is_displayed(), 30, "the login form")
    for field, value in (("username", user), ("password", password), ("eauth", "file")):
        element = driver.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    driver.get_log("browser")  # what earlier pages logged is not this one's
    driver.find_element(By.ID, "login-button").click()
    if expect_app:
        wait_for(lambda: find(driver, "#hosts-table tbody tr[data-host]"), 60, f"the hosts table for {user}")
        # The page's second read (with the queues' floors) draws the views again: what a test clicks comes after.
        wait_for(lambda: find(driver, '#app[data-floors="read"]'), 60, f"the queues' floors for {user}")


def show(driver, view):
    driver.find_element(By.CSS_SELECTOR, f'nav button[data-view="{view}"]').click()
    section = driver.find_element(By.ID, f"view-{view}")
    wait_for(section.is_displayed, 10, f"the {view} view")
    return section


def screenshot(driver, name):
    OUTPUT.mkdir(parents=True, exist_ok=True)
    path = OUTPUT / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def rows_of(driver, css):
    """The rows matching ``css``, read at once in the page: [{jid, host, cells: [their text]}]."""
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(tr => ({jid: tr.dataset.jid || null,"
        " host: tr.dataset.host || null, cells: [...tr.cells].map(td => td.innerText.trim())}))",
        css,
    )


def session_token(driver):
    return json.loads(driver.execute_script("return sessionStorage.getItem('saltfleet.session')") or "null")["token"]


def post(url, token, lowstate):
    headers = {"X-Auth-Token": token, "Accept": "application/json"}
    return requests.post(url, json=lowstate, headers=headers, timeout=120)


def no_alert(driver):
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018


def console_errors(driver):
    """The page's console errors, save a missing favicon."""
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and "favicon" not in e["message"]]


def epoch_ms(stamp):
    return datetime.datetime.fromisoformat(stamp).timestamp() * 1000


def line_key(rid, line):
    parts = (line.get(k) for k in ("event", "batch", "minion", "step", "at", "jid", "elapsed"))
    return "|".join([rid, *("" if v is None else str(v) for v in parts)])


# ------------------------------------------------------------------ tests


def test_the_hosts_table_holds_exactly_what_fleet_inventory_returns(
    browser, api_url, users, fleet, salt_run_cli, record_property
):
    wait_for(
        lambda: all(
            set(row["deployments"]) >= {"pg-a"} and row["status"] == "up" for row in inventory(salt_run_cli).values()
        ),
        120,
        "both hosts up with their deployments in fleet.inventory",
    )
    login(browser, api_url, "operator", users[1]["operator"])
    rows = {}
    for tr in find(browser, "#hosts-table tbody tr[data-host]"):
        cells = tr.find_elements(By.TAG_NAME, "td")
        shown = {
            el.get_attribute("data-deployment"): el.find_element(By.TAG_NAME, "code").text
            for el in tr.find_elements(By.CSS_SELECTOR, ".host-deployment")
        }
        rows[cells[0].text] = {"status": cells[1].text, "provider": cells[2].text, "deployments": shown}
    expected = inventory(salt_run_cli)
    assert sorted(rows) == sorted(expected) == sorted(fleet["minions"])
    for minion, row in expected.items():
        assert rows[minion]["status"] == row["status"]
        assert rows[minion]["provider"] == (row["provider"] or "-")
        assert rows[minion]["deployments"] == {n: (d["release"] or "-")[:10] for n, d in row["deployments"].items()}
    shots = [screenshot(browser, "hosts")]
    queue = show(browser, "queues").find_element(By.CSS_SELECTOR, 'tr[data-queue="pg-a.shared"]')
    assert [td.text for td in queue.find_elements(By.TAG_NAME, "td")[1:3]] == ["2 up / 2", "1 (pg-a)"]
    for view in VIEWS[1:]:
        show(browser, view)
        shots.append(screenshot(browser, view))
    assert console_errors(browser) == []
    record_property("report", f"screenshots: {', '.join(str(s) for s in shots)}")


def test_a_deploy_form_being_filled_in_outlives_the_pages_refreshes(browser, api_url, users, fleet):
    """The page reads the fleet again (its floors just after login, then every minute): a half-typed rev stays."""
    login(browser, api_url, "operator", users[1]["operator"])
    card = show(browser, "deployments").find_element(By.CSS_SELECTOR, 'section[data-deployment="pg-a"]')
    card.find_element(By.CSS_SELECTOR, '[data-action="deploy"]').click()
    rev = card.find_element(By.CSS_SELECTOR, 'input[name="rev"]')
    rev.send_keys("release-2")
    for _ in range(2):
        browser.find_element(By.ID, "refresh").click()
        wait_for(lambda: browser.find_element(By.ID, "status").text.startswith("Read "), 60, "the refresh")
        browser.execute_script("document.getElementById('status').textContent = ''")
    assert rev.get_attribute("value") == "release-2" and rev.is_displayed()


def test_a_rollout_started_from_the_page_shows_batch_by_batch_then_in_history(
    browser, api_url, users, fleet, salt_master, salt_run_cli, record_property
):
    first, second = fleet["minions"]
    login(browser, api_url, "operator", users[1]["operator"])
    browser.execute_script(OBSERVE_ROLLOUT)
    card = show(browser, "deployments").find_element(By.CSS_SELECTOR, 'section[data-deployment="pg-a"]')
    card.find_element(By.CSS_SELECTOR, '[data-action="deploy"]').click()
    card.find_element(By.CSS_SELECTOR, 'input[name="rev"]').send_keys("v2")
    before = len(ledger(salt_master))

    # Asked first; cancelled, nothing changes.
    card.find_element(By.CSS_SELECTOR, '[data-action="deploy-submit"]').click()
    wait_for(browser.find_element(By.ID, "confirm").is_displayed, 10, "the confirmation")
    assert "Deploy v2 of pg-a to its 2 host(s), 1 per batch?" in browser.find_element(By.ID, "confirm-text").text
    browser.find_element(By.ID, "confirm-no").click()
    assert browser.find_element(By.ID, "status").text == "Nothing was changed."
    assert len(ledger(salt_master)) == before

    card.find_element(By.CSS_SELECTOR, '[data-action="deploy-submit"]').click()
    wait_for(browser.find_element(By.ID, "confirm").is_displayed, 10, "the confirmation")
    browser.find_element(By.ID, "confirm-yes").click()
    status = browser.find_element(By.ID, "status")
    rid = wait_for(lambda: re.search(r"started \(job (\d+)\)", status.text), 60, "the rollout started").group(1)
    article = f'article[data-rollout="{rid}"]'
    wait_for(
        lambda: find(browser, f'{article} .rollout-state[data-state="complete"]'),
        600,
        "the rollout complete on the page",
        logs=logs(salt_master),
    )
    shots = [screenshot(browser, "rollout-complete")]

    lines = [line for line in ledger(salt_master) if line.get("id") == rid]
    assert [(line["event"], line.get("batch"), line.get("minion")) for line in lines] == [
        ("start", None, None),
        ("batch", 1, None),
        ("host", 1, first),
        ("batch", 2, None),
        ("host", 2, second),
        ("end", None, None),
    ]
    seen = {item["key"]: item for item in browser.execute_script("return window.__seen")}
    shown = [seen.get(line_key(rid, line)) for line in lines]
    assert all(shown), f"lines the page never showed: {[k for k, s in zip(lines, shown, strict=True) if not s]}"
    assert [s["shown"] for s in shown] == sorted(s["shown"] for s in shown)
    stamps = [epoch_ms(s["stamp"]) for s in shown]
    # Live: batch 1 was on the page before the first host answered, the first host's outcome before the second's.
    assert shown[1]["shown"] < stamps[2]
    assert shown[2]["shown"] < stamps[4]
    latency = max(s["shown"] - stamp for s, stamp in zip(shown, stamps, strict=True))
    outcomes = {row["host"]: row["cells"][2] for row in rows_of(browser, f"{article} tbody tr")}
    assert outcomes == {first: "deployed", second: "deployed"}

    show(browser, "history")

    def history_with_it():
        rows = rows_of(browser, "#history-table tbody tr")
        return rows if any(row["jid"] == rid for row in rows) else None

    history = wait_for(history_with_it, 60, "the finished rollout in the history")
    assert history[0]["jid"] == rid, "the newest entry comes first"
    cells = history[0]["cells"]
    assert cells[1:5] == ["operator", "fleet.deploy", "pg-a", "v2"]
    assert cells[5] == "complete: 2 hosts in 2 batches on v2"
    [recorded] = [item for item in salt_run(salt_run_cli, "fleet.history", "limit=0") if item.get("jid") == rid]
    assert (recorded["who"], recorded["outcome"]) == ("operator", cells[5])
    shots.append(screenshot(browser, "history-after-rollout"))
    record_property("report", f"progress lines on the page at most {latency:.0f} ms after the runner fired them")


def test_a_read_only_user_sees_no_action_and_their_forged_deploy_is_refused(
    browser, api_url, users, fleet, salt_master
):
    login(browser, api_url, "viewer", users[1]["viewer"])
    for view in VIEWS:
        show(browser, view)
    assert find(browser, "section[data-deployment]"), "the deployments view shows nothing"
    assert find(browser, "[data-action]") == []
    token = session_token(browser)
    before = ledger(salt_master)
    for client in ("runner_async", "runner"):
        forged = [{"client": client, "fun": "fleet.deploy", "arg": ["pg-a"], "kwarg": {"rev": "v2"}}]
        assert post(api_url, token, forged).status_code == 401
    rollback = [{"client": "runner_async", "fun": "fleet.rollback", "arg": ["pg-a"]}]
    assert post(api_url, token, rollback).status_code == 401
    assert ledger(salt_master) == before
    # The same token still reads: the refusals are Salt's ACL, not a broken session.
    read = post(api_url, token, [{"client": "runner", "fun": "fleet.overview"}])
    assert read.status_code == 200 and "pg-a" in read.json()["return"][0]["deployments"]


def test_a_user_allowed_one_deployment_sees_and_can_call_it_for_that_one_only(browser, api_url, users, fleet):
    login(browser, api_url, "fetcher", users[1]["fetcher"])
    view = show(browser, "deployments")
    offered = view.find_elements(By.CSS_SELECTOR, 'section[data-deployment="pg-a"] button[data-action]')
    assert [b.get_attribute("data-action") for b in offered if b.is_displayed()] == ["deploy"]
    assert view.find_elements(By.CSS_SELECTOR, 'section[data-deployment="pg-b"] [data-action]') == []
    token = session_token(browser)
    other = [{"client": "runner", "fun": "fleet.deploy", "arg": ["pg-b"], "kwarg": {"rev": "v2", "test": True}}]
    assert post(api_url, token, other).status_code == 401
    # Allowed for pg-a: a dry run (test=True changes nothing) goes through.
    own = post(api_url, token, [{**other[0], "arg": ["pg-a"]}])
    assert own.status_code == 200, own.text
    report = own.json()["return"][0]
    assert (report["deployment"], report["test"]) == ("pg-a", True)


def test_markup_in_a_commit_subject_and_a_hold_reason_shows_as_text_and_runs_nothing(
    browser, api_url, users, fleet, salt_cli, salt_run_cli
):
    first = fleet["minions"][0]
    ret = salt_cli.run("deployment.hold", "pg-b", "worker", f"reason={HOSTILE}", minion_tgt=first, _timeout=300)
    assert ret.returncode == 0, ret

    def overview_holds():
        row = salt_run(salt_run_cli, "fleet.overview")["deployments"]["pg-b"]["hosts"][first]
        return row["subject"] == HOSTILE and row["held"] == {"worker": HOSTILE}

    wait_for(overview_holds, 120, "fleet.overview with pg-b's subject and hold reason")
    login(browser, api_url, "operator", users[1]["operator"])
    row = show(browser, "deployments").find_element(
        By.CSS_SELECTOR, f'section[data-deployment="pg-b"] tr[data-host="{first}"]'
    )
    assert row.find_element(By.CSS_SELECTOR, "td.subject").text == HOSTILE
    assert row.find_element(By.CSS_SELECTOR, "td.held-cell").text == f"worker: {HOSTILE}"
    assert find(browser, "img") == []
    no_alert(browser)
    screenshot(browser, "markup-as-text")
    # The policy itself: an inline script put into the page does not run.
    browser.execute_script(
        "const s = document.createElement('script'); s.textContent = 'window.__inline = 1'; document.head.append(s);"
    )
    assert browser.execute_script("return window.__inline === undefined")
    policy = browser.find_element(By.CSS_SELECTOR, 'meta[http-equiv="Content-Security-Policy"]').get_attribute(
        "content"
    )
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    no_alert(browser)


def test_a_wrong_password_is_refused_and_logging_out_revokes_the_token(browser, api_url, users, fleet, salt_master):
    login(browser, api_url, "operator", "not-the-password", expect_app=False)
    error = wait_for(lambda: browser.find_element(By.ID, "login-error").text, 30, "the login refused")
    assert error.startswith("Login refused: salt-api answered 401")
    assert not browser.find_element(By.ID, "app").is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('saltfleet.session')") is None
    wrong = requests.post(f"{api_url}/login", json={"username": "viewer", "password": "x", "eauth": "file"}, timeout=30)
    assert wrong.status_code == 401

    login(browser, api_url, "operator", users[1]["operator"])
    token = session_token(browser)
    read = [{"client": "runner", "fun": "fleet.overview"}]
    assert post(api_url, token, read).status_code == 200
    # While it lives, the token is in no URL the page asked for, no log and no job of the job cache.
    urls = browser.execute_script(
        "return [location.href, ...performance.getEntriesByType('resource').map(e => e.name)]"
    )
    assert not [u for u in urls if token in u]
    for path in logs(salt_master):
        assert path.stat().st_size, f"{path} is empty: nothing to look for the token in"
        assert token not in path.read_text(errors="replace"), path
    jobs = Path(salt_master.config["cachedir"]) / "jobs"
    assert [p for p in jobs.rglob("*") if p.is_file() and token.encode() in p.read_bytes()] == []

    browser.find_element(By.ID, "logout").click()
    wait_for(lambda: browser.find_element(By.ID, "login").is_displayed(), 30, "the login form after logging out")
    assert browser.execute_script("return sessionStorage.getItem('saltfleet.session')") is None
    # Revoked: salt-api refuses it for the API and the event stream alike.
    assert post(api_url, token, read).status_code == 401
    events = requests.get(f"{api_url}/events", headers={"X-Auth-Token": token}, stream=True, timeout=30)
    assert events.status_code == 401


NEW, OLD = "c" * 40, "a" * 40
THRESHOLDS = {"max_failure_rate": 0.5, "failure_margin": 0.1, "runtime_ratio": 2.0, "min_tasks": 20}
THRESHOLDS |= {"inconclusive": "pause", "confidence": 0.99, "window": 3}
INCONCLUSIVE = f"12 tasks of the new release finished, fewer than min_tasks (20) {HOSTILE}"


def figures(succeeded, failed, retried, p50, p95):
    """A release's figures as an analysis line carries them, one task name (markup) among its tasks."""
    row = {"succeeded": succeeded, "failed": failed, "retried": retried, "p50": p50, "p95": p95}
    row["failure_rate"] = round(failed / (succeeded + failed), 4)
    return {**row, "tasks": {HOSTILE: dict(row)}}


def window(at, elapsed, decision, why, new, old):
    """A window of analysis 1 (60 s) of pg-a's rollout, the series up to it, as saltfleet_steps fires it."""
    point = {"new": {"failure_rate": new["failure_rate"], "p95": new["p95"]}}
    point["old"] = {"failure_rate": old["failure_rate"], "p95": old["p95"]}
    series = [{"at": f"2099-01-01T00:00:{n:02d}Z", "elapsed": n, **point} for n in range(3, int(elapsed) + 1, 20)]
    return {
        "event": "analysis",
        "at": at,
        "step": 1,
        "seconds": 60,
        "elapsed": elapsed,
        "releases": {"new": [NEW], "old": [OLD]},
        "decision": decision,
        "why": why,
        # The old release ran min_tasks: its 25 % and the margin, below max_failure_rate.
        "limit": 0.35,
        "thresholds": THRESHOLDS,
        "notes": [],
        "series": series,
        "new": new,
        "old": old,
    }


def canary_lines(minions):
    """
    (lines up to the first window, the rest): a rollout of pg-a in steps that
    deployed its first host, analysed it (a running window, then
    inconclusive at its full time) and paused for an operator, in the shapes
    fleet.deploy fires them.
    """
    first, second = minions
    start = {"event": "start", "at": "2099-01-01T00:00:00Z", "kind": "fleet.deploy", "user": "canary"}
    start |= {"deployment": "pg-a", "rev": "v3", "batches": [[first], [second]], "serving": {first: OLD, second: OLD}}
    start["steps"] = [{"batch": [first]}, {"analyse": 60}, {"batch": [second]}]
    old = figures(360, 120, 4, 0.4, 0.5)
    head = [
        start,
        {"event": "batch", "at": "2099-01-01T00:00:01Z", "batch": 1, "jid": "1", "hosts": [first]},
        {"event": "host", "at": "2099-01-01T00:00:02Z", "batch": 1, "minion": first, "outcome": "deployed"}
        | {"release": NEW},
        window("2099-01-01T00:00:05Z", 3.0, "running", "3 of 60 s", figures(2, 1, 0, 0.6, 0.8), old),
    ]
    tail = [
        window("2099-01-01T00:01:02Z", 60.1, "inconclusive", INCONCLUSIVE, figures(6, 6, 1, 0.7, 0.9), old),
        {"event": "pause", "at": "2099-01-01T00:01:03Z", "why": f"analysis 1 is inconclusive: {INCONCLUSIVE}"},
    ]
    return head, tail


def send_lines(salt_run_cli, rid, lines):
    for line in lines:
        data = {"type": "rollout", "id": rid, **line}
        salt_run(salt_run_cli, "event.send", f"saltfleet/rollout/{rid}/{line['event']}", f"data={json.dumps(data)}")


def paused_rollout(browser, rid):
    """The rollout's article once the page shows it paused."""
    show(browser, "rollout")
    state = wait_for(
        lambda: next(iter(find(browser, f'article[data-rollout="{rid}"] .rollout-state[data-state="paused"]')), None),
        30,
        "the paused rollout on the page",
    )
    return state.find_element(By.XPATH, "./ancestor::article")


def charts(driver, section):
    """{chart title: (its threshold's value or None, lines drawn)} of the analysis' charts."""
    return {
        title: (threshold, lines)
        for title, threshold, lines in driver.execute_script(
            "return [...arguments[0].querySelectorAll('svg.chart')].map(svg => [svg.querySelector('title').textContent,"
            " svg.querySelector('line.threshold')?.getAttribute('data-value') ?? null,"
            " svg.querySelectorAll('polyline').length])",
            section,
        )
    }


def test_a_canary_analysis_shows_each_window_then_its_decision_and_a_pause_offers_promote_to_an_operator_only(
    browser, api_url, users, fleet, salt_master, salt_run_cli
):
    head, tail = canary_lines(fleet["minions"])

    # The read-only user sees the analysis and the pause, and neither button.
    login(browser, api_url, "viewer", users[1]["viewer"])
    send_lines(salt_run_cli, "20990101000000000001", head + tail)
    article = paused_rollout(browser, "20990101000000000001")
    assert article.find_element(By.CSS_SELECTOR, "section.analysis .decision").text == "inconclusive"
    assert find(browser, "[data-action]") == []

    rid = "20990101000000000002"
    login(browser, api_url, "operator", users[1]["operator"])
    send_lines(salt_run_cli, rid, head)
    show(browser, "rollout")
    state = wait_for(
        lambda: next(iter(find(browser, f'article[data-rollout="{rid}"] section.analysis .decision')), None),
        30,
        "the first window of the analysis on the page",
    )
    assert state.text == "running"
    assert find(browser, f'article[data-rollout="{rid}"] .rollout-state')[0].text == "running: analysis 1, 3 of 60 s"
    send_lines(salt_run_cli, rid, tail)
    article = paused_rollout(browser, rid)
    assert (
        article.find_element(By.CSS_SELECTOR, ".rollout-state").text
        == f"paused: analysis 1 is inconclusive: {INCONCLUSIVE}"
    )

    # The step's last window took the first one's place: one analysis, one line of it in the log.
    [section] = article.find_elements(By.CSS_SELECTOR, "section.analysis")
    assert section.find_element(By.CSS_SELECTOR, ".decision").text == "inconclusive"
    assert section.find_element(By.CSS_SELECTOR, ".analysis-why").text == INCONCLUSIVE
    [logged] = article.find_elements(By.CSS_SELECTOR, 'li[data-event="analysis"]')
    assert logged.text.endswith(f"analysis 1: inconclusive: {INCONCLUSIVE}")
    assert charts(browser, section) == {
        "failure rate": ("0.35", 0),
        "run time p50": (None, 0),
        # The old release's p95 (0.5 s) times runtime_ratio (2).
        "run time p95": ("1", 0),
        "failure rate per window": (None, 2),
        "p95 per window": (None, 2),
    }
    table = section.find_element(By.CSS_SELECTOR, "table.analysis-numbers")
    assert [th.text for th in table.find_elements(By.CSS_SELECTOR, "thead th")] == [
        "",
        f"old {OLD[:10]}",
        f"new {NEW[:10]}",
    ]
    numbers = {
        tr.find_element(By.TAG_NAME, "th").text: [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
        for tr in table.find_elements(By.CSS_SELECTOR, "tbody tr")
    }
    assert numbers == {
        "tasks": ["480", "12"],
        "failed": ["120", "6"],
        "retried": ["4", "1"],
        "failure rate": ["25.0 %", "50.0 %"],
        "run time p50": ["400 ms", "700 ms"],
        "run time p95": ["500 ms", "900 ms"],
    }
    section.find_element(By.CSS_SELECTOR, "details.analysis-tasks summary").click()
    task = section.find_element(By.CSS_SELECTOR, "details.analysis-tasks tbody tr")
    assert task.find_element(By.TAG_NAME, "th").text == HOSTILE
    assert find(browser, "img") == []
    no_alert(browser)
    screenshot(browser, "rollout-analysis")

    # Abort asks first; cancelled, nothing is called. (The article is found again: a refresh draws it anew.)
    before = ledger(salt_master)
    article = paused_rollout(browser, rid)
    article.find_element(By.CSS_SELECTOR, '[data-action="abort"]').click()
    wait_for(browser.find_element(By.ID, "confirm").is_displayed, 10, "the confirmation")
    assert "Abort pg-a" in browser.find_element(By.ID, "confirm-text").text
    browser.find_element(By.ID, "confirm-no").click()
    assert browser.find_element(By.ID, "status").text == "Nothing was changed."

    # Promote, confirmed, calls fleet.promote pg-a: no rollout of pg-a holds its lock, and the page says so.
    article = paused_rollout(browser, rid)
    article.find_element(By.CSS_SELECTOR, '[data-action="promote"]').click()
    wait_for(browser.find_element(By.ID, "confirm").is_displayed, 10, "the confirmation")
    assert "Promote pg-a" in browser.find_element(By.ID, "confirm-text").text
    browser.find_element(By.ID, "confirm-yes").click()
    body = browser.find_element(By.TAG_NAME, "body")
    wait_for(lambda: "no rollout of pg-a is running" in body.text, 60, "fleet.promote's error on the page")
    note = browser.find_element(By.CSS_SELECTOR, f'article[data-rollout="{rid}"] .rollout-note').text
    assert note.startswith("fleet.promote pg-a: no rollout of pg-a is running")
    assert ledger(salt_master) == before
    screenshot(browser, "rollout-promote-refused")
