"""
One commit per wave, and never an old one: the master resolves each
deployment's ``rev`` (a branch or tag) to a commit for the hosts that ask
together, and every host of the wave deploys that commit.

Without it, each host asks the git server itself on every apply: N hosts x M
deployments round trips for a no-op, and hosts of one rollout land on
different commits when someone pushes mid-rollout. With it, a minion's pillar
carries ``saltfleet_revs:<name>`` ({repo, rev, sha, at}); the deployment state
deploys that commit when repo and rev still match its own, and asks git itself
otherwise (an operator's ``deployment.update_code``, a master that could not
reach the server).

Every answer comes from a ``git ls-remote`` that began after the minion asked
(pillar is compiled at the start of each ``state.apply``): minions that ask
while one runs share the next, so a wave of N hosts costs one or two requests
per repo, and an apply typed right after a push deploys the push. ``at`` says
when that request began.

What it trusts: only the master's own pillar of the minion (pillar_roots and
the top file), never what the minion's request overrides (``pillar=...``,
which a minion may send for itself), so no minion makes the master ask an
address of its choosing. git runs with the deployment's deploy key and pinned
host keys alone: no ssh config, agent or identity of root's, no git config or
credential helper. A deployment reached over ssh without a deploy key is left
to its hosts. Each repo has its own lock, held only while its own request
runs, and git's connect and total time are bounded (``timeout``): a slow
server delays only the minions that use it, and past the bound they resolve
rev themselves.

Master config (etc/master.d/saltfleet.conf):

.. code-block:: yaml

    pillar_dirs:
      - /srv/saltfleet/_pillar
    ext_pillar:
      - saltfleet_revs:
          timeout: 20

A push during a wave can still split it; ``salt-run fleet.deploy`` resolves
its rev once for the whole rollout.
"""

import hashlib
import logging
import re
import time
from pathlib import Path

from salt.exceptions import CommandExecutionError

log = logging.getLogger(__name__)

__virtualname__ = "saltfleet_revs"

SHA_RE = re.compile(r"^[0-9a-f]{40}$")


def __virtual__():
    if "saltfleet_git.ls_remote" not in __utils__:
        return False, "saltfleet's _utils are not on the master's utils_dirs"
    return __virtualname__


def _own_deployments():
    """
    The deployments the master's own pillar gives the minion. ``__pillar__``
    is what the top file rendered; the ``pillar`` argument also holds what
    the minion's request overrides (Salt merges it in before ext_pillars).
    """
    deployments = __pillar__.get("deployments")  # pylint: disable=undefined-variable
    return deployments if isinstance(deployments, dict) else {}


def _wanted(deployments):
    """{name: spec} of the deployments a master may resolve: a branch or tag of a repo it may ask."""
    wanted = {}
    for name, spec in deployments.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("repo"), str):
            continue
        rev = spec.get("rev", "HEAD")
        if not isinstance(rev, str) or SHA_RE.match(rev):
            continue
        wanted[name] = {**spec, "rev": rev}
    return wanted


def _fresh(folder, name, spec, asked, deadline):
    """
    (sha, at) from an ls-remote that began at or after ``asked``: the one a
    minion that asked earlier just made, or this minion's own. The lock is
    this repo's and rev's alone; nothing is waited for past ``deadline``.
    """
    pins = f"{spec['repo']}\0{spec['rev']}\0{spec.get('deploy_key')}\0{spec.get('known_hosts')}"
    key = hashlib.sha256(pins.encode()).hexdigest()[:32]
    record_path = folder / f"{key}.json"
    holder = f"ext_pillar saltfleet_revs {name}"
    try:
        with __utils__["saltfleet_files.lock"](folder / f"{key}.lock", holder, max(0.0, deadline - time.time())):
            record = __utils__["saltfleet_files.read_json"](record_path, {}) or {}
            if record.get("started", 0) < asked:
                record = {"started": time.time()}
                record["sha"] = __utils__["saltfleet_git.resolve_here"](
                    name, spec, spec["rev"], max(1.0, deadline - time.time())
                )
                __utils__["saltfleet_files.write_json"](record_path, record, 0o600)
    except CommandExecutionError as exc:
        log.warning("saltfleet_revs: %s: the minions resolve rev themselves: %s", name, exc)
        return None, None
    return record.get("sha"), record["started"]


def ext_pillar(minion_id, pillar, timeout=20, ttl=None):  # pylint: disable=unused-argument
    """
    {"saltfleet_revs": {name: {repo, rev, sha, at}}} for the deployments the
    master's own pillar gives this minion. ``ttl`` (of older configs) is
    ignored: an answer is never older than the question.
    """
    asked = time.time()
    wanted = _wanted(_own_deployments())
    if not wanted:
        return {}
    folder = Path(__opts__["cachedir"]) / "saltfleet" / "revs"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    found = {}
    for name, spec in wanted.items():
        sha, started = _fresh(folder, name, spec, asked, asked + float(timeout))
        if sha:
            at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started))
            found[name] = {"repo": spec["repo"], "rev": spec["rev"], "sha": sha, "at": at}
    return {"saltfleet_revs": found}
