"""
Where a window's CPU went: the machine's busy and idle time (/proc/stat),
and the share of each part of a scenario, from the processes of each
(/proc/<pid>/stat: their own time and that of the children they reaped).
Whatever no part claims is the rest of the machine (other work on it).
"""

import os
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _machine():
    """(busy, idle) seconds of every core since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is within user).
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / TICK, idle / TICK


def _processes():
    """{pid: (argv, seconds of CPU: its own and its reaped children's)} of the processes alive now."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2 :].split()
        found[int(entry.name)] = ([a.decode(errors="replace") for a in argv if a], sum(map(int, rest[11:15])) / TICK)
    return found


def snapshot(parts):
    """
    CPU seconds so far: {part: seconds} of each part of ``parts`` ({part:
    (pid, argv) -> bool}; a process counts for the first that claims it),
    ``busy`` and ``idle`` of the machine.
    """
    busy, idle = _machine()
    found = dict.fromkeys(parts, 0.0)
    for pid, (argv, seconds) in _processes().items():
        part = next((name for name, claims in parts.items() if claims(pid, argv)), None)
        if part is not None:
            found[part] += seconds
    return {**found, "busy": busy, "idle": idle}


def cores(before, after, seconds):
    """The cores each part used on average between two snapshots ``seconds`` apart; ``others``: the rest's."""
    used = {part: max(0.0, (after[part] - before[part]) / seconds) for part in before}
    used["others"] = max(0.0, used["busy"] - sum(v for k, v in used.items() if k not in ("busy", "idle")))
    return used
