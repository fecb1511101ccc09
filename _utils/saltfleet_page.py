"""
What the fleet page reads (``salt-run fleet.overview``), shaped from what the
master already knows: its minion data cache (grains, the mine's
``deployment.status``, cached pillar) and the deploy ledger. The runner
gathers; these functions shape, and ask Salt's own ACL checker what a user
may do. Nothing here reaches a minion.

Every value shown on the page is rendered there as text; values are still
bounded here (strings cut to TEXT_MAX, containers of the types expected), as
a minion's mine rows, a commit's subject and an operator's hold reason come
from elsewhere.

Shapes (README, "The fleet page", has them for the page's readers):

``deployments``: {name: {hosts, releases, drift, min_consumers}}
    ``hosts``: {minion: {status (its minion up/down), release, rev, subject
    (the release's commit subject), state (up/down), summary, running,
    total, programs {program: state}, held {program: reason}, draining
    [supervisord pid], draining_tasks {pid: tasks in hand}}};
    ``releases``: {sha: [minion, ...]}; ``drift``: more than one release serves.

``queues``: {queue: {up, consumers [...], floors {deployment: fewest}, below}}
    ``fleet.queues``' rows, with each deployment's ``min_consumers`` floor
    for the queue (a floored queue that nobody consumes is listed too);
    ``below``: fewer consumers up than the highest floor.

``rollouts``: [{id, running, events}]
    The ledger's lines of each rollout that holds its deploy lock, then of
    the last one that finished: the same lines the master fires on its event
    bus as ``saltfleet/rollout/<id>/<event>`` while the rollout runs, so the
    page folds both the same way.

``actions``: {deployment: {deploy, rollback, promote, abort}}
    What the caller's eauth permissions allow, asked of Salt's own check
    (``CkMinions.runner_check``) with the call the page would make
    (``fleet.<verb>`` with the deployment as first positional argument);
    a verb only where the master's runners have its function.
"""

import salt.utils.minions

__virtualname__ = "saltfleet_page"

TEXT_MAX = 500
# Programs listed per host and deployment; more are counted, not listed.
PROGRAMS_MAX = 200
# The page's verbs and the runner functions they call.
ACTIONS = {"deploy": "fleet.deploy", "rollback": "fleet.rollback", "promote": "fleet.promote", "abort": "fleet.abort"}


def __virtual__():
    return __virtualname__


def _text(value, limit=TEXT_MAX):
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _count(value):
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _mapping(value):
    return value if isinstance(value, dict) else {}


def host_entry(status, known, row):
    """
    One host's view of a deployment: ``known``, the grains' facts
    (``saltfleet_deployments:<name>``), and ``row``, the mine's
    ``deployment.status`` row (fresher: the heartbeat refreshes it).
    """
    known, row = _mapping(known), _mapping(row)
    release = row.get("release") or known.get("release")
    programs = _mapping(row.get("programs"))
    listed = dict(sorted(programs.items())[:PROGRAMS_MAX])
    draining = row.get("draining") if isinstance(row.get("draining"), list) else []
    return {
        "status": status,
        "release": _text(release, 64),
        "rev": _text(row.get("rev") or known.get("rev"), 256),
        # The grains name the subject of the release they saw: shown only for that release.
        "subject": _text(known.get("subject")) if known.get("release") == release else None,
        "state": _text(row.get("state"), 16),
        "summary": _text(row.get("summary")),
        "running": _count(row.get("running")),
        "total": len(programs) if row else None,
        "programs": {_text(p, 200): _text(s, 32) for p, s in listed.items()},
        "held": {_text(p, 200): _text(r) for p, r in _mapping(row.get("held")).items()},
        "draining": [pid for pid in draining if _count(pid) is not None][:PROGRAMS_MAX],
        "draining_tasks": {_text(pid, 16): _count(n) for pid, n in _mapping(row.get("draining_tasks")).items()},
    }


def deployments(facts, floors=None):
    """
    The per-deployment view from ``facts``: {minion: (status, grains'
    ``saltfleet_deployments``, mine's ``deployment.status``)}; ``floors``:
    {deployment: {queue: fewest}}.
    """
    out = {}
    for minion in sorted(facts):
        status, known, rows = facts[minion]
        known, rows = _mapping(known), _mapping(rows)
        for name in sorted(n for n in {*known, *rows} if isinstance(n, str)):
            entry = out.setdefault(name, {"hosts": {}, "releases": {}, "drift": False, "min_consumers": {}})
            host = host_entry(status, known.get(name), rows.get(name))
            entry["hosts"][minion] = host
            if host["release"]:
                entry["releases"].setdefault(host["release"], []).append(minion)
    for name, entry in out.items():
        entry["drift"] = len(entry["releases"]) > 1
        entry["min_consumers"] = dict((floors or {}).get(name) or {})
    return out


def consumers(facts):
    """
    ({queue: [consumer]}, [unanswered]) from ``facts`` ({minion: (status,
    grains' deployments, mine's deployment.status)}): as ``fleet.queues``
    reads the mine, each serving Celery node under every queue it consumes
    ({minion, deployment, node, active, status}), and the deployments whose
    workers did not answer ({minion, deployment, error}).
    """
    found, unanswered = {}, []
    for minion in sorted(facts):
        status, _, rows = facts[minion]
        for name, row in sorted(_mapping(rows).items()):
            workers = row.get("workers") if isinstance(row, dict) else None
            if not isinstance(workers, dict):
                continue
            if isinstance(workers.get("error"), str):
                unanswered.append({"minion": minion, "deployment": name, "error": _text(workers["error"])})
                continue
            for node, worker in sorted(workers.items()):
                for queue in (worker.get("queues") or []) if isinstance(worker, dict) else []:
                    consumer = {"minion": minion, "deployment": name, "node": node, "active": worker.get("active")}
                    found.setdefault(queue, []).append({**consumer, "status": status})
    return dict(sorted(found.items())), unanswered


def queues(found, unanswered, floors):
    """
    ``fleet.queues``' report ({queues: {queue: {up, consumers}}, unanswered})
    of ``consumers``' result, with each queue's floors ({deployment: {queue: fewest}}).
    """
    out = {
        q: {"up": sum(c["status"] == "up" for c in rows), "consumers": rows, "floors": {}} for q, rows in found.items()
    }
    for name, by_queue in sorted(floors.items()):
        for queue, floor in sorted(by_queue.items()):
            row = out.setdefault(queue, {"up": 0, "consumers": [], "floors": {}})
            row["floors"][name] = floor
    for row in out.values():
        row["below"] = bool(row["floors"]) and row["up"] < max(row["floors"].values())
    return {"queues": dict(sorted(out.items())), "unanswered": unanswered}


def rollouts(entries, running=(), finished=1):
    """
    The rollouts the page's rollout view starts from: each one in
    ``running`` (ids of rollouts holding their lock) and the last
    ``finished`` others, oldest first, each {id, running, events: its ledger lines}.
    """
    lines, order = {}, []
    for entry in entries:
        if entry.get("type") != "rollout":
            continue
        rid = entry.get("id")
        if rid not in lines:
            lines[rid] = []
            order.append(rid)
        lines[rid].append(entry)
    done = [rid for rid in order if rid not in running]
    shown = {*(rid for rid in order if rid in running), *(done[-finished:] if finished else [])}
    return [{"id": rid, "running": rid in running, "events": lines[rid]} for rid in order if rid in shown]


def checker(opts, perms):
    """
    ``allowed(fun, arg, kwarg)``: whether eauth permissions ``perms`` (a list,
    as salt-api's /login returns them) let a user run runner ``fun`` with
    these arguments, by Salt's own check of a runner call.
    """
    if not isinstance(perms, list) or not perms:
        return lambda fun, arg=(), kwarg=None: False
    check = salt.utils.minions.CkMinions(opts).runner_check

    def allowed(fun, arg=(), kwarg=None):
        return check(perms, fun, {"arg": list(arg), "kwarg": dict(kwarg or {})}) is True

    return allowed


def functions():
    """The runner functions of the page's verbs."""
    return sorted(ACTIONS.values())


def capabilities(exists):
    """{verb: whether its runner function exists (``exists(fun)``)} of the page's verbs."""
    return {verb: bool(exists(fun)) for verb, fun in ACTIONS.items()}


def actions(names, exists, allowed):
    """
    {deployment: {verb: may the caller}} for the page's verbs: the runner
    function exists (``exists(fun)``) and ``allowed(fun, [deployment])``.
    """
    present = capabilities(exists)
    return {
        name: {verb: present[verb] and allowed(fun, [name]) for verb, fun in ACTIONS.items()} for name in sorted(names)
    }
