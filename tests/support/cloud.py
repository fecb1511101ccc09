"""
What the unit tests of provisioning and admission share: a master's options
under a temporary root (nothing runs there), the event bus those tests see,
and minion key pairs.
"""

import functools
import os
import threading

import salt.config
import salt.key
import salt.utils.cloud
import salt.utils.event

from localfleet.config import master_config

PROVIDER = "fake:fake"


def master_opts(root, **settings):
    """A salt-master's options with saltfleet's master snippet, every path under ``root``; salt-cloud's too.

    ``providers``/``profiles`` hold one provider ``fake`` and its profile
    ``worker``, so cloud settings resolve as salt-cloud resolves them.
    """
    opts = salt.config.master_config(None)
    opts.update(master_config())
    opts.update(
        root_dir=str(root),
        pki_dir=str(root / "pki"),
        sock_dir=str(root / "sock"),
        cachedir=str(root / "cache"),
        providers={"fake": {"fake": {"driver": "fake"}}},
        profiles={"worker": {"provider": PROVIDER}},
        **settings,
    )
    for folder in ("pki", "sock", "cache"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    return opts


class Bus:
    """The master's event bus as a test without a master sees it: every event Salt's code fires, in order.

    ``hold(tag_prefix)`` makes the next event under that prefix wait until
    ``release()``, as a master too busy to take it would: ``reached`` is set
    once something waits there.
    """

    def __init__(self):
        self.events = []
        self.reached = threading.Event()
        self._released = threading.Event()
        self._held = None

    def fire(self, event, data, tag, timeout=1000):
        self.events.append((tag, dict(data)))
        if self._held and tag.startswith(self._held):
            self.reached.set()
            self._released.wait(120)
        return True

    def hold(self, prefix):
        self._held = prefix

    def release(self):
        self._released.set()

    def tags(self, prefix=""):
        return [tag for tag, _ in self.events if tag.startswith(prefix)]


def bus(monkeypatch):
    """A :class:`Bus` in place of the master's event socket for this test."""
    events = Bus()
    monkeypatch.setattr(
        salt.utils.event.SaltEvent, "fire_event", lambda self, data, tag, timeout=1000: events.fire(self, data, tag)
    )
    return events


@functools.cache
def key_pair(n):
    """The n-th minion key pair of this test run, as (private, public): generated once each."""
    return salt.utils.cloud.gen_keys(2048)


def pub(n):
    return key_pair(n)[1].strip()


def hold_key(opts, minion_id, public, state="pending", since=None):
    """The master holds ``public`` under ``minion_id`` as ``state`` (its key store), written at ``since`` (epoch)."""
    keys = salt.key.get_key(opts)
    keys.cache.store("keys", minion_id, {"pub": public, "state": state})
    if since is not None:
        folder = {"pending": "minions_pre", "rejected": "minions_rejected", "accepted": "minions"}[state]
        os.utime(os.path.join(opts["pki_dir"], folder, minion_id), (since, since))


def held_key(opts, minion_id):
    """(state, public key) the master holds under ``minion_id``, or None."""
    key = salt.key.get_key(opts).cache.fetch("keys", minion_id)
    return (key["state"], key["pub"].strip()) if key else None
