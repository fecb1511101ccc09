"""
Which minions host which deployments, for the ``fleet`` runner: as the master
last heard (its cache of grains, mine and pillar, each minion's data checked
by ``saltfleet_minion_data``), and, for ``fleet.status``, how they fare as
they answer now.

A minion hosts a deployment when the master's own pillar assigns it there
(``saltfleet_assigned``) and the minion reported it: what a minion says of
a deployment pillar never gave it makes it a stray, never a host.
"""

import salt.cache
import salt.loader.context
import salt.utils.minions

__virtualname__ = "saltfleet_hosts"


def __virtual__():
    return __virtualname__


def _utils(name):
    # Salt's utils loader packs no __utils__ into utils modules: the loader in context holds them.
    loader = salt.loader.context.loader_ctxvar.get()
    return loader.pack.get("__utils__", loader)[name]


def _cached(opts, tgt, tgt_type):
    """
    The checked Minion (``saltfleet_minion_data``: grains' and mine's
    deployments, bad values left out) of each accepted minion matching
    ``tgt``, as the master last heard.
    """
    cache = salt.cache.factory(opts)
    read = _utils("saltfleet_minion_data.minion")
    for minion in sorted(salt.utils.minions.CkMinions(opts).check_minions(tgt, tgt_type)["minions"]):
        yield read(cache, minion)


def claimed(opts, name, tgt="*", tgt_type="glob", assigned=None):
    """
    ({minion: the release it serves, or None}, [strays]) of the accepted
    minions matching ``tgt`` that say they run deployment ``name`` (cached
    grains ``saltfleet_deployments`` and the mine's ``deployment.status``):
    the first those the master's own pillar assigns it (``saltfleet_assigned``),
    the strays those it does not, whatever they say.
    """
    assigned = assigned or _utils("saltfleet_assigned.assignments")(opts)
    found, strays = {}, []
    for data in _cached(opts, tgt, tgt_type):
        if name not in data.known and name not in data.status:
            continue
        if not assigned.assigns(data.id, name):
            strays.append(data.id)
            continue
        # The mine is refreshed after every change: fresher than the grains.
        status, known = data.status.get(name), data.known.get(name)
        found[data.id] = (status.release if status else None) or (known.release if known else None)
    return found, strays


def hosts_of(opts, name, tgt="*", tgt_type="glob", assigned=None):
    """
    The accepted minions matching ``tgt`` that host deployment ``name``: the
    master's pillar assigns it to them and they reported it.
    {minion: the release it serves, or None}.
    """
    return claimed(opts, name, tgt, tgt_type, assigned)[0]


def named_in_pillar(opts):
    """
    {deployment: [minions]}: the deployments each accepted minion's pillar
    names, as the master last compiled it (its cache, refreshed at every
    pillar refresh of the minion: a ``state.apply``, ``saltutil.refresh_pillar``).
    """
    cache = salt.cache.factory(opts)
    found = {}
    for minion in sorted(salt.utils.minions.CkMinions(opts).check_minions("*", "glob")["minions"]):
        pillar = cache.fetch("pillar", minion) or {}
        deployments = pillar.get("deployments") if isinstance(pillar, dict) else None
        for name in deployments if isinstance(deployments, dict) else ():
            found.setdefault(str(name), []).append(minion)
    return found


def _few(names, most=5):
    names = list(names)
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def not_hosted(opts, name, tgt="*", tgt_type="glob"):
    """
    Why no minion matching ``tgt`` hosts deployment ``name``, in words: a
    name no minion's pillar has (a typo, most likely), or the minions pillar
    assigns it to, none of which has reported it yet.
    """
    where = "" if tgt == "*" else f" matching {tgt!r}"
    elsewhere = sorted(hosts_of(opts, name)) if tgt != "*" else []
    if elsewhere:
        return f"no minion{where} hosts deployment {name}; {_few(elsewhere)} host it"
    named = named_in_pillar(opts)
    if name not in named:
        return (
            f"no minion's pillar names deployment {name!r}; pillar names {_few(sorted(named)) or 'no deployment'} "
            "(as the master last compiled each minion's pillar)"
        )
    minions = named[name]
    return (
        f"no minion{where} hosts deployment {name}: pillar assigns it to {_few(minions)}, and none of them "
        f"has reported it yet (`salt -L {','.join(minions[:5])} state.apply` installs it)"
    )


def deployments_of(opts, tgt="*", tgt_type="glob"):
    """{minion: [deployment names]} of the accepted minions matching ``tgt`` that host any (``hosts_of``'s sense)."""
    assigned = _utils("saltfleet_assigned.assignments")(opts)
    found = {}
    for data in _cached(opts, tgt, tgt_type):
        names = [n for n in data.deployments() if assigned.assigns(data.id, n)] if data.deployments() else []
        if names:
            found[data.id] = names
    return found


def status_report(name, expected, returns):
    """
    ``deployment.status`` returns of the fleet folded into what an operator
    looks for: programs down and held, by host and deployment, and the hosts
    that did not answer; retcode 1 when any should-run program is down or a
    host did not answer.
    """
    down, held, errors, up = {}, {}, {}, {}
    read = _utils("saltfleet_minion_data.statuses")
    count, reason = _utils("saltfleet_rollout.count"), _utils("saltfleet_rollout.reason")
    for minion in sorted(returns):
        ret = returns[minion].get("ret")
        if not isinstance(ret, dict):
            errors[minion] = reason(ret)
            continue
        rows, problems = read(ret, "deployment.status")
        if problems:
            errors[minion] = reason("bad data: " + "; ".join(problems))
        for deployment, row in rows.items():
            holds, programs = row.held, row.programs
            kept = {p for p in programs if "*" in holds or p.split(":")[0] in holds}
            if row.supervisord != "running":
                bad = [f"supervisord {row.supervisord}"]
            else:
                bad = [f"{p} {s}" for p, s in sorted(programs.items()) if s != "RUNNING" and p not in kept]
            if bad:
                down.setdefault(minion, {})[deployment] = bad
            if holds:
                held.setdefault(minion, {})[deployment] = {
                    ("all programs" if p == "*" else p): why or "no reason given" for p, why in holds.items()
                }
            if not bad:
                up.setdefault(minion, []).append(f"{deployment} {(row.release or '-')[:12]} {row.summary}")
    silent = sorted(set(expected) - set(returns))
    parts = [count(len(expected), "host")]
    parts += [f"{len(down)} with programs down"] if down else []
    parts += [f"{len(held)} with programs held"] if held else []
    parts += [f"{len(silent)} not answering"] if silent else []
    parts += [f"{len(errors)} with errors"] if errors else []
    if not (down or silent or errors):
        parts.append("every program that should run is running")
    out = {"summary": ", ".join(parts), "down": down, "held": held, "not answering": silent, "up": up}
    if name:
        out["deployment"] = name
    if errors:
        out["errors"] = errors
    out["retcode"] = 1 if (down or silent or errors) else 0
    return out
