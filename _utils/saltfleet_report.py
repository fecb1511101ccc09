"""
Telling the master what a host runs, at once rather than at the next
heartbeat: the mine's ``deployment.status`` (what ``fleet.inventory``,
``fleet.queues`` and ``fleet.deploy`` read) and the grains cache (what ``-G
'saltfleet_deployments:NAME:*'`` matches). The state does it after a change,
the operator verbs too, through this one function: neither calls the other.
"""

__virtualname__ = "saltfleet_report"


def __virtual__():
    return __virtualname__


def tell_master(salt, opts):
    """
    Send the mine and the grains to the master (``salt``: the caller's
    ``__salt__``). False, doing nothing, under ``salt-call --local``: there is
    no master to tell.
    """
    if opts.get("local"):
        return False
    salt["mine.send"]("deployment.status")
    # The minion refreshes its pillar, and the master caches its grains then.
    salt["saltutil.refresh_grains"](refresh_pillar=True)
    return True
