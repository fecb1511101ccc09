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

log = logging.getLogger(__name__)

HEARTBEAT = "saltfleet.heartbeat"
STATUS = "deployment.status"
DEFAULT_INTERVAL = 60
# A minion is down once it has missed this many heartbeats (plus a little slack).
MISSED_HEARTBEATS = 2.5
SLACK = 5
CLOUD_KEYS = ("provider", "instance_id", "region", "size", "public_ips", "private_ips")


def _accepted():
    return salt.key.get_key(__opts__).list_status("accepted").get("minions", [])


def _interval(mine):
    try:
        return max(1, int(float(mine.get(HEARTBEAT))))
    except (TypeError, ValueError):
        return DEFAULT_INTERVAL


def _loopback(ip):
    return ip.startswith("127.") or ip == "::1"


def _addresses(cloud, grains):
    public = list(cloud.get("public_ips") or [])
    private = list(cloud.get("private_ips") or [])
    if not public and not private:
        # A host salt-cloud did not create: its own interfaces are what we know.
        private = [ip for ip in grains.get("ipv4", []) if not _loopback(ip)] or list(grains.get("ipv4", []))[:1]
    return public, private


def _deployments(grains, mine):
    """{name: {rev, release, running, programs, supervisord}} from grains and mine."""
    found = {}
    for name, known in (grains.get("saltfleet_deployments") or {}).items():
        facts = known or {}
        found[name] = {
            "rev": facts.get("rev"),
            "release": facts.get("release"),
            "running": None,
            "programs": None,
            "supervisord": None,
        }
    status = mine.get(STATUS)
    if isinstance(status, dict):
        for name, facts in status.items():
            if not isinstance(facts, dict):
                continue
            row = found.setdefault(name, {"rev": None, "release": None})
            # The mine is refreshed by the heartbeat: fresher than the grains.
            row["rev"] = facts.get("rev") or row.get("rev")
            row["release"] = facts.get("release") or row.get("release")
            row["running"] = facts.get("running")
            row["programs"] = len(facts.get("programs") or {})
            row["supervisord"] = facts.get("supervisord")
    return dict(sorted(found.items()))


def _row(minion_id, cache, now):
    grains = cache.fetch("grains", minion_id) or {}
    mine = cache.fetch("mine", minion_id) or {}
    # When the master last heard from the minion: its mine (heartbeat) or its grains (pillar refresh).
    seen = [t for t in (cache.updated(b, minion_id) for b, data in (("mine", mine), ("grains", grains)) if data) if t]
    last_seen = max(seen) if seen else None
    if not isinstance(grains, dict):
        grains = {}
    if not isinstance(mine, dict):
        mine = {}
    interval = _interval(mine)
    up = bool(mine.get(HEARTBEAT)) and last_seen is not None and now - last_seen <= interval * MISSED_HEARTBEATS + SLACK
    cloud = grains.get("saltfleet_cloud") or {}
    public, private = _addresses(cloud, grains)
    return {
        "id": minion_id,
        "status": "up" if up else "down",
        "last_seen": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(last_seen)) if last_seen else None,
        "provider": cloud.get("provider"),
        # The shared provisioning code keeps the instance id top level (autosign_grains compares flat values).
        "instance_id": cloud.get("instance_id") or grains.get("saltfleet_instance_id"),
        "region": cloud.get("region"),
        "size": cloud.get("size"),
        "public_ips": public,
        "private_ips": private,
        "deployments": _deployments(grains, mine),
    }


def _rows(tgt="*", deployment=None, provider=None):
    cache = salt.cache.factory(__opts__)
    now = time.time()
    rows = []
    for minion_id in _accepted():
        if not fnmatch.fnmatchcase(minion_id, tgt):
            continue
        row = _row(minion_id, cache, now)
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
    release = (facts.get("release") or "")[:8] or "-"
    rev = facts.get("rev")
    where = f"{rev}@{release}" if rev and rev != release else release
    if facts.get("running") is None:
        running = "?"
    else:
        running = f"{facts['running']}/{facts['programs']} RUNNING"
    return f"{name} {where} {running}"


def format_table(rows):
    """The inventory as a fixed-width table, one line per minion (and per extra deployment)."""
    header = ["ID", "STATUS", "PROVIDER", "REGION", "SIZE", "PUBLIC IP", "PRIVATE IP", "DEPLOYMENTS"]
    lines = []
    for row in rows:
        cells = [
            row["id"],
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
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=False)]
    out = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=False)).rstrip()
        for line in [header, *lines]
    ]
    up = sum(1 for r in rows if r["status"] == "up")
    out.append(f"{len(rows)} minions, {up} up, {len(rows) - up} down")
    return "\n".join(out)


def inventory(tgt="*", deployment=None, provider=None):
    """
    One row per minion: id, status (up/down), provider, instance id, region,
    size, public and private IPs, last time seen, and each deployment with its
    rev, release (SHA) and how many of its programs are RUNNING.

    Prints a table; ``--out=json`` or ``--out=yaml`` give the rows as data.

    tgt
        Glob on minion ids (default ``*``).
    deployment
        Only the minions that run this deployment.
    provider
        Only the minions of this cloud provider (``local``, ``ec2``, ``rackspace``).

    .. code-block:: bash

        salt-run fleet.inventory
        salt-run fleet.inventory deployment=daily-fetcher --out=json
        salt-run fleet.inventory provider=ec2 tgt='worker-*'
    """
    rows = _rows(tgt, deployment, provider)
    return format_table(rows) if _as_text() else rows


def _group(prefix, name):
    # Ansible group names: letters, digits and underscores.
    return f"{prefix}_{re.sub(r'[^A-Za-z0-9_]', '_', str(name))}"


def ansible_inventory(tgt="*", deployment=None, provider=None):
    """
    The fleet as Ansible dynamic-inventory JSON: a group per deployment
    (``deployment_<name>``), per provider (``provider_<name>``) and per
    status (``salt_up``/``salt_down``); hostvars hold ``ansible_host``, the
    cloud facts, the deployments and every cached grain under ``salt_grains``.

    .. code-block:: bash

        salt-run fleet.ansible_inventory --out=json > fleet.json
        ansible all -i fleet.json -m setup
    """
    cache = salt.cache.factory(__opts__)
    groups = {}
    hostvars = {}
    for row in _rows(tgt, deployment, provider):
        host = row["id"]
        grains = cache.fetch("grains", host) or {}
        address = (row["public_ips"] or row["private_ips"] or [None])[0]
        hostvars[host] = {
            "ansible_host": address or host,
            "salt_status": row["status"],
            "salt_last_seen": row["last_seen"],
            "saltfleet_cloud": {key: row[key] for key in CLOUD_KEYS},
            "saltfleet_deployments": row["deployments"],
            "salt_grains": grains,
        }
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


def admit(minion_id, instance_id, pub):
    """
    Accept the pending key of a cloud-init host if salt-cloud's autosign ticket
    for ``instance_id`` names ``minion_id`` and that key is ``pub``; the ticket
    is then used up. A key whose instance was launched as another minion is
    rejected; anything else stays pending. The master's reactor on
    ``salt/auth`` (``etc/reactor/saltfleet_autosign.sls``) calls it with what
    the minion sent; by hand it re-checks a key left pending.

    Returns minion_id, instance_id, result (accepted, rejected or pending) and
    the reason.

    CLI Example:

    .. code-block:: bash

        salt-run fleet.admit worker-7 i-0abc1234def567890 "$(cat /etc/salt/pki/master/minions_pre/worker-7)"
    """
    return __utils__["saltfleet_cloud.admit"](__opts__, minion_id, instance_id, pub)


# ------------------------------------------------------------------ Celery queues
# fleet.queues: each Celery queue with the workers that consume it across the
# fleet, from the master's cache like fleet.inventory: the mine's
# deployment.status rows, whose ``workers`` are the serving generation's nodes
# as they answered ({node: {"queues": [...], "active": n}}, or {"error": ...}
# when they did not).


def _consumers(tgt="*", deployment=None, queue=None):
    """({queue: [consumer, ...]}, [deployments whose workers did not answer]) from the mine."""
    cache = salt.cache.factory(__opts__)
    now = time.time()
    queues, unanswered = {}, []
    for minion_id in sorted(_accepted()):
        if not fnmatch.fnmatchcase(minion_id, tgt):
            continue
        mine = cache.fetch("mine", minion_id) or {}
        rows = mine.get(STATUS) if isinstance(mine, dict) else None
        if not isinstance(rows, dict):
            continue
        # A minion that stopped reporting: its workers are what they were when it last did.
        status = _row(minion_id, cache, now)["status"]
        for name, facts in sorted(rows.items()):
            workers = facts.get("workers") if isinstance(facts, dict) else None
            if (deployment and name != deployment) or not isinstance(workers, dict):
                continue
            if isinstance(workers.get("error"), str):
                unanswered.append({"minion": minion_id, "deployment": name, "error": workers["error"]})
                continue
            for node, worker in sorted(workers.items()):
                if not isinstance(worker, dict):
                    continue
                for name_of_queue in worker.get("queues") or []:
                    if queue and not fnmatch.fnmatchcase(name_of_queue, queue):
                        continue
                    queues.setdefault(name_of_queue, []).append(
                        {
                            "minion": minion_id,
                            "deployment": name,
                            "node": node,
                            "active": worker.get("active"),
                            "status": status,
                        }
                    )
    return dict(sorted(queues.items())), unanswered


def _format_queues(report):
    lines = []
    width = max([len("QUEUE"), *(len(q) for q in report["queues"])])
    lines.append(f"{'QUEUE'.ljust(width)}  CONSUMERS  NODES (tasks in hand)")
    for name, info in report["queues"].items():
        nodes = ", ".join(
            f"{c['node']} ({c['active']})" + ("" if c["status"] == "up" else f" on {c['minion']}, down")
            for c in info["consumers"]
        )
        lines.append(f"{name.ljust(width)}  {info['up']:>2} up/{len(info['consumers']):<2}  {nodes}")
    for row in report["unanswered"]:
        lines.append(f"not answering: {row['deployment']} on {row['minion']}: {row['error']}")
    return "\n".join(lines)


def queues(tgt="*", deployment=None, queue=None):
    """
    Each Celery queue with the workers that consume it across the fleet:
    per consumer its minion, deployment, node and tasks in hand, and whether
    the minion is up; ``up`` counts the consumers on minions that are.
    Read from the master's cache (the mine's ``deployment.status``, refreshed
    by the heartbeat), so a queue none of whose workers answers is not
    listed; deployments whose workers did not answer are, under
    ``unanswered``.

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
    found, unanswered = _consumers(tgt, deployment, queue)
    report = {
        "queues": {
            name: {"up": sum(1 for c in consumers if c["status"] == "up"), "consumers": consumers}
            for name, consumers in found.items()
        },
        "unanswered": unanswered,
    }
    return _format_queues(report) if _as_text() else report
