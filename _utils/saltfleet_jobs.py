"""
A job from the master to a list of minions, for the ``fleet`` runner and its
rollouts: published through Salt's LocalClient, its returns waited for within
a deadline, and a return taken only as the master stored it from that
minion's own return (never from an event any minion could fire).
"""

import logging
import time

import salt.client
import salt.loader
from salt.exceptions import CommandExecutionError

log = logging.getLogger(__name__)

__virtualname__ = "saltfleet_jobs"

# How long a return event may run ahead of the master's job cache before it counts for nothing.
STORED_WAIT = 5


def __virtual__():
    return __virtualname__


def _stored(opts, jid, minion):
    """
    What the master stored in its job cache as ``minion``'s return of ``jid``
    ({ret, retcode}), waiting up to STORED_WAIT s (it stores a return just after
    it fires the return's event); None when it holds none. Without a job cache
    (``job_cache: False``) the event's word is all there is: ``True``.
    """
    if not opts.get("job_cache", True) or opts.get("ext_job_cache"):
        return True
    get_jid = salt.loader.returners(opts, {})[f"{opts.get('master_job_cache', 'local_cache')}.get_jid"]
    deadline = time.monotonic() + STORED_WAIT
    while True:
        stored = get_jid(jid).get(minion)
        if isinstance(stored, dict) and "return" in stored:
            return {"ret": stored["return"], "retcode": stored.get("retcode", 0)}
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def longest(timeout):
    """How long ``publish`` waits at most with ``timeout``: as long again for a host that says it still runs."""
    return 2 * timeout


def publish(opts, hosts, fun, arg=(), kwarg=None, timeout=30, on_jid=None, on_return=None):
    """
    Run ``fun`` on ``hosts`` (minion ids) in one job and wait for their
    returns: a host gets ``timeout`` seconds and as long again as it says it
    is still running the job, never longer. A return counts once, from a host
    the job went to, as the master stored it from that minion's own
    (authenticated) return: a return event another minion fires under its id
    counts for nothing. Returns (jid, {minion: {ret, retcode}}); a host
    missing from the returns did not answer.
    """
    returns = {}
    wanted = set(hosts)
    with salt.client.get_local_client(mopts=opts) as client:
        pub = client.run_job(list(hosts), fun, list(arg), tgt_type="list", timeout=timeout, kwarg=kwarg, listen=True)
        if not isinstance(pub, dict) or not pub.get("jid"):
            raise CommandExecutionError(f"the master did not publish {fun} to {', '.join(hosts)}: is it running?")
        jid = pub["jid"]
        if on_jid:
            on_jid(jid)
        deadline = time.monotonic() + longest(timeout)
        for item in client.get_iter_returns(
            jid, pub.get("minions") or list(hosts), timeout=timeout, tgt=list(hosts), tgt_type="list", block=False
        ):
            if time.monotonic() > deadline or wanted <= set(returns):
                break
            for minion in item if isinstance(item, dict) else ():
                if minion in returns or minion not in wanted:
                    continue
                stored = _stored(opts, jid, minion)
                if stored is None:
                    log.warning(
                        "a return of job %s under id %r that the master holds no return for: ignored", jid, minion
                    )
                    continue
                data = item[minion] if stored is True else stored
                returns[minion] = data if isinstance(data, dict) else {"ret": data}
                if on_return:
                    on_return(minion, returns[minion])
            if not item:
                time.sleep(0.05)
    return jid, returns


def send(opts, hosts, fun, arg=(), kwarg=None):
    """Publish ``fun`` to ``hosts`` and return at once: its jid (None when the master did not take it)."""
    with salt.client.get_local_client(mopts=opts) as client:
        pub = client.run_job(list(hosts), fun, list(arg), tgt_type="list", kwarg=kwarg)
    return pub.get("jid") if isinstance(pub, dict) else None
