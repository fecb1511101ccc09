"""
A deployment's manifest: root's record of what it serves (release, venv,
generation, history, draining generations) and of what an operator asked for
(a pinned rev, held programs, a virtualenv rebuild). It is the one fact every
reader trusts (the state, the operator verbs, the grains, the runners through
the mine), written atomically in root's state dir; this file alone reads and
writes it.

Operator intent and pillar meet here: a rev an operator pinned wins over
pillar's until pillar names the same one (or ``deployment.unpin``), and
:func:`settled` says whether a deployment already serves what is asked, for
the fleet SLS (is a process of its own worth starting?) and for the plan (is
git worth asking?) alike.
"""

import time
from dataclasses import dataclass, field

import salt.loader.context

__virtualname__ = "saltfleet_manifest"

# What the grains (and so `-G saltfleet_deployments:NAME:*`) show of each deployment.
PUBLIC_KEYS = ("rev", "release", "subject", "repo", "user", "updated")


def __virtual__():
    return __virtualname__


def _utils(name):
    # Salt's utils loader packs no __utils__ into utils modules: the loader in context.
    loader = salt.loader.context.loader_ctxvar.get()
    return loader.pack.get("__utils__", loader)[name]


def _now():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read(p):
    """What a deployment serves, as its last change recorded it ({} when not installed)."""
    data = _utils("saltfleet_files.read_json")(p["manifest"], {})
    return data if isinstance(data, dict) else {}


def installed(root):
    """Manifests of the deployments installed under ``root``, by name."""
    folder = _utils("saltfleet_paths.registry")(root) / "deployments"
    found = {}
    if folder.is_dir():
        for entry in sorted(folder.iterdir()):
            data = _utils("saltfleet_files.read_json")(entry / "manifest.json")
            if isinstance(data, dict) and data.get("user"):
                found[entry.name] = data
    return found


def public(manifest):
    """The facts a host shows of a deployment (its grain)."""
    return {key: manifest.get(key) for key in PUBLIC_KEYS}


def _write(p, record):
    _utils("saltfleet_files.write_json")(p["manifest"], record)


# ----------------------------------------------------------------- intent


@dataclass(frozen=True)
class Intent:
    """What an operator asked of a deployment on this host."""

    pin: dict = None  # {"value": rev, "by", "at"}
    holds: dict = field(default_factory=dict)  # {program or "*": {"reason", "by", "at"}}
    rebuild: int = 0  # how many fresh virtualenvs were asked for


def intent(manifest):
    operator = manifest.get("operator") or {}
    return Intent(
        pin=operator.get("rev"), holds=dict(operator.get("holds") or {}), rebuild=operator.get("venv_rebuild", 0)
    )


def pin(p, rev, by):
    """Pin ``rev`` (an operator's update_code or rollback); the pin it replaced, to put back if the change fails."""
    return _operator(p, lambda op: op.update(rev={"value": rev, "by": by, "at": _now()}), "rev")


def restore_pin(p, previous):
    """Put back the pin :func:`pin` replaced (None: no pin)."""
    _operator(p, lambda op: op.update(rev=previous) if previous else op.pop("rev", None))


def unpin(p):
    """Drop the operator's pinned rev: the pin dropped (None: there was none)."""
    return _operator(p, lambda op: op.pop("rev", None), "rev")


def hold(p, program, reason, by):
    key = program or "*"
    _operator(
        p, lambda op: op.update(holds={**(op.get("holds") or {}), key: {"reason": reason, "by": by, "at": _now()}})
    )


def unhold(p, program=None):
    def release(op):
        holds = dict(op.get("holds") or {})
        for key in [program] if program else list(holds):
            holds.pop(key, None)
        op["holds"] = holds

    _operator(p, release)


def request_rebuild(p):
    _operator(p, lambda op: op.update(venv_rebuild=op.get("venv_rebuild", 0) + 1))


def _operator(p, change, returned=None):
    record = read(p)
    operator = dict(record.get("operator") or {})
    before = operator.get(returned) if returned else None
    change(operator)
    record["operator"] = operator
    _write(p, record)
    return before


def held(manifest, program=None):
    """The hold that keeps ``program`` (or, without one, any program) stopped, or None."""
    holds = intent(manifest).holds
    return holds.get("*") or (holds.get(program) if program else next(iter(holds.values()), None))


def wanted_rev(manifest, pillar_rev, asked=False, minion_id=None):
    """
    (rev, note): the rev to deploy, and the note a comment gives when an
    operator's pinned rev wins over pillar's (None otherwise), with the
    command that unpins it as typed on the master for ``minion_id``.
    ``asked``: the state was given a rev itself (update_code), which wins.
    """
    pinned = intent(manifest).pin
    if not pinned or asked or pinned["value"] == pillar_rev:
        return pillar_rev, None
    unpin = f"deployment.unpin {manifest.get('name')}"
    return pinned["value"], (
        f"rev '{pinned['value']}' set by {pinned['by']} at {pinned['at']} is kept, though pillar says '{pillar_rev}' "
        f"(`{f'salt {minion_id} ' if minion_id else ''}{unpin}` follows pillar again)"
    )


# ----------------------------------------------------------------- record


def record(p, cfg, pillar_rev, **fields):
    """
    Update the manifest (root's) with the deployment's identity and
    ``fields``, when what it says changed: a rev pin pillar has caught up
    with is dropped, and the change is stamped.
    """
    old = read(p)
    new = dict(old)
    new.update(
        name=cfg["name"],
        user=cfg["user"],
        repo=cfg["repo"],
        rev=cfg["rev"],
        requirements=cfg["requirements"],
        python=cfg["python"],
        **fields,
    )
    operator = new.get("operator") or {}
    if (operator.get("rev") or {}).get("value") == cfg["rev"] == pillar_rev:
        new["operator"] = {k: v for k, v in operator.items() if k != "rev"}
    if new != old:
        new["updated"] = _now()
        for entry in new.get("history") or []:
            entry.setdefault("deployed", new["updated"])
        _write(p, new)
    return new


# ---------------------------------------------------------------- settled


def settled(manifest, cfg, fleet_sha=None, rebuild=None):
    """
    True when the deployment serves what is asked of it, so that no git
    request and no build is needed to know it: same repo, rev and virtualenv
    inputs, and a release that is the rev itself (a SHA) or the commit the
    master resolved it to for this wave (``fleet_sha``).
    """
    return bool(
        manifest.get("release")
        and manifest.get("venv")
        and all(manifest.get(key) == cfg.get(key) for key in ("repo", "rev", "requirements", "python"))
        and manifest.get("rebuild", 0) == (intent(manifest).rebuild if rebuild is None else rebuild)
        and manifest["release"] in (cfg.get("rev"), fleet_sha)
    )
