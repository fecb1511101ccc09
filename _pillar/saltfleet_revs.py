"""
One commit per rollout: the master resolves each deployment's ``rev`` (a
branch or tag) to a commit once for the whole fleet, and every host of the
wave deploys that commit.

Without it, each host asks the git server itself on every apply: N hosts x M
deployments round trips for a no-op, and hosts of one rollout land on
different commits when someone pushes mid-rollout. With it, the master asks
once per ``ttl`` seconds (per repo and rev, across all minions) and hands the
answer to each minion's pillar as ``saltfleet_revs:<name>`` ({repo, rev,
sha}); the deployment state deploys that commit when repo and rev still match
its own, and asks git itself otherwise (an operator's
``deployment.update_code``, a master that could not reach the server).

Master config (etc/master.d/saltfleet.conf):

.. code-block:: yaml

    pillar_dirs:
      - /srv/saltfleet/_pillar
    ext_pillar:
      - saltfleet_revs:
          ttl: 60

A push during a wave longer than ``ttl`` can still split it; ``salt-run
fleet.deploy`` resolves its rev once for the whole rollout.
"""

import hashlib
import logging
import re
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

__virtualname__ = "saltfleet_revs"

SHA_RE = re.compile(r"^[0-9a-f]{40}$")


def __virtual__():
    if "saltfleet_git.ls_remote" not in __utils__:
        return False, "saltfleet's _utils are not on the master's utils_dirs"
    return __virtualname__


def _resolve(name, spec):
    """The commit the remote gives spec's rev now, or None (logged) when it cannot be asked."""
    git = "saltfleet_git"
    cfg = {
        "name": name,
        "repo": spec["repo"],
        "deploy_key": spec.get("deploy_key"),
        "known_hosts": spec.get("known_hosts"),
    }
    with tempfile.TemporaryDirectory(prefix="saltfleet-revs-") as tmp:
        secrets = {key: Path(tmp) / key for key in ("deploy_key", "known_hosts")}
        try:
            __utils__[f"{git}.write_secrets"](cfg, secrets)
            return __utils__[f"{git}.resolve_remote"](spec["rev"], __utils__[f"{git}.ls_remote"](cfg, secrets))
        except Exception as exc:  # pylint: disable=broad-except
            log.warning("saltfleet_revs: %s: the minions will resolve rev themselves: %s", name, exc)
            return None


def ext_pillar(minion_id, pillar, ttl=60):  # pylint: disable=unused-argument
    """{"saltfleet_revs": {name: {repo, rev, sha}}} for the deployments in this minion's pillar."""
    deployments = pillar.get("deployments")
    if not isinstance(deployments, dict):
        return {}
    wanted = {
        name: spec
        for name, spec in deployments.items()
        if isinstance(spec, dict)
        and isinstance(spec.get("repo"), str)
        and isinstance(spec.get("rev", "HEAD"), str)
        and not SHA_RE.match(spec.get("rev", "HEAD"))
    }
    if not wanted:
        return {}
    folder = Path(__opts__["cachedir"]) / "saltfleet"
    folder.mkdir(mode=0o700, exist_ok=True)
    cache = folder / "revs.json"
    now = time.time()
    files = "saltfleet_files"
    found = {}
    with __utils__[f"{files}.lock"](folder / "revs.lock", f"ext_pillar saltfleet_revs for {minion_id}"):
        known = __utils__[f"{files}.read_json"](cache, {}) or {}
        for name, spec in wanted.items():
            rev = spec.get("rev", "HEAD")
            # A new deploy key or host key pin is asked with, never answered from what another pin allowed.
            pins = hashlib.sha256(f"{spec.get('deploy_key')}\0{spec.get('known_hosts')}".encode()).hexdigest()[:16]
            key = f"{spec['repo']} {rev} {pins}"
            entry = known.get(key)
            if not entry or now - entry["at"] > float(ttl):
                sha = _resolve(name, {**spec, "rev": rev})
                entry = {"sha": sha, "at": now} if sha else None
                if entry:
                    known[key] = entry
            if entry:
                found[name] = {"repo": spec["repo"], "rev": rev, "sha": entry["sha"]}
        known = {k: v for k, v in known.items() if now - v["at"] <= float(ttl)}
        __utils__[f"{files}.write_json"](cache, known, 0o600)
    return {"saltfleet_revs": found}
