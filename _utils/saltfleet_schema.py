"""
The pillar schema: every key saltfleet reads, its default, and what it may hold.

Host-level keys live under pillar ``saltfleet``, per-deployment keys under
``deployments:<name>``; a deployment may override the host-level keys in
``DEPLOYMENT_OVERRIDES``. Every error names the key, what is wrong and the
fix (``deployments:<name>:<key>: what; fix``), and validation happens before
anything on the host changes. ``pillar.example`` documents every key (a test
holds the two together).

Values that reach a command line or supervisord's config are held to what
they can safely be: nothing that starts like an option, no line breaks that
would open a section, numbers within bounds, and only the git transports a
deployment needs.
"""

import difflib
import os
import re
from pathlib import PurePosixPath

import salt.loader.context

__virtualname__ = "saltfleet_schema"

HOST_DEFAULTS = {
    # None: the minion's own root_dir, "/" on a real host, a sandbox for a local one.
    "root": None,
    "user": "ubuntu",
    "python": "python3",
    "keep_releases": 3,
    "uv": None,
    "uv_cache": None,
    "supervisord": None,
    "purge_removed": False,
    # How a new release takes over from the one serving: "overlap" starts it
    # beside the serving one, which drains once the new programs are RUNNING;
    # "stop-first" stops the old programs, then starts the new ones (for
    # programs that hold a port or must never run twice, e.g. celery beat).
    "handover": "overlap",
}
DEPLOYMENT_DEFAULTS = {
    "repo": None,
    "rev": "HEAD",
    "requirements": "requirements.txt",
    "deploy_key": None,
    "known_hosts": None,
    "env": {},
    "context": {},
    "programs": {},
    "supervisord_conf": None,
    # Commands fleet.deploy runs once per rollout on its first host (e.g. migrations).
    "hooks": {},
    # {Celery queue: fewest consumers}: fleet.deploy keeps a batch from leaving fewer.
    "min_consumers": {},
    # fleet.deploy's steps (hosts, analyse, pause) and its analysis' thresholds (check_rollout).
    "rollout": {},
    # Commands run once per release, as the user in it, before it serves (saltfleet_build).
    "build": [],
    "build_timeout": 900,
    "user": None,
    "uv_cache": None,
    "python": None,
    "keep_releases": None,
    "handover": None,
}
DEPLOYMENT_OVERRIDES = ("user", "uv_cache", "python", "keep_releases", "handover")

# [program:x] options a pillar `programs` entry may set (supervisord's own
# names), with their type and, for numbers, the range supervisord is given.
PROGRAM_OPTIONS = {
    "command": str,
    "process_name": str,
    "numprocs": (int, 1, 64),
    "numprocs_start": (int, 0, 10000),
    "priority": (int, 0, 999),
    "autostart": bool,
    "autorestart": (bool, str),
    "startsecs": (int, 0, 3600),
    "startretries": (int, 0, 100),
    "exitcodes": (str, int),
    "stopsignal": str,
    "stopwaitsecs": (int, 0, 86400),
    "stopasgroup": bool,
    "killasgroup": bool,
    "redirect_stderr": bool,
    "stdout_logfile": str,
    "stderr_logfile": str,
    "environment": dict,
    "directory": str,
    "umask": str,
}
STOP_SIGNALS = ("TERM", "HUP", "INT", "QUIT", "KILL", "USR1", "USR2")
PROGRAM_PATTERNS = {
    "exitcodes": (r"^\d{1,3}(,\d{1,3})*$", "a comma-separated list of exit codes, e.g. 0,2"),
    "umask": (r"^0?[0-7]{3}$", "an octal umask, e.g. 022"),
    "autorestart": (r"^(true|false|unexpected)$", "true, false or unexpected"),
}

RESERVED_NAMES = ("common",)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
ROOT_RE = re.compile(r"^/[A-Za-z0-9_./+-]*$")
# A branch, tag or commit: git's ref characters, never one that starts an option.
REV_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/+-]*$")
REQUIREMENTS_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/+-]*$")
# A Python uv finds by version (python3, 3.11, cpython@3.12, pypy3.10) or an absolute path.
PYTHON_RE = re.compile(r"^(((c?python|pypy)@?)?3(\.\d{1,2}){0,2}|/[A-Za-z0-9_./+-]+)$")
# Git URLs of the transports a deployment may use: ssh (URL or scp-like), https, git, file, a local path.
REPO_RES = (
    re.compile(r"^(ssh|git\+ssh|ssh\+git)://[^\s/]+/\S+$"),
    re.compile(r"^https://[^\s/]+/\S+$"),
    re.compile(r"^git://[^\s/]+/\S+$"),
    re.compile(r"^file:///\S+$"),
    re.compile(r"^/\S+$"),
    re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]*@[A-Za-z0-9_.-]+:[^\s:][^\s]*$"),
)
URL_AUTHORITY_RE = re.compile(r"^[a-z+]+://([^/]*)/")
CREDENTIAL_RE = re.compile(r"^([A-Za-z0-9+.-]+://[^/@]*:[^/@]*@|https?://[^/@]+@)")
# supervisord expands %(name)s in option values: anything else with a % needs %% for a literal one.
SUPERVISOR_EXPANSION_RE = re.compile(r"%%|%\([A-Za-z_][A-Za-z0-9_]*\)[-#0 +]*\d*[sd]")


def __virtual__():
    return __virtualname__


def _utils(name):
    # Salt's utils loader packs no __utils__ into utils modules. The loader in
    # context is that mapping while one of their functions runs, or the loader
    # module's whose code runs on (a context manager's body) and holds it.
    loader = salt.loader.context.loader_ctxvar.get()
    return loader.pack.get("__utils__", loader)[name]


def _type_name(value):
    # Salt 3008 hands pillar over in masked containers: name what the user wrote.
    for kind, name in ((bool, "bool"), (str, "str"), (int, "int"), (float, "float"), (dict, "mapping"), (list, "list")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _check_type(where, value, expected, errors, hint=""):
    # YAML's true/false are ints to Python; they are never a count or a string here.
    ok = isinstance(value, expected) and not (isinstance(value, bool) and bool not in _types(expected))
    if not ok:
        want = "/".join("mapping" if t is dict else t.__name__ for t in _types(expected))
        errors.append(f"{where}: must be a {want}, got {_type_name(value)} {value!r}{hint}")
    return ok


def _types(expected):
    return expected if isinstance(expected, tuple) else (expected,)


def _check_keys(where, given, allowed, errors):
    for key in sorted(set(given) - set(allowed), key=str):
        close = difflib.get_close_matches(str(key), list(allowed), n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(sorted(allowed))}"
        errors.append(f"{where}:{key}: unknown key{hint}")


def _check_name(where, name, errors, what="name"):
    if not isinstance(name, str) or not NAME_RE.match(name):
        errors.append(
            f"{where}: {what} {name!r} is not allowed: use 1-64 letters, digits, '-' or '_', "
            "starting with a letter or digit (no '/', '..' or spaces)"
        )
        return False
    return True


def check_name(where, name, errors):
    """Append an error unless ``name`` is a deployment name (the state's, the lock's, a grain's key)."""
    return _check_name(where, name, errors)


def _check_choice(where, value, choices, errors):
    if value not in choices:
        errors.append(f"{where}: must be {' or '.join(choices)}, got {value!r}")


def _check_line(where, value, errors):
    """A value that reaches a config file or a command line: one line, no NUL."""
    text = str(value)
    if any(c in text for c in "\r\n\0"):
        errors.append(f"{where}: must be one line (no line break or NUL): it would open a new line in the config")
        return False
    return True


def _check_pattern(where, value, pattern, what, errors):
    if not _check_type(where, value, str, errors):
        return False
    if not pattern.match(value):
        errors.append(f"{where}: {value!r} is not {what}")
        return False
    return True


def _check_int(where, value, low, high, errors):
    if _check_type(where, value, int, errors) and not low <= value <= high:
        errors.append(f"{where}: must be between {low} and {high}, got {value}")


def _check_expansions(where, value, errors):
    if "%" in SUPERVISOR_EXPANSION_RE.sub("", value):
        errors.append(
            f"{where}: {value!r} has a '%' supervisord cannot expand; write %% for a literal % "
            "(supervisord knows %(program_name)s, %(process_num)d, %(here)s, %(ENV_NAME)s ...)"
        )


def _check_repo(where, repo, errors):
    if repo is None:
        errors.append(f"{where}: missing; set the app's git URL, e.g. git@github.com:example/app.git")
        return
    if not _check_type(where, repo, str, errors) or not _check_line(where, repo, errors):
        return
    if CREDENTIAL_RE.match(repo):
        # A credential in the URL would reach git's command line, the manifest and messages.
        errors.append(f"{where}: holds a credential; use an ssh URL with deploy_key instead")
    elif repo.startswith("-") or not any(r.match(repo) for r in REPO_RES):
        errors.append(
            f"{where}: {repo!r} is not a git URL saltfleet fetches; use ssh (git@host:app.git, ssh://...), "
            "https://, git://, file:// or an absolute path"
        )
    else:
        # ssh takes a host or user that starts with '-' for an option of its own (ProxyCommand...).
        authority = URL_AUTHORITY_RE.match(repo)
        for part in re.split(r"[@:]", authority.group(1)) if authority else ():
            if part.startswith("-"):
                errors.append(f"{where}: its host or user {part!r} starts like an option; give the real host")
                break


def _check_requirements(where, value, errors):
    if _check_type(where, value, str, errors) and (
        not REQUIREMENTS_RE.match(value) or ".." in PurePosixPath(value).parts
    ):
        errors.append(f"{where}: {value!r} must be a path inside the repository (relative, no '..')")


def _check_env(where, env, errors, in_config=False):
    """
    Environment variables: names, one-line values; ``in_config``, those of a
    program's environment= option, which supervisord must read back exactly.
    """
    if not _check_type(where, env, dict, errors):
        return
    for key, value in env.items():
        if not isinstance(key, str) or not ENV_NAME_RE.match(key):
            errors.append(f"{where}: {key!r} is not a valid environment variable name")
        elif not isinstance(value, (str, int, float)) or isinstance(value, bool):
            errors.append(f"{where}:{key}: must be a string, got {_type_name(value)}")
        elif any(c in str(value) for c in "\r\n\0"):
            errors.append(f"{where}:{key}: must be one line (no line break or NUL); encode it")
        elif in_config and _utils("saltfleet_supervisor_conf.carried")(value):
            why = _utils("saltfleet_supervisor_conf.carried")(value)
            errors.append(
                f"{where}:{key}: supervisord's environment= would not carry it as written ({why}); "
                f"move it to {where.split(':programs:')[0]}:env, which reaches the programs exactly"
            )


def _check_program(where, opts, errors):
    if not isinstance(opts, dict):
        errors.append(f"{where}: must be a mapping of supervisord program options")
        return
    _check_keys(where, opts, PROGRAM_OPTIONS, errors)
    if not opts.get("command"):
        errors.append(f"{where}:command: missing; the command line supervisord runs")
    for key, value in opts.items():
        spec = PROGRAM_OPTIONS.get(key)
        if spec is None:
            continue
        kwhere = f"{where}:{key}"
        if key == "environment":
            _check_env(kwhere, value, errors, in_config=True)
        elif isinstance(spec, tuple) and len(spec) == 3:
            _check_int(kwhere, value, spec[1], spec[2], errors)
        elif _check_type(kwhere, value, spec, errors) and isinstance(value, str) and _check_line(kwhere, value, errors):
            if key == "stopsignal" and value not in STOP_SIGNALS:
                errors.append(f"{kwhere}: must be one of {', '.join(STOP_SIGNALS)}, got {value!r}")
            elif key in PROGRAM_PATTERNS and not re.match(PROGRAM_PATTERNS[key][0], value):
                errors.append(f"{kwhere}: {value!r} is not {PROGRAM_PATTERNS[key][1]}")
            else:
                _check_expansions(kwhere, value, errors)


def _check_hooks(where, hooks, errors):
    if not _check_type(where, hooks, dict, errors):
        return
    _check_keys(where, hooks, ("pre", "post"), errors)
    for when in ("pre", "post"):
        _check_commands(f"{where}:{when}", hooks.get(when), errors)


def _check_commands(where, value, errors):
    """A command (a string) or a list of commands, each a string or a list of words, one line each."""
    items = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        errors.append(f"{where}: give a command (a string) or a list of them")
        return
    for item in items:
        if not isinstance(item, (str, list)) or not item:
            errors.append(f"{where}: {item!r} is not a command (a string or a list of words)")
        else:
            _check_line(where, item if isinstance(item, str) else " ".join(map(str, item)), errors)


def check_min_consumers(where, floors, errors):
    """Append an error unless ``floors`` is {queue name: fewest consumers (0-10000)}."""
    if not _check_type(where, floors, dict, errors):
        return False
    before = len(errors)
    for queue, floor in floors.items():
        if not isinstance(queue, str) or not queue:
            errors.append(f"{where}: {queue!r} is not a queue name")
        elif _check_line(where, queue, errors):
            _check_int(f"{where}:{queue}", floor, 0, 10000, errors)
    return len(errors) == before


# A rollout's analysis: its thresholds, their defaults and bounds (fleet.deploy's analyse steps).
ANALYSIS = {
    # The new release fails above this share of failed tasks, whatever the old one does...
    "max_failure_rate": (0.5, float, 0.0, 1.0),
    # ...or above the old release's share by this much.
    "failure_margin": (0.1, float, 0.0, 1.0),
    # ...or when its 95th percentile of run time is above this many times the old one's.
    "runtime_ratio": (2.0, float, 1.0, 1000.0),
    # Fewer tasks of the new release in a step, and the step is inconclusive.
    "min_tasks": (20, int, 1, 1_000_000),
    # What an inconclusive step does: pause for fleet.promote/fleet.abort, pass or fail.
    "inconclusive": ("pause", str, None, None),
    # How sure a step must be that the new release fails to end it before its time (one-sided).
    "confidence": (0.99, float, 0.5, 0.999999),
    # Seconds between two looks at the hosts' counts.
    "window": (3, int, 1, 300),
}
INCONCLUSIVE = ("pause", "pass", "fail")
STEP_KINDS = ("hosts", "analyse", "pause")


def analysis_settings(given=None):
    """The analysis thresholds: ``given`` (checked) over the defaults."""
    return {key: (given or {}).get(key, default) for key, (default, *_rest) in ANALYSIS.items()}


def _check_share(where, value, errors):
    """A number of hosts (1, '3') or a share of them ('25%')."""
    text = str(value).strip()
    try:
        number = float(text[:-1]) if text.endswith("%") else int(text)
    except ValueError:
        number = None
    if isinstance(value, bool) or number is None or not (0 < number <= 100 if text.endswith("%") else number >= 1):
        errors.append(f"{where}: {value!r} is not a number of hosts (2) or a share of them ('25%')")


def check_rollout(where, rollout, errors):
    """
    Append an error unless ``rollout`` is {steps: [{hosts: N|'P%'} | {analyse:
    SECONDS} | {pause: true}, ...], analysis: {threshold: value}}.
    """
    if not _check_type(where, rollout, dict, errors):
        return False
    before = len(errors)
    _check_keys(where, rollout, ("steps", "analysis"), errors)
    steps = rollout.get("steps") or []
    if _check_type(f"{where}:steps", steps, list, errors):
        for n, step in enumerate(steps, 1):
            at = f"{where}:steps:{n}"
            if not isinstance(step, dict) or len(step) != 1 or next(iter(step)) not in STEP_KINDS:
                errors.append(
                    f"{at}: {step!r} is not a step: give one of {{hosts: N}}, {{analyse: SECONDS}}, {{pause: true}}"
                )
                continue
            kind, value = next(iter(step.items()))
            if kind == "hosts":
                _check_share(f"{at}:hosts", value, errors)
            elif kind == "analyse":
                _check_int(f"{at}:analyse", value, 1, 86400, errors)
            elif value is not True:
                errors.append(f"{at}:pause: must be true (the rollout waits for fleet.promote or fleet.abort)")
    analysis = rollout.get("analysis") or {}
    if _check_type(f"{where}:analysis", analysis, dict, errors):
        _check_keys(f"{where}:analysis", analysis, ANALYSIS, errors)
        for key, value in analysis.items():
            if key not in ANALYSIS:
                continue
            _, kind, low, high = ANALYSIS[key]
            if key == "inconclusive":
                _check_choice(f"{where}:analysis:{key}", value, INCONCLUSIVE, errors)
            elif kind is int:
                _check_int(f"{where}:analysis:{key}", value, low, high, errors)
            elif _check_type(f"{where}:analysis:{key}", value, (int, float), errors) and not low <= value <= high:
                errors.append(f"{where}:analysis:{key}: must be between {low} and {high}, got {value}")
    return len(errors) == before


def _check_tool(where, value, errors):
    if value is not None and _check_type(where, value, str, errors) and not ROOT_RE.match(value):
        errors.append(f"{where}: {value!r} must be an absolute path (root's, writable by root only)")


def check_rev(where, rev, errors):
    """Append an error unless ``rev`` is a branch, tag or commit name (never an option)."""
    return _check_pattern(where, rev, REV_RE, "a branch, tag or commit", errors)


def validate_host(host, default_root="/"):
    """Return (settings, errors) for pillar ``saltfleet``, defaults filled in."""
    errors = []
    host = {} if host is None else host
    if not isinstance(host, dict):
        return dict(HOST_DEFAULTS, root=default_root), [f"saltfleet: must be a mapping, got {_type_name(host)}"]
    _check_keys("saltfleet", host, HOST_DEFAULTS, errors)
    settings = dict(HOST_DEFAULTS)
    settings.update({k: v for k, v in host.items() if k in HOST_DEFAULTS})
    if settings["root"] is None:
        settings["root"] = default_root
    if _check_type("saltfleet:root", settings["root"], str, errors) and not ROOT_RE.match(settings["root"]):
        # Paths under root reach ssh's and supervisord's command lines: keep them plain.
        errors.append(f"saltfleet:root: {settings['root']!r} must be an absolute path of letters, digits and '_./+-'")
    _check_name("saltfleet:user", settings["user"], errors, "user")
    _check_pattern("saltfleet:python", settings["python"], PYTHON_RE, _PYTHON_WHAT, errors)
    if _check_type("saltfleet:keep_releases", settings["keep_releases"], int, errors) and settings["keep_releases"] < 1:
        errors.append("saltfleet:keep_releases: must be at least 1 (the release that serves is always kept)")
    for key in ("uv", "uv_cache", "supervisord"):
        _check_tool(f"saltfleet:{key}", settings[key], errors)
    _check_type("saltfleet:purge_removed", settings["purge_removed"], bool, errors)
    _check_choice("saltfleet:handover", settings["handover"], _utils("saltfleet_handover.names")(), errors)
    return settings, errors


_PYTHON_WHAT = "a Python version (python3, 3.11, cpython@3.12) or an absolute path"


def validate_deployment(name, spec, host):
    """
    Check one deployment's pillar against the schema.

    Returns (config, errors): config has every default filled in and the
    host-level settings merged; errors are messages naming
    ``deployments:<name>:<key>``, what is wrong and the fix.
    """
    where = f"deployments:{name}"
    errors = []
    if not _check_name("deployments", name, errors, "deployment name"):
        return None, errors
    if name in RESERVED_NAMES:
        return None, [f"{where}: the name is reserved for the sysfiles every host gets; rename it"]
    spec = {} if spec is None else spec
    if not isinstance(spec, dict):
        return None, [f"{where}: must be a mapping of settings, got {_type_name(spec)}"]
    _check_keys(where, spec, DEPLOYMENT_DEFAULTS, errors)
    cfg = {k: (v.copy() if isinstance(v, dict) else v) for k, v in DEPLOYMENT_DEFAULTS.items()}
    cfg.update({k: v for k, v in spec.items() if k in DEPLOYMENT_DEFAULTS})

    _check_repo(f"{where}:repo", cfg["repo"], errors)
    if _check_type(f"{where}:rev", cfg["rev"], str, errors, f"; quote it in pillar: rev: '{cfg['rev']}'"):
        _check_pattern(f"{where}:rev", cfg["rev"], REV_RE, "a branch, tag or commit", errors)
    _check_requirements(f"{where}:requirements", cfg["requirements"], errors)
    for key in ("deploy_key", "known_hosts"):
        if cfg[key] is not None:
            _check_type(f"{where}:{key}", cfg[key], str, errors)
    if cfg["supervisord_conf"] is not None and (
        _check_type(f"{where}:supervisord_conf", cfg["supervisord_conf"], str, errors)
        and not str(cfg["supervisord_conf"]).startswith("salt://")
    ):
        errors.append(f"{where}:supervisord_conf: must be a salt:// URL of the master's file server")
    if cfg["deploy_key"] and not cfg["known_hosts"] and not str(cfg["repo"]).startswith(("/", "file://", "https://")):
        errors.append(
            f"{where}:known_hosts: required with deploy_key: pin the git server's host keys "
            "(the output of ssh-keyscan, checked); saltfleet never disables host key checking"
        )
    _check_env(f"{where}:env", cfg["env"], errors)
    _check_hooks(f"{where}:hooks", cfg["hooks"], errors)
    _check_commands(f"{where}:build", cfg["build"], errors)
    if isinstance(cfg["build"], str):
        cfg["build"] = [cfg["build"]]
    _check_int(f"{where}:build_timeout", cfg["build_timeout"], 1, 86400, errors)
    check_min_consumers(f"{where}:min_consumers", cfg["min_consumers"], errors)
    check_rollout(f"{where}:rollout", cfg["rollout"], errors)
    _check_type(f"{where}:context", cfg["context"], dict, errors)
    if _check_type(f"{where}:programs", cfg["programs"], dict, errors):
        for prog, opts in cfg["programs"].items():
            if _check_name(f"{where}:programs", prog, errors, "program name"):
                _check_program(f"{where}:programs:{prog}", opts, errors)
    for key in DEPLOYMENT_OVERRIDES:
        if cfg[key] is None:
            cfg[key] = host[key]
    _check_name(f"{where}:user", cfg["user"], errors, "user")
    _check_tool(f"{where}:uv_cache", cfg["uv_cache"], errors)
    if _check_type(f"{where}:keep_releases", cfg["keep_releases"], int, errors) and cfg["keep_releases"] < 1:
        errors.append(f"{where}:keep_releases: must be at least 1")
    _check_pattern(f"{where}:python", cfg["python"], PYTHON_RE, _PYTHON_WHAT, errors)
    _check_choice(f"{where}:handover", cfg["handover"], _utils("saltfleet_handover.names")(), errors)
    if not errors and isinstance(host.get("root"), str):
        _check_socket_room(where, host, cfg["user"], name, errors)
    cfg["name"] = name
    cfg["root"] = host["root"]
    return cfg, errors


def _check_socket_room(where, host, user, name, errors):
    overflow, sock = _utils("saltfleet_paths.deployment_socket")(host["root"], user, name)
    if overflow:
        errors.append(
            f"{where}: supervisord's socket path {sock} ({len(bytes(sock))} bytes) is {overflow} bytes too long: "
            "a unix socket path holds 107 bytes, and supervisord first binds it with '.<pid>' appended; "
            "use a shorter saltfleet:root (a short link to a sandbox serves) or deployment name"
        )


def validate(pillar, default_root="/"):
    """Validate a whole pillar: returns (host settings, {name: config}, errors)."""
    host, errors = validate_host(pillar.get("saltfleet"), default_root)
    deployments = pillar.get("deployments") or {}
    if not isinstance(deployments, dict):
        return host, {}, [*errors, f"deployments: must be a mapping of name to settings, got {_type_name(deployments)}"]
    configs = {}
    for name, spec in deployments.items():
        cfg, errs = validate_deployment(name, spec, host)
        errs = errs or [e for e in [shared_user(name, cfg["user"], deployments, host)] if e]
        errors.extend(errs)
        if not errs:
            configs[name] = cfg
    return host, configs, errors


def shared_user(name, user, deployments, host):
    """
    The error when another deployment of this host runs as ``user`` too: a
    deployment's user is the unit of its isolation (its env, its files, its
    processes), so each has one of its own. Root isolates nothing and may run
    several (a sandbox's demo). Only deployments valid otherwise count: one
    that pillar gets wrong is refused alone and takes no user from another.
    """
    if user == "root":
        return None
    others = sorted(
        other
        for other, spec in deployments.items()
        if other != name
        and isinstance(spec, dict)
        and (spec.get("user") or host.get("user")) == user
        and not validate_deployment(other, spec, host)[1]
    )
    if not others:
        return None
    return (
        f"deployments:{name}:user: '{user}' also runs deployment {others[0]} on this host, which could then read "
        f"{name}'s env and files; give each deployment a user of its own (deployments:{name}:user)"
    )


def host_root(pillar, opts):
    """
    The host's root from pillar ``saltfleet:root``, else the minion's root_dir,
    even when other saltfleet keys are invalid (the states report those).
    """
    host = pillar.get("saltfleet") if hasattr(pillar, "get") else None
    root = host.get("root") if isinstance(host, dict) else None
    if isinstance(root, str) and os.path.isabs(root):
        return root
    return opts.get("root_dir") or "/"
