"""
The README's command blocks as a user types them against the demo fleet.

A block is a run of lines indented four spaces after a blank line. Each line
holds one or more commands (``;`` between them, ``#`` a comment). The README's
own grammar is expanded, nothing more: ``[x]`` is optional (a command runs
without its optional words, then with all of them), ``a|b`` alternatives (each
in turn, ``deployment.stop|start`` reading stop then start, ``batch=1|20%``
both values). The only adaptations are the demo's config dir (``-c
.demo/etc/salt`` after salt, salt-run and salt-cloud) and names: the
README's hosts, deployments, revs and placeholders become the demo's (``NAMES``,
and ``CLOUD_NAMES`` for salt-cloud, whose ``worker-7`` is a new instance).
"""

import json
import re
import shlex
import subprocess
from dataclasses import dataclass, field

from localfleet.config import REPO

README = REPO / "README.md"
CONFIG = "-c .demo/etc/salt"
SALT = ("salt", "salt-run", "salt-cloud", "salt-key", "salt-call")
# A kept release other than the serving one, found when the command runs (see Runner.release).
RELEASE = "{release}"

NAMES = {
    "worker-7": "demo-worker-1",
    "worker-*": "demo-worker-*",
    "daily-fetcher": "sample-fetcher",
    "NAME": "sample-fetcher",
    "REV": "v2",
    "v2.3": "v2",
    "PROGRAM": "fetcher-twitter",
    "LINES": "5",
    "SECONDS": "5",
    "SHA": RELEASE,
    "RELEASE": RELEASE,
    "...": "readme check",
    "ec2": "local",
}
# salt-cloud provisions: its worker-7 is a new instance of the demo's profile, on its local provider.
CLOUD_NAMES = {"worker": "local-worker", "worker-7": "demo-worker-3", "ec2": "local", "rackspace": "local"}

# Every block of the README, by how its first line starts: run against the demo (None), or why not.
PLAN = {
    "make demo": "`make demo` started the fleet every other block runs against (test_make_demo_brings_the_fleet_up); "
    "`make test` is this suite",
    "salt -c .demo/etc/salt '*' deployment.status": None,
    "salt-cloud -p worker worker-7": None,
    "cp cloud.providers.d/ec2.conf.example": None,
    "salt 'worker-7' deployment.status [NAME]": None,
    "salt-run fleet.deploy NAME rev=REV": None,
    "salt -G 'saltfleet_deployments:daily-fetcher:*' deployment.restart": None,
    "master: [salt-1.example.com": "a minion's config, not commands",
    "ln -s /srv/shared/saltfleet": "links a master's cache to storage two masters share; test_multimaster.py runs "
    "two masters",
    "salt '*' saltutil.sync_all": None,
    "salt/ ": "the repository's layout, not commands",
    "pip install -r requirements.lock": "installs the fleet page on a real master (PAM, systemd); test_page.py "
    "starts salt-api with the same drop-in, and make demo does for the demo",
    "external_auth:": "a master's config, not commands: test_page.py checks these ACLs through salt-api",
    "server {": "an nginx config, not commands",
    "salt-key -f worker-7": "reads a cloud instance's console and the master's system log; "
    "test_autosign.py checks that the console's fingerprint is the one salt-key -f shows",
    '{"event": "analysis"': "the shape of the lines the page reads, not commands",
    "salt-run fleet.analysis NAME": "they act on a running canary rollout: test_canary.py runs each (fleet.analysis "
    "while a rollout pauses and after it, fleet.promote on a paused one, fleet.abort on a pause step)",
    "$ salt-run fleet.deploy daily-fetcher": "an example's transcript: test_canary.py runs the same rollout",
}
# What the README says a command's exit code is (by a part of the command), where it is not 0.
EXIT_CODES = {
    # The README: an error when no rollout of NAME runs (or ran an analysis).
    "fleet.promote sample-fetcher": 1,
    "fleet.abort sample-fetcher": 1,
    "fleet.analysis sample-fetcher": 1,
}
# What a command's output must show (a regular expression), where its exit code alone does not tell.
SHOWS = {
    "ansible all -i localfleet/ansible_inventory.py --list-hosts": r"demo-worker-1",
    "fleet.inventory": r"demo-worker-1",
    "deployment.start sample-fetcher": r"running:",
    "deployment.unpin sample-fetcher": r"until `salt demo-worker-1 state.apply` deploys main",
    "-y -a reboot demo-worker-3": r"was_running:\s+True",
    "deployment.run sample-fetcher python manage.py migrate": r"no migrations to apply",
    "deployment.run sample-fetcher 'env LEVEL=2 python manage.py check'": r"at level 2 identified no issues",
}
# Lines of a block that runs, which do not: why.
SKIPPED_LINES = {
    "cp ": "EC2 and Rackspace need their clouds: test_cloud_ec2.py (moto) and test_cloud_rackspace.py (mimic) "
    "run those drivers; the lines after these run against the demo's local provider",
}


@dataclass
class Block:
    line: int
    lines: list = field(default_factory=list)

    @property
    def first(self):
        return self.lines[0].split("  #")[0].strip()

    @property
    def planned(self):
        """The PLAN entries this block's first line starts with (exactly one, for a README the plan knows)."""
        return [start for start in PLAN if self.first.startswith(start)]


def blocks(text=None):
    """The README's indented blocks, each with the line number of its first line."""
    found, current, blank = [], None, True
    for number, line in enumerate((README.read_text() if text is None else text).splitlines(), 1):
        if line.startswith("    ") and line.strip() and (current or blank):
            current = current or Block(number)
            current.lines.append(line.strip())
        elif line.strip() and current:
            found.append(current)
            current = None
        blank = not line.strip()
    return [*found, current] if current else found


def _split(line, at):
    """``line`` cut at each ``at`` outside quotes (``#``: only where a comment starts, after a space)."""
    parts, quote, start = [], None, 0
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == at and (at != "#" or i == 0 or line[i - 1].isspace()):
            parts.append(line[start:i])
            start = i + 1
            if at == "#":
                return parts
    return [*parts, line[start:]]


def commands(line):
    """The commands of one README line: its comment dropped, split at ``;``."""
    return [c.strip() for c in _split(_split(line, "#")[0], ";") if c.strip()]


def _alternatives(word):
    """``a|b`` as [a, b], the first's prefix carried over: ``batch=1|20%`` -> batch=1, batch=20%."""
    first, *rest = word.split("|")
    prefix = first[: max(first.rfind("="), first.rfind(".")) + 1]
    return [first, *(alt if ("=" in alt or "." in alt) else prefix + alt for alt in rest)]


def variants(command):
    """Every form of a command the README's grammar allows, in the order a reader would try them."""
    optional = re.compile(r" \[([^\]]+)\]")
    widest = max((len(_alternatives(o)) for o in optional.findall(command)), default=0)
    forms = [optional.sub("", command)]
    for i in range(widest):
        # Each optional word in place, with its i-th alternative (or its last, when it has fewer).
        forms.append(optional.sub(lambda m, i=i: " " + _alternatives(m[1])[: i + 1][-1], command))
    out = []
    for form in forms:
        words = shlex.split(form, posix=False)
        alternatives = [i for i, w in enumerate(words) if "|" in w and w[0] not in "'\""]
        if not alternatives:
            out.append(form)
            continue
        spot = alternatives[0]
        for alt in _alternatives(words[spot]):
            out.extend(variants(" ".join([*words[:spot], alt, *words[spot + 1 :]])))
    return out


def _program(command):
    """The index of the program's word (after any VAR=value words) in ``command``'s words."""
    words = command.split()
    return next(i for i, w in enumerate(words) if not re.match(r"^[A-Z_]+=", w)), words


def adapt(command):
    """``command`` as typed against the demo: its config dir and its names."""
    spot, words = _program(command)
    names = {**NAMES, **(CLOUD_NAMES if words[spot] == "salt-cloud" else {})}
    for name in sorted(names, key=len, reverse=True):
        command = re.sub(rf"(?<![\w.*-]){re.escape(name)}(?![\w.*-])", names[name], command)
    spot, words = _program(command)
    if words[spot] in SALT and "-c" not in words:
        words.insert(spot + 1, CONFIG)
    return " ".join(words)


def plan(block):
    """(reason the block does not run, or None; [(README line, [demo commands] or the reason it is skipped)])."""
    [start] = block.planned
    reason = PLAN[start]
    rows = []
    for line in block.lines:
        skipped = next((why for start, why in SKIPPED_LINES.items() if line.startswith(start)), None)
        rows.append((line, skipped or [adapt(v) for c in commands(line) for v in variants(c)]))
    return reason, rows


def judge(command, proc):
    """What is wrong with how ``command`` ran, measured by what the README says (None: nothing)."""
    expected = next((code for part, code in EXIT_CODES.items() if part in command), 0)
    if proc.returncode != expected:
        return f"exited {proc.returncode}; the README says {expected}"
    if "--out=json" in command:
        try:
            json.loads(proc.stdout)
        except ValueError as exc:
            return f"--out=json printed no single JSON document: {exc}"
    missing = [p for part, p in SHOWS.items() if part in command and not re.search(p, proc.stdout)]
    return f"its output does not show {missing[0]!r}" if missing else None


class Runner:
    """Runs demo commands from the checkout the demo runs in, as a user with the venv active and no terminal."""

    def __init__(self, env, cwd=REPO):
        self.env, self.cwd = env, cwd
        self.ran = []

    def release(self):
        """The newest complete release demo-worker-1 keeps for sample-fetcher, other than the serving one."""
        proc = self.shell("salt -c .demo/etc/salt demo-worker-1 deployment.releases sample-fetcher --out=json")
        rows = json.loads(proc.stdout)["demo-worker-1"]
        return [r["release"] for r in rows if r["complete"] and not r["serving"]][-1]

    def shell(self, command, timeout=900):
        return subprocess.run(
            ["bash", "-c", command],
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def run(self, command):
        if RELEASE in command:
            command = command.replace(RELEASE, self.release())
        proc = self.shell(command)
        self.ran.append((command, proc))
        return proc
