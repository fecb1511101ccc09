"""
Which minions a deployment belongs to, by the master's own word.

A minion's grains and mine say which deployments it runs, and the pillar the
master caches for it has what the minion's request merged in
(``pillar_override``, sent with ``state.apply pillar=...``): all three are
the minion's to write. A rollout's hosts, its hooks and its Celery floors
come instead from the pillar the master compiles for each minion from its own
sources: the top file (match deployments by minion id: grains are the
minion's too), ``pillar_roots`` and the ext_pillars, with nothing the minion
sends. ``saltfleet_revs`` is left out of that compile: it resolves revs,
assigns nothing, and would ask git servers for every host.
"""

import logging

import salt.cache
import salt.loader
import salt.loader.context
import salt.pillar

__virtualname__ = "saltfleet_assigned"

log = logging.getLogger(__name__)

# ext_pillars that assign no deployment, left out of the master's compile here.
NOT_ASSIGNING = ("saltfleet_revs",)


def __virtual__():
    return __virtualname__


def _utils(name):
    # Salt's utils loader packs no __utils__ into utils modules: the loader in context holds them.
    loader = salt.loader.context.loader_ctxvar.get()
    return loader.pack.get("__utils__", loader)[name]


def _own_opts(opts):
    opts = dict(opts)
    opts["ext_pillar"] = [
        ext
        for ext in opts.get("ext_pillar") or []
        if not (isinstance(ext, dict) and any(name in ext for name in NOT_ASSIGNING))
    ]
    return opts


def pillar(opts, minion, functions=None):
    """
    The pillar the master compiles for ``minion`` from its own sources
    (``pillar.show_pillar``'s compile, without ``saltfleet_revs``); the
    cached grains only match the top file, and only when they are a mapping.
    ``functions``: the execution modules its renderers call (a loader of
    the master's opts; built anew when none is given, as Salt's own
    compile does, which takes most of a compile's time).
    """
    grains = salt.cache.factory(opts).fetch("grains", minion)
    grains = dict(grains) if isinstance(grains, dict) else {}
    grains["id"] = minion
    own = _own_opts(opts)
    compiled = salt.pillar.Pillar(
        own, grains, minion, own.get("saltenv") or "base", functions=functions, pillarenv=own.get("pillarenv")
    )
    data = compiled.compile_pillar()
    if data.get("_errors"):
        log.warning("saltfleet: the master's pillar of %r does not render whole: %s", minion, data["_errors"])
    return data


class Assignments:
    """The deployments the master's pillar assigns each minion, each minion compiled once (one runner call)."""

    def __init__(self, opts):
        self.opts = opts
        self.known = {}
        self.functions = None

    def of(self, minion):
        """{deployment: its pillar spec} the master's pillar gives ``minion``."""
        if minion not in self.known:
            if self.functions is None:
                # One loader of the master's execution modules for every minion's compile: they run with the
                # master's opts whichever minion's pillar renders (grains reach the templates, not them).
                self.functions = salt.loader.minion_mods(_own_opts(self.opts))
            deployments = pillar(self.opts, minion, self.functions).get("deployments")
            deployments = deployments if isinstance(deployments, dict) else {}
            self.known[minion] = {
                str(name): spec if isinstance(spec, dict) else {} for name, spec in deployments.items()
            }
        return self.known[minion]

    def assigns(self, minion, name):
        return name in self.of(minion)

    def specs(self, name, minions):
        """{minion: spec of ``name``} of the ``minions`` the master's pillar assigns ``name``."""
        return {m: self.of(m)[name] for m in sorted(minions) if self.assigns(m, name)}


def assignments(opts):
    """A fresh ``Assignments`` (compiles on demand, once per minion)."""
    return Assignments(opts)


def floors(name, specs):
    """
    {queue: fewest} of deployment ``name`` from its hosts' pillar ``specs``
    ({minion: spec}): the highest floor any host's pillar gives a queue.
    ValueError naming the host when one's ``min_consumers`` is malformed.
    """
    found = {}
    for minion, spec in sorted(specs.items()):
        given = spec.get("min_consumers") or {}
        errors = []
        if not _utils("saltfleet_schema.check_min_consumers")(f"deployments:{name}:min_consumers", given, errors):
            raise ValueError(f"{'; '.join(errors)} (the master's pillar of {minion})")
        for queue, floor in given.items():
            found[queue] = max(found.get(queue, 0), floor)
    return dict(sorted(found.items()))


def _one(name, key, specs, read, passed):
    """
    What ``read`` finds in each host's pillar spec of ``name``: one value for
    the deployment, so hosts whose pillar differs are a ValueError naming two
    of them (``passed``: the runner's arguments that override it). None without hosts.
    """
    seen = {}
    for minion, spec in sorted(specs.items()):
        found = read(spec)
        seen.setdefault(repr(found), (minion, found))
    if len(seen) > 1:
        (one, _), (other, _) = list(seen.values())[:2]
        raise ValueError(
            f"deployments:{name}:{key}: the master's pillar gives {one} and {other} different {key}; "
            f"give every host of the deployment the same, or pass {passed}"
        )
    return next(iter(seen.values()))[1] if seen else None


def hooks(name, specs):
    """{pre, post: [argv...]} of deployment ``name`` from its hosts' pillar ``specs`` (one set: ``_one``)."""
    read = _utils("saltfleet_rollout.hooks_in_pillar")
    found = _one(name, "hooks", specs, lambda spec: read({"deployments": {name: spec}}, name), "pre=/post=")
    return found or {"pre": [], "post": []}


def rollout(name, specs):
    """``deployments:<name>:rollout`` ({steps, analysis}) of its hosts' pillar ``specs`` (one: ``_one``)."""
    return _one(name, "rollout", specs, lambda spec: spec.get("rollout") or {}, "steps=/analysis=") or {}
