"""
One line per step of a rollout, with its time: how ``salt-run fleet.deploy``
and ``fleet.rollback`` print their progress to a person, in the colors of
Salt's state output (green: a host deployed, red: a failure, yellow: a batch
held back or a lock taken over).

.. code-block:: text

    10:42:07.902499  sample-fetcher: fleet.deploy v2 to 2 hosts in 2 batches
    10:42:07.913310  sample-fetcher: batch 1 of 2: worker-1
    10:42:17.020871  sample-fetcher: worker-1: deployed: 91148e2f81ba

The runner names this outputter in each progress event it fires when salt-run
prints to a person (no ``--out``); with ``--out=json``, ``yaml`` or
``--quiet`` the steps go to the master's event bus alone
(``salt/run/<jid>/progress``) and the report is the one document printed.
The master loads it through ``outputter_dirs`` (etc/master.d/saltfleet.conf).
Anything other than a progress event is printed as Salt's ``nested`` would.
"""

import datetime

import salt.loader
import salt.utils.color

__virtualname__ = "fleet_progress"

# A step's level, as the runner sends it: the color of Salt's state output for the like outcome.
COLORS = {"ok": "GREEN", "fail": "RED", "warn": "LIGHT_YELLOW", "info": "CYAN"}


def __virtual__():
    return __virtualname__


def when(stamp):
    """The local time of an event's ``_stamp`` (UTC, ISO 8601), as Salt's state output shows ``Started``."""
    try:
        moment = datetime.datetime.fromisoformat(str(stamp))
    except ValueError:
        return "--:--:--.------"
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.astimezone().strftime("%H:%M:%S.%f")


def line(event, colors):
    """One progress event as one line: its time, then its message (a message's own line breaks become spaces)."""
    message = " ".join(str(event.get("message", "")).split())
    color = colors.get(COLORS.get(event.get("level"), "CYAN"), "")
    return f"{color}{when(event.get('_stamp'))}  {message}{colors.get('ENDC', '')}"


def output(data, **kwargs):
    """A progress event of a fleet runner as one line; any other data as ``nested``."""
    event = data.get("event") if isinstance(data, dict) and data.get("suffix") == "progress" else None
    if not isinstance(event, dict) or "message" not in event:
        # Salt's own, directly: salt.output's helpers would come back here under --out=fleet_progress.
        return salt.loader.outputters(__opts__)["nested"](data, **kwargs)
    colors = salt.utils.color.get_colors(__opts__.get("color"), __opts__.get("color_theme"))
    return line(event, colors)
