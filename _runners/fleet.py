"""
The fleet as the master knows it, without asking any minion.

``fleet.inventory`` gives one row per minion: where it runs (provider, region,
size, addresses), whether it is up, and each deployment with its revision and
how many of its programs are RUNNING. ``fleet.ansible_inventory`` gives the
same fleet as an Ansible dynamic inventory.

Both read only the master's cache, so they answer at once for any number of
minions, and a minion that is down still shows its last known facts:

- accepted keys: which minions exist (a destroyed one, its key deleted, is gone);
- cached grains: cloud facts (``saltfleet_cloud``, written by salt-cloud) and
  deployments with their release (``saltfleet_deployments``);
- the mine: ``deployment.status`` (programs and their states) and
  ``saltfleet.heartbeat``, which every minion sends on a schedule (pillar
  ``fleet.sls``). A minion is up while its mine keeps being refreshed: its
  age is compared with the heartbeat interval the minion itself reports.

.. code-block:: bash

    salt-run fleet.inventory
    salt-run fleet.inventory deployment=daily-fetcher
    salt-run fleet.inventory provider=ec2 --out=json
    salt-run fleet.ansible_inventory --out=json > inventory.json
"""

import fnmatch
import json
import logging
import re
import time

import salt.cache
import salt.key
import salt.utils.data

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 60
# A minion is down once it has missed this many heartbeats (plus a little slack).
MISSED_HEARTBEATS = 2.5
SLACK = 5
CLOUD_KEYS = ("provider", "instance_id", "region", "size", "public_ips", "private_ips")
# What Ansible's hostvars carry of each deployment (grains only on request: they run to hundreds of lines a host).
DEPLOYMENT_FACTS = ("rev", "release", "pinned", "running", "programs", "supervisord")


def _accepted():
    return salt.key.get_key(__opts__).list_status("accepted").get("minions", [])


def _up(data, now):
    """Whether the minion ``data`` (a checked Minion) still beats: its last word within its own heartbeat's slack."""
    interval = max(1, int(data.heartbeat or DEFAULT_INTERVAL))
    seen = data.last_seen
    return data.heartbeat is not None and seen is not None and now - seen <= interval * MISSED_HEARTBEATS + SLACK


def _loopback(ip):
    return ip.startswith("127.") or ip == "::1"


def _addresses(cloud):
    public, private = list(cloud.public_ips), list(cloud.private_ips)
    if not public and not private:
        # A host salt-cloud did not create: its own interfaces are what we know.
        private = [ip for ip in cloud.ipv4 if not _loopback(ip)] or list(cloud.ipv4)[:1]
    return public, private


def _deployments(data):
    """{name: {rev, release, running, programs, supervisord[, workers, pinned]}} of a checked Minion."""
    found = {
        name: {"rev": known.rev, "release": known.release, "running": None, "programs": None, "supervisord": None}
        for name, known in data.known.items()
    }
    for name, status in data.status.items():
        row = found.setdefault(name, {"rev": None, "release": None})
        # The mine is refreshed by the heartbeat: fresher than the grains.
        row["rev"] = status.rev or row.get("rev")
        row["release"] = status.release or row.get("release")
        row["running"] = status.running
        row["programs"] = len(status.programs)
        row["supervisord"] = status.supervisord
        workers = status.as_row().get("workers")
        if workers:
            # Celery nodes: the queues each consumes and its tasks in hand (or why they did not say).
            row["workers"] = workers
        if status.pinned:
            # An operator's rev (deployment.update_code, rollback), kept over pillar's.
            row["pinned"] = status.pinned
    return dict(sorted(found.items()))


def _minion(cache, minion_id):
    """What the master's cache holds of ``minion_id``, each value checked (saltfleet_minion_data)."""
    return __utils__["saltfleet_minion_data.minion"](cache, minion_id)


def _status(data, now):
    """``bad data`` when the minion wrote something saltfleet never writes, else ``up`` or ``down``."""
    if data.problems:
        return "bad data"
    return "up" if _up(data, now) else "down"


def _row(data, now):
    """The inventory row of a checked Minion; ``bad_data`` lists what it wrote wrong (and was left out)."""
    cloud = data.cloud
    public, private = _addresses(cloud)
    row = {
        "id": data.id,
        "status": _status(data, now),
        "last_seen": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(data.last_seen)) if data.last_seen else None,
        "provider": cloud.provider,
        # The shared provisioning code keeps the instance id top level (autosign_grains compares flat values).
        "instance_id": cloud.instance_id,
        "region": cloud.region,
        "size": cloud.size,
        "public_ips": public,
        "private_ips": private,
        "deployments": _deployments(data),
    }
    if data.problems:
        row["bad_data"] = list(data.problems)
    return row


def _rows(tgt="*", deployment=None, provider=None):
    cache = salt.cache.factory(__opts__)
    now = time.time()
    rows = []
    for minion_id in _accepted():
        if not fnmatch.fnmatchcase(minion_id, tgt):
            continue
        row = _row(_minion(cache, minion_id), now)
        if deployment and deployment not in row["deployments"]:
            continue
        if provider and row["provider"] != provider:
            continue
        rows.append(row)
    return rows


def _as_text():
    """True when salt-run prints to a person: no --out asked for."""
    return not __opts__.get("output")


def _deployment_cell(name, facts):
    full = facts.get("release") or ""
    release = full[:8] or "-"
    rev = facts.get("rev")
    # A rev that is the release's own SHA (a rollback's, an update_code to a commit) says nothing more.
    where = f"{rev}@{release}" if rev and not full.startswith(str(rev)) else release
    if facts.get("pinned"):
        where += " (pinned)"
    if facts.get("running") is None:
        running = "?"
    else:
        running = f"{facts['running']}/{facts['programs']} RUNNING"
    workers = facts.get("workers") or {}
    if isinstance(workers.get("error"), str):
        running += " workers not answering"
    elif workers:
        # Celery: the queues its workers consume, and the tasks they hold.
        queues = ",".join(sorted({q for w in workers.values() for q in w.get("queues") or []})) or "no queue"
        active = sum(w.get("active") or 0 for w in workers.values())
        running += f" {queues} ({active} active)"
    return f"{name} {where} {running}"


def _printable(value, limit=300):
    """A minion-given value on one line of a table: escaped, cut short."""
    text = str(value).encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _format_table(rows):
    """The inventory as a fixed-width table, one line per minion (and per extra deployment)."""
    header = ["ID", "STATUS", "PROVIDER", "REGION", "SIZE", "PUBLIC IP", "PRIVATE IP", "DEPLOYMENTS"]
    lines = []
    for row in rows:
        cells = [
            _printable(row["id"]),
            row["status"],
            row["provider"] or "-",
            row["region"] or "-",
            row["size"] or "-",
            ",".join(row["public_ips"]) or "-",
            ",".join(row["private_ips"]) or "-",
        ]
        deployments = [_deployment_cell(n, f) for n, f in row["deployments"].items()] or ["-"]
        lines.append([*cells, deployments[0]])
        lines.extend([""] * len(cells) + [extra] for extra in deployments[1:])
        # What the minion wrote wrong, beneath its row (left out of the columns).
        lines.extend(f"  bad data: {_printable(problem)}" for problem in row.get("bad_data") or [])
    cells = [line for line in lines if isinstance(line, list)]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *cells, strict=False)]
    out = [
        line
        if isinstance(line, str)
        else "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=False)).rstrip()
        for line in [header, *lines]
    ]
    up, bad = (sum(1 for r in rows if r["status"] == status) for status in ("up", "bad data"))
    summary = f"{len(rows)} minion{'' if len(rows) == 1 else 's'}, {up} up, {len(rows) - up - bad} down"
    out.append(summary + (f", {bad} bad data" if bad else ""))
    return "\n".join(out)


def inventory(tgt="*", deployment=None, provider=None):
    """
    One row per minion: id, status (up/down), provider, instance id, region,
    size, public and private IPs, last time seen, and each deployment with its
    rev, release (SHA) and how many of its programs are RUNNING.

    Prints a table; ``--out=json`` or ``--out=yaml`` give the rows as data.
    A filter that matches no minion is an error (exit code 1) saying why: a
    deployment no minion's pillar names, a tgt no accepted minion matches.

    tgt
        Glob on minion ids (default ``*``).
    deployment
        Only the minions that run this deployment.
    provider
        Only the minions of this cloud provider (``local``, ``ec2``, ``rackspace``).

    CLI Example:

    .. code-block:: bash

        salt-run fleet.inventory
        salt-run fleet.inventory deployment=daily-fetcher --out=json
        salt-run fleet.inventory provider=ec2 tgt='worker-*'
    """
    rows = _with_syndics(_rows(tgt, deployment, provider), tgt, deployment, provider)
    if not rows and (tgt != "*" or deployment or provider):
        return _refuse(f"fleet.inventory: {_no_match(tgt, deployment, provider)}")
    return _format_table(rows) if _as_text() else rows


def _no_match(tgt, deployment, provider):
    """Why no minion of this master's cache matches the filters, in words."""
    if tgt != "*" and not any(fnmatch.fnmatchcase(m, tgt) for m in _accepted()):
        return f"no accepted minion matches tgt={tgt!r} (`salt-key -L` lists them)"
    if deployment and not __utils__["saltfleet_hosts.hosts_of"](_opts(), deployment, tgt):
        return __utils__["saltfleet_hosts.not_hosted"](_opts(), deployment, tgt)
    providers = sorted({str(r["provider"]) for r in _rows(tgt) if r["provider"]})
    return (
        f"no minion{'' if tgt == '*' else f' matching {tgt!r}'} runs "
        + (f"deployment {deployment} " if deployment else "")
        + f"on provider {provider!r} (providers of those minions: {', '.join(providers) or 'none'})"
    )


def _group(prefix, name):
    # Ansible group names: letters, digits and underscores.
    return f"{prefix}_{re.sub(r'[^A-Za-z0-9_]', '_', str(name))}"


def _grains_asked(grains):
    """``grains=`` of fleet.ansible_inventory: None (none), True (all) or the names asked for."""
    if grains in (None, False, "", "False", "false"):
        return None
    if grains is True or grains in ("True", "true", "*"):
        return True
    names = grains.split(",") if isinstance(grains, str) else grains
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError(f"grains={grains!r}: give True (every grain) or grain names (grains=os,osrelease)")
    return [n.strip() for n in names]


def ansible_inventory(tgt="*", deployment=None, provider=None, grains=None):
    """
    The fleet as Ansible dynamic-inventory JSON: a group per deployment
    (``deployment_<name>``), per provider (``provider_<name>``) and per
    status (``salt_up``/``salt_down``/``salt_bad_data``); hostvars hold
    what an inventory needs: ``ansible_host``, the cloud facts (provider,
    instance, region, size, addresses) and each deployment's rev, release
    and programs; a host that wrote values saltfleet never writes is in
    ``salt_bad_data``, what was wrong in its ``salt_bad_data`` hostvar.

    grains
        Salt's grains too, under ``salt_grains``: ``True`` for every cached
        grain, or their names (``grains=os,osrelease``).

    CLI Example:

    .. code-block:: bash

        salt-run fleet.ansible_inventory --out=json > fleet.json
        salt-run fleet.ansible_inventory grains=os,osrelease --out=json
        ansible all -i fleet.json --list-hosts
    """
    try:
        asked = _grains_asked(grains)
    except ValueError as exc:
        return _refuse(f"fleet.ansible_inventory: {exc}")
    cache = salt.cache.factory(__opts__)
    groups = {}
    hostvars = {}
    for row in _rows(tgt, deployment, provider):
        host = row["id"]
        address = (row["public_ips"] or row["private_ips"] or [None])[0]
        hostvars[host] = {
            "ansible_host": address or host,
            "salt_status": row["status"],
            "salt_last_seen": row["last_seen"],
            "saltfleet_cloud": {key: row[key] for key in CLOUD_KEYS},
            "saltfleet_deployments": {
                name: {key: facts[key] for key in DEPLOYMENT_FACTS if key in facts}
                for name, facts in row["deployments"].items()
            },
        }
        if row.get("bad_data"):
            hostvars[host]["salt_bad_data"] = row["bad_data"]
        if asked:
            cached = cache.fetch("grains", host)
            # Grains that are no mapping are named in salt_bad_data already.
            cached = cached if isinstance(cached, dict) else {}
            hostvars[host]["salt_grains"] = cached if asked is True else {k: cached[k] for k in asked if k in cached}
        names = [_group("deployment", d) for d in row["deployments"]]
        names.append(_group("provider", row["provider"] or "none"))
        names.append(_group("salt", row["status"]))
        for name in names:
            groups.setdefault(name, {"hosts": []})["hosts"].append(host)
    result = {
        "_meta": {"hostvars": hostvars},
        "all": {"children": [*sorted(groups), "ungrouped"]},
        "ungrouped": {"hosts": []},
        **dict(sorted(groups.items())),
    }
    return json.dumps(result, indent=2, sort_keys=True, default=str) if _as_text() else result


# ------------------------------------------------------------ cloud-init admission


def admit(minion_id, instance_id, pub, act="pend"):
    """
    Decide the key of a cloud-init host against salt-cloud's autosign tickets.
    A pending key is accepted if the ticket of ``instance_id`` names
    ``minion_id``, that key is ``pub`` and it came after the ticket was issued;
    the ticket is then used up. A key whose instance was launched as another
    minion, or that was pending before the ticket was issued, or that claims a
    minion id reserved for another instance, is rejected; anything else stays
    pending. ``act=reject`` (Salt refused the key because the id's key is
    rejected) accepts the key in place of one saltfleet set aside for that
    ticket. The master's reactor on ``salt/auth``
    (``etc/reactor/saltfleet_autosign.sls``) calls it with what the minion
    sent; by hand it re-checks a key left pending (never one that was pending
    before its instance was launched: see the README on telling keys apart).

    Returns minion_id, instance_id, finger (as ``salt-key -f`` shows it),
    result (accepted, rejected or pending) and the reason. By hand, put ``--``
    before the key: it begins with dashes, which salt-run takes for an option.

    CLI Example:

    .. code-block:: bash

        salt-run fleet.admit worker-7 i-0abc1234def567890 -- "$(cat /etc/salt/pki/master/minions_pre/worker-7)"
    """
    return __utils__["saltfleet_tickets.admit"](__opts__, minion_id, instance_id, pub, act)


# ------------------------------------------------------------------ Celery queues
# fleet.queues: each Celery queue with the workers that consume it across the
# fleet, from the master's cache like fleet.inventory: the mine's
# deployment.status rows, whose ``workers`` are the serving generation's nodes
# as they answered ({node: {"queues": [...], "active": n}}, or {"error": ...}
# when they did not).


def _consumers(tgt="*", deployment=None, queue=None):
    """
    ({queue: [consumer, ...]}, [deployments whose workers did not answer],
    [{minion, problems}: hosts whose data was bad]) from the mine. A host with
    bad data lists its consumers read whole, with status ``bad data``: never up.
    """
    cache = salt.cache.factory(__opts__)
    now = time.time()
    queues, unanswered, bad = {}, [], []
    for minion_id in sorted(_accepted()):
        if not fnmatch.fnmatchcase(minion_id, tgt):
            continue
        data = _minion(cache, minion_id)
        # A minion that stopped reporting: its workers are what they were when it last did.
        status = _status(data, now)
        if data.problems:
            bad.append({"minion": minion_id, "problems": list(data.problems)})
        for name, facts in data.status.items():
            if deployment and name != deployment:
                continue
            if facts.workers_error is not None:
                unanswered.append({"minion": minion_id, "deployment": name, "error": facts.workers_error})
                continue
            for worker in facts.workers:
                for name_of_queue in worker.queues:
                    if queue and not fnmatch.fnmatchcase(name_of_queue, queue):
                        continue
                    queues.setdefault(name_of_queue, []).append(
                        {
                            "minion": minion_id,
                            "deployment": name,
                            "node": worker.node,
                            "active": worker.active,
                            "status": status,
                        }
                    )
    return dict(sorted(queues.items())), unanswered, bad


def _format_queues(report):
    lines = []
    width = max([len("QUEUE"), *(len(q) for q in report["queues"])])
    lines.append(f"{'QUEUE'.ljust(width)}  CONSUMERS  NODES (tasks in hand)")
    for name, info in report["queues"].items():
        nodes = ", ".join(
            f"{c['node']} ({'?' if c['active'] is None else c['active']})"
            + ("" if c["status"] == "up" else f" on {_printable(c['minion'])}, {c['status']}")
            for c in info["consumers"]
        )
        lines.append(f"{name.ljust(width)}  {info['up']:>2} up/{len(info['consumers']):<2}  {nodes}")
    for row in report["unanswered"]:
        lines.append(f"not answering: {row['deployment']} on {_printable(row['minion'])}: {_printable(row['error'])}")
    for row in report["bad data"]:
        lines.extend(f"bad data: {_printable(row['minion'])}: {_printable(p)}" for p in row["problems"])
    return "\n".join(lines)


def queues(tgt="*", deployment=None, queue=None):
    """
    Each Celery queue with the workers that consume it across the fleet:
    per consumer its minion, deployment, node and tasks in hand, and whether
    the minion is up; ``up`` counts the consumers on minions that are.
    Read from the master's cache (the mine's ``deployment.status``, refreshed
    by the heartbeat), so a queue none of whose workers answers is not
    listed; deployments whose workers did not answer are, under
    ``unanswered``, and hosts that wrote values saltfleet never writes
    under ``bad data`` (what was wrong; their consumers never count as up).

    tgt
        Only the minions whose id matches this glob.
    deployment
        Only this deployment's workers.
    queue
        Only the queues whose name matches this glob.

    CLI Example:

    .. code-block:: bash

        salt-run fleet.queues
        salt-run fleet.queues deployment=daily-fetcher --out=json
        salt-run fleet.queues queue='daily_fetching.*'
    """
    found, unanswered, bad = _consumers(tgt, deployment, queue)
    report = {
        "queues": {
            name: {"up": sum(1 for c in consumers if c["status"] == "up"), "consumers": consumers}
            for name, consumers in found.items()
        },
        "unanswered": unanswered,
        "bad data": bad,
    }
    return _format_queues(report) if _as_text() else report


# ------------------------------------------------------------ masters of masters
# A master of masters (order_masters) holds the keys of its syndics, not of the
# minions below them, and its cache holds none of their grains or mine: each
# syndic master's own cache does. So fleet.inventory there asks each of its
# syndics for the rows of the syndic's master, through the salt-minion beside
# the syndic (the syndic's id, its config beside the master's): `saltutil.runner
# fleet.inventory_rows`. Its syndics are Salt's own record of them,
# <cachedir>/syndics (Salt registers a syndic when it forwards its first
# return). A syndic that does not answer within SYNDIC_TIMEOUT seconds stays
# the one row the top's own cache has of it.

SYNDIC_TIMEOUT = 30
# The most rows a syndic's answer may give.
ROWS_MAX = 10000


def _syndics():
    """
    This master's accepted keys that Salt registered as syndics, on a master
    of masters alone: Salt registers any minion that sends a syndic return.
    """
    import os

    if not __opts__.get("order_masters"):
        return []
    try:
        registered = set(os.listdir(os.path.join(__opts__["cachedir"], "syndics")))
    except OSError:
        return []
    return sorted(registered.intersection(_accepted()))


def _below(syndics):
    """{syndic: the rows of its master's inventory} of the syndics that answered."""
    import salt.client

    answered = {}
    with salt.client.get_local_client(mopts=__opts__) as client:
        returns = client.cmd_iter(
            syndics, "saltutil.runner", ["fleet.inventory_rows"], tgt_type="list", timeout=SYNDIC_TIMEOUT
        )
        for item in returns:
            for syndic, data in item.items():
                rows = data.get("ret") if isinstance(data, dict) else None
                if syndic not in syndics or not isinstance(rows, list):
                    log.warning("fleet.inventory: syndic %r returned no inventory", syndic)
                    continue
                answered[syndic] = [_checked_row(syndic, row, n) for n, row in enumerate(rows[:ROWS_MAX])]
    return answered


def _checked_row(syndic, row, n):
    """A row a syndic returned, checked field by field; one marked ``bad data`` (what was wrong) if it is not one."""
    where = f"syndic {syndic} row {n}"
    try:
        return __utils__["saltfleet_minion_data.inventory_row"](row, where)
    except ValueError as exc:
        return {"id": f"{syndic}#{n}", "status": "bad data", "bad_data": [str(exc)], "deployments": {}}


def _with_syndics(rows, tgt="*", deployment=None, provider=None):
    """
    ``rows``, this master's own; on a master of masters, each answering
    syndic's row replaced by the rows of its master (filtered alike), and
    every row naming its ``syndic`` (``None``: a minion of this master).
    """
    syndics = _syndics()
    if not syndics:
        return rows
    below = _below(syndics)
    merged = [{**row, "syndic": None} for row in rows if row["id"] not in below]
    for syndic, found in below.items():
        for row in found:
            if not fnmatch.fnmatchcase(str(row.get("id")), tgt):
                continue
            if deployment and deployment not in (row.get("deployments") or {}):
                continue
            if provider and row.get("provider") != provider:
                continue
            merged.append({**row, "syndic": syndic})
    return sorted(merged, key=lambda row: str(row["id"]))


def inventory_rows(tgt="*", deployment=None, provider=None):
    """
    The rows of ``fleet.inventory`` from this master's own cache, as data
    whatever ``--out`` says: what ``fleet.inventory`` on a master of masters
    asks each syndic master for, through the minion beside its syndic.

    CLI Example:

    .. code-block:: bash

        salt-run fleet.inventory_rows --out=json
        salt syndic-1 saltutil.runner fleet.inventory_rows
    """
    return _rows(tgt, deployment, provider)


# ------------------------------------------------ rollouts, deploy ledger, fleet status
# fleet.deploy, rollback, unlock, history, record, status. Which minions host a
# deployment, and the status report, live in _utils/saltfleet_hosts.py; batches
# and outcomes in _utils/saltfleet_rollout.py; the deploy lock and ledger (and
# what a stale lock is) in _utils/saltfleet_ledger.py.

ROLLOUT = "saltfleet_rollout"
LEDGER = "saltfleet_ledger"
LEDGER_FUNS = ("deployment.update_code", "deployment.rollback")


def _progress(message, level="info"):
    """
    A step of a rollout, as a ``salt/run/<jid>/progress`` event on the
    master's bus (salt-api's ``/events`` and the fleet page follow it there).
    salt-run also prints it, as one line (``_output/fleet_progress.py``),
    only when it prints to a person: with ``--out`` (json, yaml, quiet...)
    or ``--quiet`` the report is all it prints, one document.
    """
    event = {"message": message, "level": level}
    if _as_text() and not __opts__.get("quiet"):
        # Salt's runner client prints each event it fires, with the outputter the event names.
        __jid_event__.fire_event({**event, "outputter": "fleet_progress"}, "progress")
    else:
        import salt.utils.event

        # The bus alone: the same event, without the runner client's printer.
        salt.utils.event.NamespacedEvent(__jid_event__.event, __jid_event__.base).fire_event(event, "progress")


def _user():
    # The runner client sets __user__: salt-run's caller (sudo_<name> under sudo) or the eauth user.
    return globals().get("__user__") or "UNKNOWN"


def _finish(report):
    """The report, its retcode also the job's (salt-run exits with a returned dict's ``retcode``)."""
    if report.get("retcode"):
        __context__["retcode"] = report["retcode"]
    return report


def _refuse(message, **fields):
    return _finish({**fields, "error": message, "retcode": 1})


def _plan(what, name, batch, tgt, tgt_type, rollout=None):
    """
    ({minion: release it serves}, actions, held back, {minion: its pillar
    spec of ``name``}, analysis thresholds) of the hosts of ``name`` (those
    the master's own pillar assigns it): the actions
    (``saltfleet_steps.actions``: batches of ``batch``, or the steps of
    ``rollout``, (steps, analysis) as given to ``fleet.deploy``, over
    pillar's) with every batch within the deployment's ``min_consumers``
    (the highest floor that pillar gives any of its hosts); the specs are
    those of every host of ``name``, targeted or not. ValueError when there
    are no hosts, the steps are wrong or a floor cannot hold.
    """
    assigned = __utils__["saltfleet_assigned.assignments"](_opts())
    serving, strays = __utils__["saltfleet_hosts.claimed"](_opts(), name, tgt, tgt_type, assigned)
    for minion in strays:
        _progress(f"{name}: {minion} says it runs {name}, but the master's pillar does not assign it there: left out")
    if not serving:
        raise ValueError(f"{what}: {__utils__['saltfleet_hosts.not_hosted'](_opts(), name, tgt, tgt_type)}")
    # Every host of the deployment, targeted or not: its pillar sets the floors, its workers keep them.
    everywhere = __utils__["saltfleet_hosts.hosts_of"](_opts(), name, "*", "glob", assigned)
    specs = assigned.specs(name, everywhere)
    floors = __utils__["saltfleet_assigned.floors"](name, specs)
    consumers = {}
    for queue, rows in _consumers()[0].items():
        for row in rows:
            # A worker counts only where the master's pillar assigns its deployment, whatever a mine says.
            if queue in floors and row["status"] == "up" and assigned.assigns(row["minion"], row["deployment"]):
                consumers.setdefault(row["minion"], {}).setdefault(queue, 0)
                consumers[row["minion"]][queue] += 1

    # Resolved here: the plan calls it back from a utils module, whose context packs no __utils__.
    within_floor = __utils__[f"{ROLLOUT}.within_floor"]

    def cut(plan):
        try:
            return within_floor(plan, consumers, floors)
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}; nothing was changed") from None

    steps, settings = _rollout_settings(name, specs, *rollout) if rollout is not None else (None, None)
    plan, held = __utils__["saltfleet_steps.actions"](steps, sorted(serving), batch, cut)
    for row in held:
        _progress(
            f"{name}: batch {row['batch']} cut short: queue {row['queue']} keeps {row['floor']} "
            f"of its {row['consumers']} consumers (min_consumers)",
            "warn",
        )
    return serving, plan, held, specs, settings


def _rollout_settings(name, specs, steps, analysis):
    """
    (steps, analysis thresholds) of a rollout of ``name``: ``steps`` and
    ``analysis`` given to the runner, else ``deployments:<name>:rollout`` of
    the master's pillar (the same for every host); ValueError naming what is wrong.
    """
    given = __utils__["saltfleet_assigned.rollout"](name, specs)
    if steps is not None:
        given = {**given, "steps": steps}
    if analysis is not None:
        given = {
            **given,
            "analysis": {**(given.get("analysis") or {}), **analysis} if isinstance(analysis, dict) else analysis,
        }
    errors = []
    if not __utils__["saltfleet_schema.check_rollout"](f"fleet.deploy {name}: rollout", given, errors):
        raise ValueError("; ".join(errors))
    return given.get("steps") or None, __utils__["saltfleet_schema.analysis_settings"](given.get("analysis"))


def _hooks(name, specs, pre, post):
    """The pre and post hooks: the arguments, else ``deployments:<name>:hooks`` of the master's pillar of its hosts."""
    if pre is None and post is None:
        return __utils__["saltfleet_assigned.hooks"](name, specs)
    commands = __utils__[f"{ROLLOUT}.commands"]
    return {"pre": commands(pre, f"fleet.deploy {name} pre"), "post": commands(post, f"fleet.deploy {name} post")}


def _opts():
    # A plain dict: the dunders resolve through the loader in context, the utils' while they run.
    return dict(__opts__)


def _take(name, command, lock_wait):
    """The deploy lock of ``name``, held; DeployLocked (a CommandExecutionError) names its holder."""
    lock = __utils__["saltfleet_deploylock.lock"](_opts(), name)
    lock.acquire(_user(), command, wait=lock_wait, jid=__jid__)
    return lock


def _refused(kind, name, rev, why, /, **fields):
    """A rollout refused before it changed anything: recorded in the deploy ledger, and its report."""
    __utils__["saltfleet_ledger.refused"](_opts(), __jid__, kind, _user(), name, rev, why)
    return _refuse(why, **fields)


def _roll(lock, kind, name, rev, plan, held, serving, fun, hooks, timeout, analysis=None, sha=None):
    """The rollout under ``lock`` (held), recorded in the ledger: its report. ``sha``: the commit ``rev`` is."""
    journal = __utils__[f"{LEDGER}.journal"](_opts(), __jid__)
    watch = None
    if analysis is not None:
        settings, hosts = analysis
        watch = __utils__["saltfleet_steps.watch"](_opts(), name, __jid__, hosts, settings, _progress, journal, lock)
    start = {"kind": kind, "user": _user(), "deployment": name, "rev": rev} | ({"sha": sha} if sha else {})
    args = (start, plan, serving, fun, hooks, timeout, _progress, watch)
    return _finish(_held(__utils__[f"{ROLLOUT}.roll"](_opts(), lock, journal, *args), held))


def _held(report, held):
    """``report`` with the batches ``min_consumers`` cut short, and which queue held each back."""
    return {**report, "held back": held} if held else report


def deploy(
    name,
    rev=None,
    batch=None,
    tgt="*",
    tgt_type="glob",
    test=False,
    lock_wait=0,
    timeout=30,
    pre=None,
    post=None,
    steps=None,
    analysis=None,
):
    """
    Deploy ``rev`` of deployment ``name`` to every minion that hosts it, batch
    by batch, each host through ``deployment.update_code`` (the state's own
    build-and-switch). A batch fails when any of its hosts fails or does not
    answer within ``timeout`` seconds, and the rollout stops there. The report
    lists the hosts ``deployed`` (their SHA), ``failed`` (why; what each still
    serves), ``no answer`` and ``not touched`` (what each still serves);
    salt-run exits non-zero unless the rollout completed.

    One rollout of a deployment at a time: another refuses at once, naming
    who deploys and since when (``lock_wait=SECONDS`` waits instead;
    ``fleet.unlock`` shows and breaks the lock). Every rollout goes into the
    deploy ledger (``fleet.history``).

    The hosts of ``name`` are the minions the master's own pillar assigns it
    (compiled by the master, never what a minion's grains, mine or request
    say) that have reported it; a minion that claims it otherwise is left
    out, and the progress says so.

    A Celery queue with a floor in pillar (``deployments:<name>:min_consumers:
    {queue: N}``, the highest the master's pillar gives any host) keeps N
    consumers up through the rollout: a host counts as out of service during
    its batch, so a batch that would leave fewer is cut short (the report's
    ``held back`` names the queue), and a rollout where one host alone would
    is refused before anything changes. Consumers are counted from the
    master's cache, as ``fleet.queues`` shows them, on the hosts the master's
    pillar assigns their deployment.

    Steps (``steps=``, else pillar ``deployments:<name>:rollout:steps``) make
    it a canary rollout: ``{hosts: N}`` or ``{hosts: 'P%'}`` brings the new
    release to that many hosts in all, ``{analyse: SECONDS}`` watches the
    Celery tasks of the new release against the old one's (failure rate, p95
    run time, crashed workers: thresholds in ``analysis=``, else pillar's
    ``rollout:analysis``), ``{pause: true}`` waits for ``fleet.promote`` or
    ``fleet.abort``. A failed analysis (or an abort) sends every host the
    rollout changed back to the release it served; the report's ``analysis``
    and ``fleet.history`` show the figures and the decision,
    ``fleet.analysis`` the running one.

    batch
        Hosts per batch: a number (``1``, the default without steps) or a
        share (``20%``). With steps, a step's hosts go in one batch unless
        ``batch`` is given.
    tgt, tgt_type
        Only the hosts of ``name`` among these minions (default: all).
    steps
        The rollout's steps, e.g. ``steps='[{hosts: 1}, {analyse: 120}, {hosts: "100%"}]'``.
    analysis
        Thresholds over pillar's, e.g. ``analysis='{max_failure_rate: 0.2, min_tasks: 50}'``.
    test
        ``True``: what each host would do (``state.single deployment.present
        NAME rev=REV test=True``); nothing changes, nothing is locked.
    pre, post
        Commands run once through ``deployment.run`` on the first host:
        ``pre`` before any host changes (in the release serving then; if it
        fails, nothing is deployed), ``post`` after the last batch (in the new
        release). A string is one command, a list several. Without either,
        pillar ``deployments:<name>:hooks:{pre,post}`` counts, the same for
        every host in the master's pillar (hosts that differ are refused).

    CLI Example:

    .. code-block:: bash

        salt-run fleet.deploy daily-fetcher rev=v2.3
        salt-run fleet.deploy daily-fetcher rev=main batch=20% test=True
        salt-run fleet.deploy daily-fetcher rev=v2.3 tgt='worker-*' lock_wait=600
        salt-run fleet.deploy daily-fetcher rev=v2.3 post='python manage.py migrate'
        salt-run fleet.deploy daily-fetcher rev=v2.3 steps='[{hosts: 1}, {analyse: 120}, {hosts: "100%"}]'
    """
    from salt.exceptions import CommandExecutionError

    if rev is None:
        why = f"fleet.deploy {name}: give the rev to deploy: rev=BRANCH, rev=TAG or rev=SHA"
        return _refuse(why) if test else _refused("fleet.deploy", name, None, why, outcome="refused")
    rev = str(rev)
    try:
        serving, plan, held, specs, settings = _plan(
            f"fleet.deploy {name}", name, batch, tgt, tgt_type, (steps, analysis)
        )
        if test:
            return _finish(_held(__utils__[f"{ROLLOUT}.dry_run"](_opts(), name, rev, plan, timeout, _progress), held))
        hooks = _hooks(name, specs, pre, post)
        batches = [action["batch"] for action in plan if "batch" in action]
        how = (
            f"steps: {__utils__['saltfleet_steps.describe'](plan)}"
            if len(plan) > len(batches)
            else f"batch={batch or 1}"
        )
        lock = _take(name, f"fleet.deploy {name} rev={rev} {how}", lock_wait)
    except (ValueError, CommandExecutionError) as exc:
        if test:
            return _refuse(str(exc), deployment=name, rev=rev, outcome="refused")
        return _refused("fleet.deploy", name, rev, str(exc), deployment=name, rev=rev, outcome="refused")
    try:
        canary = (settings, sorted(specs)) if any("batch" not in action for action in plan) else None
        # The commit rev is now, asked as the hosts would: hosts already on it are skipped (a rollout resumed).
        sha = __utils__["saltfleet_git.resolve_here"](name, next(iter(specs.values()), {}), rev)
        fun = "deployment.update_code"
        return _roll(lock, "fleet.deploy", name, rev, plan, held, serving, fun, hooks, timeout, canary, sha)
    finally:
        lock.release()


def rollback(name, release=None, batch=1, tgt="*", tgt_type="glob", test=False, lock_wait=0, timeout=30):
    """
    Roll every host of deployment ``name`` back, batch by batch through
    ``deployment.rollback``, to the newest release kept complete on all of
    them other than the newest one serving (or to ``release``, a SHA or its
    prefix, if all keep it). Every host must answer ``deployment.releases``
    first, or nothing changes. Lock, ledger, ``min_consumers``, stop on the
    first failed or silent batch, and report as ``fleet.deploy``'s.

    CLI Example:

    .. code-block:: bash

        salt-run fleet.rollback daily-fetcher
        salt-run fleet.rollback daily-fetcher test=True
        salt-run fleet.rollback daily-fetcher release=3f1c9e2 batch=50%
    """
    from salt.exceptions import CommandExecutionError

    what = f"fleet.rollback {name}"
    lock = None
    try:
        serving, plan, held, _, _ = _plan(what, name, batch, tgt, tgt_type)
        lock = None if test else _take(name, f"{what} batch={batch}", lock_wait)
        target = __utils__[f"{ROLLOUT}.rollback_target"](_opts(), name, sorted(serving), release, timeout, _progress)
        if test:
            moving = sorted(m for m in serving if serving[m] != target)
            count = __utils__["saltfleet_rollout.count"]
            summary = f"test: {len(moving)} of {count(len(serving), 'host')} would go back to {target[:12]}"
            batches = [action["batch"] for action in plan]
            report = {"deployment": name, "release": target, "test": True, "batches": batches, "would switch": moving}
            return _finish(_held({**report, "summary": summary, "retcode": 0}, held))
        return _roll(lock, "fleet.rollback", name, target, plan, held, serving, "deployment.rollback", {}, timeout)
    except (ValueError, CommandExecutionError) as exc:
        # A ValueError of the plan names the runner already; one of the hosts' releases does not.
        why = str(exc) if str(exc).startswith(what) or not isinstance(exc, ValueError) else f"{what}: {exc}"
        if test:
            return _refuse(why, deployment=name)
        return _refused("fleet.rollback", name, release, why, deployment=name)
    finally:
        if lock is not None:
            lock.release()


def unlock(name, force=False):
    """
    Show and clear the deploy lock of deployment ``name``. A stale lock (its
    runner died: its record stays though the lock is free, or a process it
    left behind still holds it) is cleared; a live rollout's lock is shown,
    and broken only with ``force=True`` (that rollout stops before its next
    batch). Clearing and breaking go into the ledger.

    CLI Example:

    .. code-block:: bash

        salt-run fleet.unlock daily-fetcher
        salt-run fleet.unlock daily-fetcher force=True
    """
    from salt.exceptions import CommandExecutionError

    try:
        result = __utils__["saltfleet_deploylock.unlock"](_opts(), name, _user(), force=bool(force))
    except CommandExecutionError as exc:
        return _refuse(f"fleet.unlock {name}: {exc}")
    return _finish({**result, "retcode": 0 if result["result"] else 1})


def _tell(name, verdict):
    from salt.exceptions import CommandExecutionError

    try:
        said = __utils__["saltfleet_deploylock.tell"](_opts(), name, verdict, _user())
    except CommandExecutionError as exc:
        return _refuse(f"fleet.{verdict} {name}: {exc}")
    holder = __utils__["saltfleet_deploylock.describe"](said["holder"])
    what = (
        "goes on past its pause or analysis" if verdict == "promote" else "stops and sends every host it changed back"
    )
    return {"result": True, "comment": f"the rollout of {name} by {holder} {what} at its next look (within seconds)"}


def promote(name):
    """
    Tell the running rollout of deployment ``name`` to go on: past its
    pause (a ``pause`` step, or an inconclusive analysis), or past the
    analysis it runs (that step counts as promoted). The rollout takes it
    within a second or a window of its analysis, and the ledger names who
    promoted it. An error when no rollout of ``name`` runs.

    CLI Example:

    .. code-block:: bash

        salt-run fleet.promote daily-fetcher
    """
    return _tell(name, "promote")


def abort(name):
    """
    Tell the running rollout of deployment ``name`` to stop and send every
    host it changed back to the release it served before (the same
    handover: nothing in flight is killed), at its next look: while it
    pauses or analyses, or before its next batch. An error when no rollout
    of ``name`` runs.

    CLI Example:

    .. code-block:: bash

        salt-run fleet.abort daily-fetcher
    """
    return _tell(name, "abort")


def analysis(name):
    """
    The running (or last) analysis of a rollout of deployment ``name``: for
    the new release and the old ones, tasks succeeded, failed and retried,
    failure rate and p50/p95 run time, overall and per task name; the
    thresholds, the seconds elapsed of the step, and the decision so far
    (``running``, ``passed``, ``failed``, ``inconclusive``) with why.

    CLI Example:

    .. code-block:: bash

        salt-run fleet.analysis daily-fetcher
        salt-run fleet.analysis daily-fetcher --out=json
    """
    from salt.exceptions import CommandExecutionError

    try:
        found = __utils__["saltfleet_steps.live"](_opts(), name)
    except CommandExecutionError as exc:
        return _refuse(f"fleet.analysis: {exc}")
    if not found:
        return _refuse(
            f"fleet.analysis {name}: no rollout of {name} has run an analysis (an analyse step of fleet.deploy)"
        )
    return found


def history(deployment=None, limit=20):
    """
    The deploy ledger, oldest first: each ``fleet.deploy``, ``fleet.rollback``
    and host-level ``deployment.update_code``/``deployment.rollback`` job (who,
    when, deployment, rev, outcome, each host's outcome and release) and each
    lock cleared. ``limit``: the last N entries (0: all).

    CLI Example:

    .. code-block:: bash

        salt-run fleet.history
        salt-run fleet.history daily-fetcher limit=5 --out=yaml
    """
    return __utils__[f"{LEDGER}.view"](_opts(), deployment, limit)


def record(jid, minion, fun, fun_args=None, ret=None, retcode=0):
    """
    Record one host's return of ``deployment.update_code`` or
    ``deployment.rollback`` in the deploy ledger, with the user who sent the
    job. A return is recorded only when the master's job cache has the job
    with this function and these arguments, sent to this minion; its
    deployment and rev are the job's, every field is cut to a bound. The master's reactor calls it for every such
    return (``etc/reactor/saltfleet_ledger.sls``).

    CLI Example:

    .. code-block:: bash

        salt-run fleet.record 20240501100000123456 worker-7 deployment.update_code \\
            fun_args='["daily-fetcher", "v2.3"]' ret='{"result": true, "release": "3f1c9e2"}'
    """
    if fun not in LEDGER_FUNS:
        return {"recorded": False, "comment": f"{_printable(fun, 64)} is not recorded (only {', '.join(LEDGER_FUNS)})"}
    # Everything here came with the return, from the minion: only what the master's job cache confirms is kept.
    load = __utils__[f"{LEDGER}.job_load"](_opts(), str(jid))
    if not load:
        return {"recorded": False, "comment": f"the master has no job {_printable(jid, 32)}"}
    why = __utils__[f"{LEDGER}.return_matches"](_opts(), load, minion, fun, fun_args)
    if why:
        return {"recorded": False, "comment": f"a return of job {jid} from {_printable(minion, 255)}: {why}"}
    user = load.get("user") or "UNKNOWN"
    row = __utils__[f"{ROLLOUT}.outcome"]({"ret": ret, "retcode": retcode})
    # The name and rev recorded are the job's own arguments, as the master sent them.
    entry = __utils__[f"{LEDGER}.host_entry"](jid, minion, fun, load.get("arg"), user, row)
    __utils__[f"{LEDGER}.append"](_opts(), entry)
    return {"recorded": True, **entry}


def status(deployment=None, tgt="*", tgt_type="glob", timeout=10):
    """
    The fleet, live: which programs are down and which held, on which host,
    and which hosts do not answer ``deployment.status`` within ``timeout``
    seconds. salt-run exits non-zero when a program that should run is down
    or a host does not answer, and when no minion hosts ``deployment`` (the
    error says whether pillar names it anywhere) or matches ``tgt``.

    CLI Example:

    .. code-block:: bash

        salt-run fleet.status
        salt-run fleet.status daily-fetcher
        salt-run fleet.status tgt='worker-*' --out=json
    """
    if deployment is None:
        hosts = sorted(__utils__["saltfleet_hosts.deployments_of"](_opts(), tgt, tgt_type))
    else:
        hosts = sorted(__utils__["saltfleet_hosts.hosts_of"](_opts(), deployment, tgt, tgt_type))
    if not hosts and deployment is not None:
        return _refuse(f"fleet.status: {__utils__['saltfleet_hosts.not_hosted'](_opts(), deployment, tgt, tgt_type)}")
    if not hosts and tgt != "*":
        return _refuse(f"fleet.status: no minion matching {tgt!r} ({tgt_type}) hosts a deployment")
    if not hosts:
        return _finish({"summary": "no minion hosts a deployment", "retcode": 0})
    args = [deployment] if deployment else []
    _, returns = __utils__["saltfleet_jobs.publish"](_opts(), hosts, "deployment.status", args, None, timeout)
    return _finish(__utils__["saltfleet_hosts.status_report"](deployment, hosts, returns))


# ------------------------------------------------------------------ the fleet page
# fleet.overview: everything the fleet page (page/, served by salt-api) shows,
# in one call: one runner process instead of one per view. Shapes in
# _utils/saltfleet_page.py.


def _floors(hosts):
    """
    {deployment: {queue: fewest}}: each deployment's ``min_consumers``, the
    highest the master's own pillar gives any of its hosts (as fleet.deploy
    reads it); only that key leaves the pillar.
    """
    assigned = __utils__["saltfleet_assigned.assignments"](_opts())
    floors = {}
    for name, minions in sorted(hosts.items()):
        try:
            found = __utils__["saltfleet_assigned.floors"](name, assigned.specs(name, minions))
        except ValueError as exc:
            log.warning("fleet.overview: %s", exc)
            continue
        if found:
            floors[name] = found
    return floors


def _page_facts(minions, rows):
    """({minion: (status, grains' deployments, mine's deployment.status)}, {deployment: [minion]}), all checked."""
    facts, where = {}, {}
    for data, row in zip(minions, rows, strict=True):
        if not data.known and not data.status:
            continue
        known = {name: facts_.as_dict() for name, facts_ in data.known.items()}
        statuses = {name: status.as_row() for name, status in data.status.items()}
        facts[data.id] = (row["status"], known, statuses)
        for name in data.deployments():
            where.setdefault(name, []).append(data.id)
    return facts, where


def _hosts(rows):
    """``rows`` (this master's), and on a master of masters its syndics' rows: asked only when Salt registered one."""
    import os

    try:
        registered = os.listdir(os.path.join(__opts__["cachedir"], "syndics"))
    except OSError:
        registered = []
    return _with_syndics(rows) if registered and __opts__.get("order_masters") else rows


def overview(perms=None, limit=50, floors=True):
    """
    What the fleet page shows, from the master's cache and the deploy ledger
    (no minion is asked): ``hosts`` (``fleet.inventory``'s rows),
    ``deployments`` (which release serves where and whether they differ,
    each host's programs, held programs with their reason, draining
    generations, ``min_consumers``), ``queues`` (``fleet.queues`` with each
    deployment's floor), ``rollouts`` (the running ones and the last, as the
    ledger has them), ``history`` (``fleet.history``, newest first, the last
    ``limit``), ``capabilities`` (which of the page's verbs,
    ``fleet.deploy``, ``rollback``, ``promote`` and ``abort``, this master's
    runners have) and
    ``actions``: per deployment, which verbs ``perms`` (an eauth user's
    permissions, as salt-api's /login returns them) allow, by Salt's own ACL
    check of the call the page makes (``fleet.deploy NAME rev=...``).

    The floors come from the master's own pillar of every host (a compile
    each, most of the call's time on a large fleet); ``floors=False`` leaves
    them out (``floors_read`` says which), as the page does for its first
    look before it asks again with them.

    CLI Example:

    .. code-block:: bash

        salt-run fleet.overview --out=json
        salt-run fleet.overview perms='["@runner"]' limit=10 --out=yaml
        salt-run fleet.overview floors=False --out=json
    """
    # One pass over the accepted minions, each one's cache entries read (and checked) once, for every view.
    cache = salt.cache.factory(__opts__)
    now = time.time()
    minions = [_minion(cache, minion_id) for minion_id in sorted(_accepted())]
    rows = [_row(data, now) for data in minions]
    facts, where = _page_facts(minions, rows)
    read_floors = salt.utils.data.is_true(floors)
    floors = _floors(where) if read_floors else {}
    entries = __utils__["saltfleet_ledger.read"](_opts())
    running = __utils__["saltfleet_ledger.running"](_opts(), entries)
    items = __utils__["saltfleet_ledger.history"](entries, None, running)
    # Asked here: __salt__ (this runner loader) resolves in the runner's context, not in the utils'.
    exists = {fun for fun in __utils__["saltfleet_page.functions"]() if fun in __salt__}.__contains__
    allowed = __utils__["saltfleet_page.checker"](_opts(), perms)
    return {
        "user": _user(),
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "hosts": _hosts(rows),
        "deployments": __utils__["saltfleet_page.deployments"](facts, floors),
        "queues": __utils__["saltfleet_page.queues"](*__utils__["saltfleet_page.consumers"](facts), floors),
        "rollouts": __utils__["saltfleet_page.rollouts"](entries, running),
        "history": list(reversed(items[-int(limit) :] if limit else items)),
        "capabilities": __utils__["saltfleet_page.capabilities"](exists),
        "actions": __utils__["saltfleet_page.actions"](sorted(where), exists, allowed),
        "floors_read": read_floors,
    }
