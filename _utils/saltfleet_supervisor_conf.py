"""
A deployment's supervisord.conf: the program sections from pillar and the
deployment's template, the file saltfleet renders for a generation, the
program groups two configs differ in; the boot script that starts a
generation's supervisord, and the cron line that runs the serving one's at
boot. Text in, text out: driving supervisord is saltfleet_supervisor's.

The deployment's ``env`` never goes into the config: supervisord's
``environment=`` cannot carry every value as written (its parser strips
quotes at either end, takes `` ;`` and `` #`` for comments, and has no escape
for a value holding both kinds of quotes). The boot script exports it to
supervisord itself, whose programs inherit it byte for byte; the script is
root's alone, and the config holds no secret.
"""

import configparser
import io
import json
import re
import shlex
from pathlib import Path

import salt.loader.context
from salt.exceptions import CommandExecutionError

__virtualname__ = "saltfleet_supervisor_conf"

PROGRAM_DEFAULTS = {
    "autostart": True,
    "autorestart": True,
    # supervisord's own default. A program counts as started once it lived
    # this long, and a new release whose programs die sooner never serves:
    # set it to what the app needs to import (a Celery app: a few seconds).
    "startsecs": 1,
    # Celery finishes the task in hand on SIGTERM: give it time to.
    "stopsignal": "TERM",
    "stopwaitsecs": 600,
    # SIGTERM to the main process only: a Celery worker then lets its pool
    # finish the tasks in hand. A pool child sent SIGTERM directly dies mid-task
    # and can leave the main process waiting. SIGKILL, after stopwaitsecs,
    # goes to the whole group so nothing is orphaned.
    "stopasgroup": False,
    "killasgroup": True,
    "redirect_stderr": True,
}
# A template may only add programs and groups: saltfleet writes every other section itself.
TEMPLATE_SECTION_RE = re.compile(r"^(program|group|eventlistener|fcgi-program):[A-Za-z0-9][A-Za-z0-9_.-]*$")
PROGRAM_KINDS = ("program", "fcgi-program", "eventlistener")


def __virtual__():
    return __virtualname__


def _utils(name):
    # As in saltfleet_supervisor: the utils loader in context.
    loader = salt.loader.context.loader_ctxvar.get()
    return loader.pack.get("__utils__", loader)[name]


def template_sections(text, name, source):
    """Parse rendered program sections; reject what saltfleet owns or cannot read."""
    parser = configparser.RawConfigParser(strict=True, interpolation=None, delimiters=("=",))
    parser.optionxform = str
    try:
        parser.read_string(text, source=source)
    except configparser.Error as exc:
        raise CommandExecutionError(
            f"deployments:{name}:supervisord_conf: {source} is not a valid supervisord config: {exc}"
        ) from None
    sections = {}
    for section in parser.sections():
        if not TEMPLATE_SECTION_RE.match(section):
            raise CommandExecutionError(
                f"deployments:{name}:supervisord_conf: section [{section}] in {source} is not allowed; "
                "saltfleet writes [supervisord], the socket and rpc sections itself: keep only "
                "[program:x], [group:x] and [eventlistener:x] sections"
            )
        sections[section] = dict(parser.items(section))
    if not sections:
        raise CommandExecutionError(
            f"deployments:{name}:supervisord_conf: {source} defines no [program:x] section; "
            "add one, or set pillar programs instead"
        )
    return sections


def pillar_sections(cfg):
    """[program:x] sections from pillar ``programs``."""
    return {f"program:{prog}": {k: _ini(v) for k, v in opts.items()} for prog, opts in cfg["programs"].items()}


def _ini(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return environment(value)
    return str(value)


def environment(env):
    """supervisord's environment= value: each value quoted, and literal (a % stays a %); see :func:`carried`."""
    return ",".join(f"{k}={_quote(str(v))}" for k, v in sorted(env.items()))


def _quote(value):
    quote = "'" if '"' in value else '"'
    return quote + value.replace("%", "%%") + quote


def carried(value):
    """
    Why supervisord's environment= would not carry ``value`` as written, or
    None when it does (:func:`environment` writes it): its parser strips
    quotes and spaces at either end, takes `` ;`` and `` #`` for comments,
    and has no escape for a value holding both kinds of quotes.
    """
    value = str(value)
    if value != value.strip():
        return "it starts or ends with a space"
    if value[:1] in "'\"" or value[-1:] in "'\"":
        return "it starts or ends with a quote"
    if "'" in value and '"' in value:
        return "it holds both kinds of quotes"
    if re.search(r"\s[;#]", value):
        return "a space before ';' or '#' starts a comment there"
    return None


def render(cfg, sections, p, gen, release, venv):
    """
    The whole supervisord.conf of generation ``gen`` of a deployment: its own
    socket, pidfile and logs, supervisord running as the deployment's user, and
    every program in ``release`` with its ``venv`` first on PATH.
    """
    g = _utils("saltfleet_paths.generation")(p, gen)
    own = {
        "unix_http_server": {"file": str(g["socket"]), "chmod": "0700"},
        "supervisord": {
            "identifier": f"saltfleet-{cfg['name']}",
            # Its logs, and what the programs make, are the deployment user's alone (a program may set its own).
            "umask": "077",
            "pidfile": str(g["pidfile"]),
            "logfile": str(_utils("saltfleet_paths.log")(p, "supervisord", gen)),
            "childlogdir": str(p["logs"]),
            "directory": str(p["home"]),
            "environment": environment({"HOME": str(p["home"]), "LANG": "C.UTF-8", "USER": cfg["user"]}),
        },
        "rpcinterface:supervisor": {
            "supervisor.rpcinterface_factory": "supervisor.rpcinterface:make_main_rpcinterface"
        },
        "supervisorctl": {"serverurl": f"unix://{g['socket']}"},
    }
    # The deployment's env reaches the programs through supervisord's own environment (boot_script).
    base_env = {"PATH": f"{Path(venv) / 'bin'}:/usr/local/bin:/usr/bin:/bin", "VIRTUAL_ENV": str(venv)}
    for section, opts in sections.items():
        kind, _, prog = section.partition(":")
        if kind not in PROGRAM_KINDS:
            own[section] = opts
            continue
        merged = {k: _ini(v) for k, v in PROGRAM_DEFAULTS.items()}
        merged["directory"] = str(release)
        # Each generation its own log: two of them overlap during a handover.
        merged["stdout_logfile"] = str(_utils("saltfleet_paths.log")(p, prog, gen))
        merged.update(opts)
        merged["environment"] = ",".join(filter(None, [environment(base_env), opts.get("environment", "")]))
        own[section] = merged
    out = io.StringIO()
    out.write(f"; Written by saltfleet for deployment {cfg['name']}; changes here are overwritten.\n")
    for section, opts in own.items():
        out.write(f"\n[{section}]\n")
        for key, value in opts.items():
            out.write(f"{key}={value}\n")
    return out.getvalue()


def stop_seconds(conf_text):
    """
    How long a supervisord of this config may take to stop its programs: the
    longest stopwaitsecs (root's config says it, not supervisord's answer),
    and a margin.
    """
    sections = sections_of(conf_text)
    waits = [
        int(o.get("stopwaitsecs", PROGRAM_DEFAULTS["stopwaitsecs"]))
        for s, o in sections.items()
        if s.startswith("program:")
    ]
    return max(waits or [0]) + 30


def sections_of(conf_text):
    """{section: options} of a supervisord.conf (the program sections saltfleet wrote, among others)."""
    parser = configparser.RawConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str
    parser.read_string(conf_text or "")
    return {section: dict(parser.items(section)) for section in parser.sections()}


def groups_of(conf_text, same=()):
    """
    Process groups in a supervisord.conf and the text that defines each;
    ``same`` are (text, placeholder) pairs replaced first, so that groups
    which differ only by their release compare equal.
    """
    if not conf_text:
        return {}
    for text, placeholder in same:
        if text:
            conf_text = conf_text.replace(text, placeholder)
    parser = configparser.RawConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str
    parser.read_string(conf_text)
    members = set()
    for section in parser.sections():
        if section.startswith("group:"):
            members.update(_members(parser, section))
    groups = {}
    for section in parser.sections():
        kind, _, name = section.partition(":")
        if kind in PROGRAM_KINDS and name not in members:
            groups[name] = json.dumps(dict(parser.items(section)), sort_keys=True)
        elif kind == "group":
            progs = _members(parser, section)
            body = {
                "group": dict(parser.items(section)),
                "programs": {
                    q: dict(parser.items(f"program:{q}")) for q in progs if parser.has_section(f"program:{q}")
                },
            }
            groups[name] = json.dumps(body, sort_keys=True)
    return groups


def _members(parser, section):
    return [x.strip() for x in parser.get(section, "programs", fallback="").split(",") if x.strip()]


def diff_groups(old_text, new_text, same=()):
    """{added, changed, removed, kept} group names between two configs (see ``groups_of``)."""
    old, new = groups_of(old_text, same), groups_of(new_text, same)
    return {
        "added": sorted(set(new) - set(old)),
        "changed": sorted(g for g in set(old) & set(new) if old[g] != new[g]),
        "removed": sorted(set(old) - set(new)),
        "kept": sorted(g for g in set(old) & set(new) if old[g] == new[g]),
    }


def env_script(cfg):
    """
    The deployment's env as shell exports (values single-quoted: the shell
    takes them byte for byte, and no command line ever holds one), for its
    supervisord to source once it runs as the user. Root's file, readable by
    that user alone.
    """
    env = {"LANG": "C.UTF-8", **{k: str(v) for k, v in cfg["env"].items()}}
    lines = [f"# Written by saltfleet: deployment {cfg['name']}'s env."]
    return "\n".join([*lines, *(f"export {key}={shlex.quote(value)}" for key, value in env.items())]) + "\n"


def boot_script(cfg, tools, p, gen, uid, gid):
    """
    The script that starts generation ``gen``'s supervisord (as cron does at
    boot): root enters the deployment's cgroup (where the host has one:
    saltfleet_cgroup) and drops to the deployment's user (uid, gid and its
    groups, a clean environment: setpriv) before anything runs, and the
    user's shell sources the env and runs supervisord. No process of root's
    ever has the env (a PYTHONPATH or LD_PRELOAD in it reaches only the
    user's). Root's, 0700; it holds no secret.
    """
    g = _utils("saltfleet_paths.generation")(p, gen)
    as_user = f"--reuid={uid} --regid={gid} --init-groups --reset-env --inh-caps=-all"
    start = '. "$1" && exec "$2" -c "$3"'
    words = [tools["setpriv"], *as_user.split(), "--", "/bin/sh", "-c", start, "sh"]
    words += [str(g["env"]), tools["supervisord"], str(g["conf"])]
    enter = _utils("saltfleet_cgroup.enter_line")(p, uid)
    lines = [
        "#!/bin/sh",
        f"# Written by saltfleet: starts deployment {cfg['name']}'s supervisord (generation {gen}) as its user.",
        *([enter] if enter else []),
        "exec " + " ".join(shlex.quote(str(word)) for word in words),
    ]
    return "\n".join(lines) + "\n"


def boot_entry(cfg, p):
    """
    The cron.d file that starts the deployment's serving supervisord at boot:
    (path under root, content). cron runs its boot script as root, who alone
    can read it; supervisord then drops to the deployment's user.
    """
    text = (
        f"# Written by saltfleet: start deployment {cfg['name']}'s supervisord at boot.\n"
        "PATH=/usr/local/bin:/usr/bin:/bin\nLANG=C.UTF-8\n"
        f"@reboot root {p['boot']}\n"
    )
    return f"etc/cron.d/saltfleet-{cfg['name']}", text.encode()


def boot_env(script):
    """The env an env script (:func:`env_script`) exports: {name: value}."""
    env = {}
    # Lines as env_script joins them: a value may hold what Python alone also splits lines on (\x0c, \u2028).
    for line in script.split("\n"):
        if line.startswith("export "):
            name, _, value = shlex.split(line)[1].partition("=")
            env[name] = value
    return env
