"""
Shared code of saltfleet: the pillar schema, host paths, and the mechanics of a
deployment (git, virtualenv, supervisord, sysfiles, manifests).

Salt loads this module as ``__utils__["saltfleet.*"]`` in the ``deployment``
states and execution module, the grains and the fleet runner. It has no
``__salt__``: whatever needs the master's file server is done by its callers.
"""

import configparser
import contextlib
import difflib
import hashlib
import io
import json
import logging
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from pathlib import Path

log = logging.getLogger(__name__)

__virtualname__ = "saltfleet"

# One place for every default. Host-level keys live under pillar `saltfleet`,
# per-deployment keys under `deployments:<name>`; a deployment may override the
# host-level keys marked in DEPLOYMENT_OVERRIDES.
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
    # How a new release takes over from the one serving: "overlap" starts it in
    # a second supervisord and, once its programs are RUNNING, lets the old ones
    # finish their tasks and exit (workers keep consuming throughout);
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
    "user": None,
    "python": None,
    "keep_releases": None,
    "handover": None,
}
DEPLOYMENT_OVERRIDES = ("user", "python", "keep_releases", "handover")
HANDOVERS = ("overlap", "stop-first")

# [program:x] options a pillar `programs` entry may set (supervisord's own names).
PROGRAM_OPTIONS = {
    "command": str,
    "process_name": str,
    "numprocs": int,
    "numprocs_start": int,
    "priority": int,
    "autostart": bool,
    "autorestart": (bool, str),
    "startsecs": int,
    "startretries": int,
    "exitcodes": (str, int),
    "stopsignal": str,
    "stopwaitsecs": int,
    "stopasgroup": bool,
    "killasgroup": bool,
    "redirect_stderr": bool,
    "stdout_logfile": str,
    "stderr_logfile": str,
    "environment": dict,
    "directory": str,
    "umask": str,
}
PROGRAM_DEFAULTS = {
    "autostart": True,
    "autorestart": True,
    # supervisord's own default. A program counts as started once it lived
    # this long, and a new release whose programs die sooner is rolled back:
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
# Sections saltfleet writes itself: a template may only add programs and groups.
OWN_SECTIONS = (
    "unix_http_server",
    "inet_http_server",
    "supervisord",
    "supervisorctl",
    "rpcinterface:supervisor",
    "include",
)
TEMPLATE_SECTION_RE = re.compile(r"^(program|group|eventlistener|fcgi-program):[A-Za-z0-9][A-Za-z0-9_.-]*$")

RESERVED_NAMES = ("common",)
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
CRON_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
SHA_RE = re.compile(r"^[0-9a-f]{40}$")
UNIX_SOCKET_MAX = 107


class DeploymentError(Exception):
    """An error an operator can act on; its text names the pillar key and the fix."""


def __virtual__():
    return __virtualname__


def error(message):
    """A DeploymentError for loader modules, which see only this module's functions."""
    return DeploymentError(message)


# ---------------------------------------------------------------- validation


def _type_name(value):
    # Salt 3008 hands pillar over in masked containers: name what the user wrote.
    for kind, name in ((bool, "bool"), (str, "str"), (int, "int"), (float, "float"), (dict, "mapping"), (list, "list")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _check_type(where, value, expected, errors, hint=""):
    # YAML's true/false are ints to Python; they are never a count or a string here.
    ok = isinstance(value, expected) and not (isinstance(value, bool) and expected in (int, str))
    if not ok:
        want = "/".join(
            "mapping" if t is dict else t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,))
        )
        errors.append(f"{where}: must be a {want}, got {_type_name(value)} {value!r}{hint}")
    return ok


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


def _check_choice(where, value, choices, errors):
    if value not in choices:
        errors.append(f"{where}: must be {' or '.join(choices)}, got {value!r}")


def _check_relpath(where, value, errors):
    if not _check_type(where, value, str, errors):
        return
    parts = Path(value).parts
    if not value or Path(value).is_absolute() or ".." in parts:
        errors.append(f"{where}: {value!r} must be a path inside the repository (relative, no '..')")


def validate_host(host, default_root="/"):
    """Return (settings, errors) for pillar `saltfleet`, defaults filled in."""
    errors = []
    host = {} if host is None else host
    if not isinstance(host, dict):
        return dict(HOST_DEFAULTS), [f"saltfleet: must be a mapping, got {_type_name(host)}"]
    _check_keys("saltfleet", host, HOST_DEFAULTS, errors)
    settings = dict(HOST_DEFAULTS)
    settings.update({k: v for k, v in host.items() if k in HOST_DEFAULTS})
    if settings["root"] is None:
        settings["root"] = default_root
    if _check_type("saltfleet:root", settings["root"], str, errors) and not os.path.isabs(settings["root"]):
        errors.append(f"saltfleet:root: {settings['root']!r} must be an absolute path")
    elif isinstance(settings["root"], str) and not re.match(r"^[A-Za-z0-9_./+-]+$", settings["root"]):
        # Paths under root reach ssh's and supervisord's command lines: keep them plain.
        errors.append(f"saltfleet:root: {settings['root']!r} may hold only letters, digits and '_./+-'")
    _check_name("saltfleet:user", settings["user"], errors, "user")
    _check_type("saltfleet:python", settings["python"], str, errors)
    if _check_type("saltfleet:keep_releases", settings["keep_releases"], int, errors) and settings["keep_releases"] < 1:
        errors.append("saltfleet:keep_releases: must be at least 1 (the release that serves is always kept)")
    for key in ("uv", "uv_cache", "supervisord"):
        if settings[key] is not None:
            _check_type(f"saltfleet:{key}", settings[key], str, errors)
    _check_type("saltfleet:purge_removed", settings["purge_removed"], bool, errors)
    _check_choice("saltfleet:handover", settings["handover"], HANDOVERS, errors)
    return settings, errors


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
        return None, [f"deployments:{name}: the name is reserved for the sysfiles every host gets; rename it"]
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        return None, [f"{where}: must be a mapping of settings, got {_type_name(spec)}"]
    _check_keys(where, spec, DEPLOYMENT_DEFAULTS, errors)
    cfg = {k: (v.copy() if isinstance(v, dict) else v) for k, v in DEPLOYMENT_DEFAULTS.items()}
    cfg.update({k: v for k, v in spec.items() if k in DEPLOYMENT_DEFAULTS})

    if cfg["repo"] is None:
        errors.append(f"{where}:repo: missing; set the app's git URL, e.g. git@github.com:example/app.git")
    elif _check_type(f"{where}:repo", cfg["repo"], str, errors) and re.match(
        r"^([A-Za-z0-9+.-]+://[^/@]*:[^/@]*@|https?://[^/@]+@)", cfg["repo"]
    ):
        # A credential in the URL would reach git's command line, the manifest and messages.
        errors.append(f"{where}:repo: holds a credential; use an ssh URL with deploy_key instead")
    _check_type(f"{where}:rev", cfg["rev"], str, errors, f"; quote it in pillar: rev: '{cfg['rev']}'")
    _check_relpath(f"{where}:requirements", cfg["requirements"], errors)
    for key in ("deploy_key", "known_hosts", "supervisord_conf"):
        if cfg[key] is not None:
            _check_type(f"{where}:{key}", cfg[key], str, errors)
    if cfg["deploy_key"] and not cfg["known_hosts"] and not str(cfg["repo"]).startswith(("/", "file://", "http")):
        errors.append(
            f"{where}:known_hosts: required with deploy_key: pin the git server's host keys "
            "(the output of ssh-keyscan, checked); saltfleet never disables host key checking"
        )
    if _check_type(f"{where}:env", cfg["env"], dict, errors):
        for key, value in cfg["env"].items():
            if not isinstance(key, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
                errors.append(f"{where}:env: {key!r} is not a valid environment variable name")
            elif not isinstance(value, (str, int, float)) or isinstance(value, bool):
                errors.append(f"{where}:env:{key}: must be a string, got {_type_name(value)}")
            elif "\n" in str(value) or "\r" in str(value):
                errors.append(f"{where}:env:{key}: must be one line (supervisord cannot carry a newline); encode it")
    _check_type(f"{where}:context", cfg["context"], dict, errors)
    if _check_type(f"{where}:programs", cfg["programs"], dict, errors):
        for prog, opts in cfg["programs"].items():
            pwhere = f"{where}:programs:{prog}"
            if not _check_name(f"{where}:programs", prog, errors, "program name"):
                continue
            if not isinstance(opts, dict):
                errors.append(f"{pwhere}: must be a mapping of supervisord program options")
                continue
            _check_keys(pwhere, opts, PROGRAM_OPTIONS, errors)
            if "command" not in opts:
                errors.append(f"{pwhere}:command: missing; the command line supervisord runs")
            for key, value in opts.items():
                if key in PROGRAM_OPTIONS:
                    _check_type(f"{pwhere}:{key}", value, PROGRAM_OPTIONS[key], errors)
    for key in DEPLOYMENT_OVERRIDES:
        if cfg[key] is None:
            cfg[key] = host[key]
    _check_name(f"{where}:user", cfg["user"], errors, "user")
    if _check_type(f"{where}:keep_releases", cfg["keep_releases"], int, errors) and cfg["keep_releases"] < 1:
        errors.append(f"{where}:keep_releases: must be at least 1")
    _check_type(f"{where}:python", cfg["python"], str, errors)
    _check_choice(f"{where}:handover", cfg["handover"], HANDOVERS, errors)
    if not errors:
        sock, _ = generation_paths(paths(host["root"], cfg["user"], name), "99")
        if len(os.fsencode(str(sock))) > UNIX_SOCKET_MAX:
            errors.append(
                f"{where}: supervisord's socket path {sock} is longer than unix sockets allow "
                f"({UNIX_SOCKET_MAX} bytes); use a shorter saltfleet:root or deployment name"
            )
    cfg["name"] = name
    cfg["root"] = host["root"]
    return cfg, errors


def host_root(pillar, opts):
    """
    The host's root from pillar `saltfleet:root`, else the minion's root_dir,
    even when other saltfleet keys are invalid (the states report those).
    """
    host = pillar.get("saltfleet") if hasattr(pillar, "get") else None
    root = host.get("root") if isinstance(host, dict) else None
    if isinstance(root, str) and root.startswith("/"):
        return root
    return opts.get("root_dir") or "/"


def validate(pillar, default_root="/"):
    """Validate a whole pillar: returns (host settings, {name: config}, errors)."""
    host, errors = validate_host(pillar.get("saltfleet"), default_root)
    deployments = pillar.get("deployments") or {}
    configs = {}
    if not isinstance(deployments, dict):
        return host, {}, [*errors, f"deployments: must be a mapping of name to settings, got {_type_name(deployments)}"]
    for name, spec in deployments.items():
        cfg, errs = validate_deployment(name, spec, host)
        errors.extend(errs)
        if not errs:
            configs[name] = cfg
    return host, configs, errors


# --------------------------------------------------------------------- paths


def paths(root, user, name):
    """Every host path of one deployment; the only place they are spelled."""
    root = Path(root)
    home = root / "home" / user
    state = home / ".saltfleet" / name
    return {
        "root": root,
        "home": home,
        "project": home / f"Projects-{name}",
        "releases": home / f"Projects-{name}.releases",
        "venvs": home / f"Projects-{name}.venvs",
        "state": state,
        "mirror": state / "repo.git",
        # A link to the serving generation's own config (see generation_paths).
        "conf": state / "supervisord.conf",
        "run": state / "run",
        # Links to the serving supervisord's own socket and pidfile (see
        # generation_paths). Short: a unix socket's path must fit in 108 bytes.
        "socket": state / "run" / "sock",
        "pidfile": state / "run" / "supervisord.pid",
        "deploy_key": state / "deploy_key",
        "known_hosts": state / "known_hosts",
        "logs": home / "log" / name,
        "manifest": registry(root) / "deployments" / f"{name}.json",
    }


def registry(root):
    """Where the host records what saltfleet installed (read by grains and pruning)."""
    return Path(root) / "var" / "lib" / "saltfleet"


def uv_cache(settings):
    return Path(settings["uv_cache"] or Path(settings["root"]) / "var" / "cache" / "saltfleet" / "uv")


# ----------------------------------------------------------------- manifests


def read_json(path, default=None):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def write_atomic(path, data, mode=0o644, owner=None):
    """Write bytes or text to path through a rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        if owner:
            chown(tmp, owner)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_manifest(path, data):
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def installed(root):
    """Manifests of the deployments installed under root, by name."""
    found = {}
    folder = registry(root) / "deployments"
    if folder.is_dir():
        for entry in sorted(folder.glob("*.json")):
            data = read_json(entry)
            if data:
                found[entry.stem] = data
    return found


# --------------------------------------------------------------------- users


def chown(path, user):
    """Give path to user when running as root for someone else."""
    if os.geteuid() != 0 or user in (None, "root"):
        return
    pw = pwd.getpwnam(user)
    os.lchown(path, pw.pw_uid, pw.pw_gid)


def chown_tree(path, user):
    if os.geteuid() != 0 or user in (None, "root"):
        return
    for dirpath, dirnames, filenames in os.walk(path):
        for entry in [dirpath] + [os.path.join(dirpath, n) for n in dirnames + filenames]:
            chown(entry, user)


def check_user(cfg):
    try:
        pwd.getpwnam(cfg["user"])
    except KeyError:
        raise DeploymentError(
            f"deployments:{cfg['name']}:user: '{cfg['user']}' does not exist on this host; "
            "create it (user.present) or set saltfleet:user"
        ) from None


def makedirs(path, user, mode=0o755):
    path = Path(path)
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for entry in reversed(missing):
        entry.mkdir(mode=mode)
        chown(entry, user)


# ----------------------------------------------------------------------- git


def _secret_paths(cfg):
    """Where git finds the deploy key: the deployment's own, or a dry run's copy."""
    if cfg.get("_secrets_dir"):
        folder = Path(cfg["_secrets_dir"])
        return {"deploy_key": folder / "deploy_key", "known_hosts": folder / "known_hosts"}
    return paths(cfg["root"], cfg["user"], cfg["name"])


def _git_env(cfg):
    """Environment for git: the deploy key and pinned host keys, never on a command line."""
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0")
    if cfg.get("deploy_key"):
        p = _secret_paths(cfg)
        env["GIT_SSH_COMMAND"] = (
            f"ssh -i {p['deploy_key']} -o IdentitiesOnly=yes -o BatchMode=yes "
            f"-o StrictHostKeyChecking=yes -o UserKnownHostsFile={p['known_hosts']}"
        )
    return env


def _git(args, cfg, cwd=None, check=True):
    import git  # pylint: disable=import-outside-toplevel

    cmd = git.cmd.Git(str(cwd) if cwd else None)
    cmd.update_environment(**_git_env(cfg))
    try:
        return cmd.execute(["git", *args], with_extended_output=False, strip_newline_in_stdout=True)
    except git.exc.GitCommandError as exc:
        if check:
            raise DeploymentError(_git_error(exc, cfg)) from None
        return None


def _git_error(exc, cfg):
    where = f"deployments:{cfg['name']}"
    stderr = (exc.stderr or "").replace("\r", "").replace("stderr: ", "").strip().strip("'").strip()
    if "Host key verification failed" in stderr:
        offered = re.search(r"key sent by the remote host is\s*\n?(\S+ \S+)", stderr)
        return (
            f"{where}:known_hosts: the SSH host key of {cfg['repo']} does not match the pinned known_hosts "
            f"(Host key verification failed{'; the server offered ' + offered.group(1) if offered else ''}); "
            f"check the server's key and update {where}:known_hosts in pillar"
        )
    return f"{where}:repo: git {exc.command[1]} of {cfg['repo']} failed: {stderr or exc.status}"


def make_dirs(cfg):
    """
    The deployment's directories. The state dir holds what root reads
    (supervisord.conf, the deploy key): root's, so the user cannot swap them.
    Its run/ dir (socket, pidfile) and the logs are the user's: supervisord
    drops to the user before it opens them.
    """
    p = paths(cfg["root"], cfg["user"], cfg["name"])
    makedirs(p["logs"], cfg["user"])
    makedirs(p["state"], None, 0o711)
    makedirs(p["run"], cfg["user"], 0o700)


def write_git_secrets(cfg, test=False):
    """
    Write the deploy key and known_hosts, 0600, for the one that runs git (the
    minion's user); return the keys that changed.
    """
    p = paths(cfg["root"], cfg["user"], cfg["name"])
    changed = []
    for key in ("deploy_key", "known_hosts"):
        value = cfg.get(key)
        if not value:
            continue
        text = value if value.endswith("\n") else value + "\n"
        current = p[key].read_text() if p[key].exists() else None
        if current != text or (p[key].stat().st_mode & 0o777) != 0o600:
            changed.append(key)
            if not test:
                make_dirs(cfg)
                write_atomic(p[key], text, 0o600)
    return changed


def ls_remote(cfg):
    """Map of ref name to SHA on the remote (one round trip, no checkout)."""
    out = _git(["ls-remote", "--", cfg["repo"]], cfg)
    refs = {}
    for line in out.splitlines():
        sha, _, ref = line.partition("\t")
        refs[ref] = sha
    return refs


def resolve_remote(cfg, refs):
    """The SHA the remote gives rev, or None if rev is no ref there."""
    rev = cfg["rev"]
    for ref in (rev, f"refs/heads/{rev}", f"refs/tags/{rev}^{{}}", f"refs/tags/{rev}"):
        if ref in refs:
            return refs[ref]
    return None


def has_commit(repo_dir, sha, cfg):
    if not Path(repo_dir, "HEAD").exists():
        return False
    return _git(["cat-file", "-e", f"{sha}^{{commit}}"], cfg, cwd=repo_dir, check=False) is not None


def rev_parse(repo_dir, rev, cfg):
    return _git(["rev-parse", "-q", "--verify", f"{rev}^{{commit}}"], cfg, cwd=repo_dir, check=False)


def show_file(repo_dir, sha, relpath, cfg):
    return _git(["show", f"{sha}:{relpath}"], cfg, cwd=repo_dir, check=False)


@contextlib.contextmanager
def repo_view(cfg, test):
    """
    Yield (cfg, repo) to read revisions from: the deployment's mirror, or in
    test mode a throwaway repo that borrows the mirror's objects (and a copy
    of the deploy key), so a dry run learns exactly what the real run would
    check out and changes nothing on the host.
    """
    mirror = paths(cfg["root"], cfg["user"], cfg["name"])["mirror"]
    if not test:
        yield cfg, mirror
        return
    with tempfile.TemporaryDirectory(prefix="saltfleet-dry-") as tmp:
        dry = dict(cfg, _secrets_dir=tmp)
        for key in ("deploy_key", "known_hosts"):
            if cfg.get(key):
                write_atomic(Path(tmp) / key, cfg[key] if cfg[key].endswith("\n") else cfg[key] + "\n", 0o600)
        view = Path(tmp) / "view.git"
        _git(["init", "-q", "--bare", str(view)], dry)
        if (mirror / "objects").is_dir():
            (view / "objects" / "info" / "alternates").write_text(f"{mirror / 'objects'}\n")
        yield dry, view


def resolve(cfg, repo_dir):
    """
    Turn pillar `rev` into a full SHA present in repo_dir, fetching only when
    repo_dir lacks it. Raises DeploymentError naming the rev when it does not
    exist on the remote.
    """
    rev = cfg["rev"]
    if SHA_RE.match(rev) and has_commit(repo_dir, rev, cfg):
        return rev
    sha = resolve_remote(cfg, ls_remote(cfg))
    if sha and has_commit(repo_dir, sha, cfg):
        return sha
    fetch(repo_dir, cfg)
    found = sha or rev_parse(repo_dir, rev, cfg)
    if not found or not has_commit(repo_dir, found, cfg):
        raise DeploymentError(
            f"deployments:{cfg['name']}:rev: '{rev}' not found in {cfg['repo']}; "
            "set rev to an existing branch, tag or commit"
        )
    return found


def fetch(repo_dir, cfg):
    """Create or update a bare mirror of the app's repo (heads and tags)."""
    repo_dir = Path(repo_dir)
    if not (repo_dir / "HEAD").exists():
        repo_dir.mkdir(parents=True, exist_ok=True)
        _git(["init", "-q", "--bare", str(repo_dir)], cfg)
    _git(
        [
            "fetch",
            "-q",
            "--prune",
            "--force",
            "--",
            cfg["repo"],
            "+refs/heads/*:refs/heads/*",
            "+refs/tags/*:refs/tags/*",
        ],
        cfg,
        cwd=repo_dir,
    )


def checkout_release(cfg, sha):
    """Clone the mirror at sha into its own release directory; return that path."""
    p = paths(cfg["root"], cfg["user"], cfg["name"])
    release = p["releases"] / sha
    if release.exists():
        shutil.rmtree(release)
    makedirs(p["releases"], cfg["user"])
    _git(["clone", "-q", "--no-checkout", str(p["mirror"]), str(release)], cfg)
    _git(["checkout", "-q", "--detach", sha], cfg, cwd=release)
    _git(["remote", "set-url", "origin", cfg["repo"]], cfg, cwd=release)
    # The venv link lives in the work tree but is not the app's: hide it from git.
    with open(release / ".git" / "info" / "exclude", "a") as fh:
        fh.write("/venv\n")
    return release


# ---------------------------------------------------------------- virtualenv


def requirements_digest(read, cfg):
    """
    Digest of what a virtualenv is built from: the Python asked for and the
    requirements file with the files it includes (-r/-c). `read(relpath)`
    returns a file's text in the release or None.
    """
    digest = hashlib.sha256(f"python={cfg['python']}\n".encode())
    seen = set()
    todo = [cfg["requirements"]]
    while todo:
        rel = os.path.normpath(todo.pop(0))
        if rel in seen:
            continue
        seen.add(rel)
        text = read(rel)
        if text is None:
            if rel == os.path.normpath(cfg["requirements"]):
                raise DeploymentError(
                    f"deployments:{cfg['name']}:requirements: '{cfg['requirements']}' is not in "
                    f"the repository at this revision; set requirements to the app's requirements file"
                )
            continue
        digest.update(f"{rel}\n{text}\n".encode())
        for line in text.splitlines():
            m = re.match(r"^\s*(?:-r|-c|--requirement|--constraint)[\s=]+(\S+)", line)
            if m:
                todo.append(os.path.join(os.path.dirname(rel), m.group(1)))
    return digest.hexdigest()[:16]


def find_tool(name, configured=None):
    """A tool beside Salt's own Python, else on PATH."""
    if configured:
        return configured
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    return shutil.which(name)


def build_venv(cfg, settings, venv, release):
    """Create the virtualenv at venv and install the release's requirements."""
    uv = find_tool("uv", settings["uv"])
    if venv.exists():
        shutil.rmtree(venv)
    makedirs(venv.parent, cfg["user"])
    req = release / cfg["requirements"]
    env = dict(os.environ, UV_PYTHON_DOWNLOADS="never", UV_CACHE_DIR=str(uv_cache(settings)), UV_NO_PROGRESS="1")
    if uv:
        steps = [
            [uv, "venv", "-q", "--seed", "--python", cfg["python"], str(venv)],
            [uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python"), "-r", str(req)],
        ]
    else:
        steps = [
            [cfg["python"], "-m", "venv", str(venv)],
            [str(venv / "bin" / "pip"), "install", "-q", "-r", str(req)],
        ]
    for cmd in steps:
        proc = subprocess.run(cmd, cwd=release, env=env, capture_output=True, text=True, check=False)
        if proc.returncode:
            shutil.rmtree(venv, ignore_errors=True)
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-12:])
            raise DeploymentError(
                f"deployments:{cfg['name']}:requirements: installing '{cfg['requirements']}' failed "
                f"({Path(cmd[0]).name} exited {proc.returncode}):\n{tail}"
            )
    mark(venv / ".saltfleet-complete", cfg["requirements"])
    chown_tree(venv, cfg["user"])


def mark(path, text):
    """Write a marker file without following a link someone put in its place."""
    write_atomic(path, text if text.endswith("\n") else text + "\n")


def venv_complete(venv):
    return (Path(venv) / ".saltfleet-complete").exists()


def link_atomic(link, target):
    """Point link at target in one rename; a reader sees the old or the new, never none."""
    link = Path(link)
    if link.exists() and not link.is_symlink():
        raise DeploymentError(
            f"{link} exists and is not a saltfleet release link (an old checkout?); "
            "move it away (e.g. to Projects-<name>.pre-saltfleet) and apply again"
        )
    _relink(link, target)


def _relink(link, target):
    tmp = link.with_name(f".{link.name}.new")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    os.replace(tmp, link)


def current_release(project):
    """The SHA the project link points at, or None."""
    try:
        return Path(os.readlink(project)).name
    except OSError:
        return None


# --------------------------------------------------------------- supervisord


def program_sections(text, name, source):
    """Parse rendered program sections; reject what saltfleet owns or cannot read."""
    parser = configparser.RawConfigParser(strict=True, interpolation=None, delimiters=("=",))
    parser.optionxform = str
    try:
        parser.read_string(text, source=source)
    except configparser.Error as exc:
        raise DeploymentError(
            f"deployments:{name}:supervisord_conf: {source} is not a valid supervisord config: {exc}"
        ) from None
    sections = {}
    for section in parser.sections():
        if section in OWN_SECTIONS or not TEMPLATE_SECTION_RE.match(section):
            raise DeploymentError(
                f"deployments:{name}:supervisord_conf: section [{section}] in {source} is not allowed; "
                "saltfleet writes [supervisord], the socket and rpc sections itself: keep only "
                "[program:x], [group:x] and [eventlistener:x] sections"
            )
        sections[section] = dict(parser.items(section))
    if not sections:
        raise DeploymentError(
            f"deployments:{name}:supervisord_conf: {source} defines no [program:x] section; "
            "add one, or set pillar programs instead"
        )
    return sections


def pillar_programs(cfg):
    """[program:x] sections from pillar `programs`."""
    sections = {}
    for prog, opts in cfg["programs"].items():
        sections[f"program:{prog}"] = {k: _ini_value(v) for k, v in opts.items()}
    return sections


def _ini_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return ",".join(f'{k}="{_quote_env(v)}"' for k, v in sorted(value.items()))
    return str(value)


def _quote_env(value):
    return str(value).replace("%", "%%").replace('"', '\\"')


def render_supervisord_conf(cfg, sections, gen=None):
    """
    The whole supervisord.conf of a deployment: its own socket, pidfile and
    logs, for supervisord generation gen (default: the one serving).
    """
    p = paths(cfg["root"], cfg["user"], cfg["name"])
    sock, pidfile = generation_paths(p, gen or generation(p))
    out = io.StringIO()
    out.write(f"; Written by saltfleet for deployment {cfg['name']}; changes here are overwritten.\n")
    own = {
        "unix_http_server": {"file": str(sock), "chmod": "0700"},
        "supervisord": {
            "identifier": f"saltfleet-{cfg['name']}",
            "pidfile": str(pidfile),
            "logfile": str(p["logs"] / "supervisord.log"),
            "childlogdir": str(p["logs"]),
            "directory": str(p["project"]),
            "environment": _ini_value(supervisord_env(cfg)),
        },
        "rpcinterface:supervisor": {
            "supervisor.rpcinterface_factory": "supervisor.rpcinterface:make_main_rpcinterface"
        },
        "supervisorctl": {"serverurl": f"unix://{p['socket']}"},
    }
    if os.geteuid() == 0 and cfg["user"] != "root":
        own["supervisord"]["user"] = cfg["user"]
        own["unix_http_server"]["chown"] = cfg["user"]
    env = {k: str(v) for k, v in cfg["env"].items()}
    for section, opts in sections.items():
        if not section.startswith(("program:", "fcgi-program:", "eventlistener:")):
            own[section] = opts
            continue
        prog = section.split(":", 1)[1]
        merged = {k: _ini_value(v) for k, v in PROGRAM_DEFAULTS.items()}
        merged["directory"] = str(p["project"])
        merged["stdout_logfile"] = str(p["logs"] / f"{prog}.log")
        merged.update(opts)
        if env:
            merged["environment"] = ",".join(filter(None, [_ini_value(env), merged.get("environment", "")]))
        own[section] = merged
    for section, opts in own.items():
        out.write(f"\n[{section}]\n")
        for key, value in opts.items():
            out.write(f"{key}={value}\n")
    return out.getvalue()


def supervisord_env(cfg):
    p = paths(cfg["root"], cfg["user"], cfg["name"])
    venv = p["project"] / "venv"
    return {
        "HOME": str(p["home"]),
        "PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        "VIRTUAL_ENV": str(venv),
        "LANG": "C.UTF-8",
    }


def boot_entry(cfg, settings):
    """
    The cron.d file that starts the deployment's supervisord at boot:
    (path under root, content). cron runs on every host saltfleet targets,
    with or without systemd, and the file is a sysfile like any other.
    """
    p = paths(cfg["root"], cfg["user"], cfg["name"])
    env = supervisord_env(cfg)
    binary = find_tool("supervisord", settings["supervisord"]) or "supervisord"
    text = (
        f"# Written by saltfleet: start deployment {cfg['name']}'s supervisord at boot.\n"
        f"PATH={env['PATH']}\nHOME={env['HOME']}\nLANG={env['LANG']}\n"
        f"@reboot {cfg['user']} {binary} -c {p['conf']}\n"
    )
    return f"etc/cron.d/saltfleet-{cfg['name']}", text.encode()


def groups_of(conf_text):
    """Process groups in a supervisord.conf and the text that defines each."""
    if not conf_text:
        return {}
    parser = configparser.RawConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str
    parser.read_string(conf_text)
    groups = {}
    members = set()
    for section in parser.sections():
        if section.startswith("group:"):
            progs = [x.strip() for x in parser.get(section, "programs", fallback="").split(",") if x.strip()]
            members.update(progs)
    for section in parser.sections():
        kind, _, gname = section.partition(":")
        if kind in ("program", "fcgi-program", "eventlistener") and gname not in members:
            groups[gname] = json.dumps(dict(parser.items(section)), sort_keys=True)
        elif kind == "group":
            progs = [x.strip() for x in parser.get(section, "programs", fallback="").split(",") if x.strip()]
            body = {
                "group": dict(parser.items(section)),
                "programs": {
                    p: dict(parser.items(f"program:{p}")) for p in progs if parser.has_section(f"program:{p}")
                },
            }
            groups[gname] = json.dumps(body, sort_keys=True)
    return groups


def diff_groups(old_text, new_text):
    old, new = groups_of(old_text), groups_of(new_text)
    return {
        "added": sorted(set(new) - set(old)),
        "changed": sorted(g for g in set(old) & set(new) if old[g] != new[g]),
        "removed": sorted(set(old) - set(new)),
        "kept": sorted(g for g in set(old) & set(new) if old[g] == new[g]),
    }


class _UnixTransport(xmlrpc.client.Transport):
    def __init__(self, path, timeout):
        super().__init__()
        self._path = path
        self._timeout = timeout

    def make_connection(self, host):
        import http.client  # pylint: disable=import-outside-toplevel

        path, timeout = self._path, self._timeout

        class _Conn(http.client.HTTPConnection):
            def connect(self):
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(timeout)
                self.sock.connect(path)

        return _Conn("localhost")


def rpc(sock, timeout=None):
    """A client for supervisord's XML-RPC interface on its unix socket."""
    return xmlrpc.client.ServerProxy("http://localhost", transport=_UnixTransport(str(sock), timeout), allow_none=True)


def supervisord_state(sock):
    """The state supervisord on sock reports (RUNNING, SHUTDOWN, ...), or None when none answers."""
    if not Path(sock).exists():
        return None
    try:
        return rpc(sock, timeout=5).supervisor.getState()["statename"]
    except (OSError, xmlrpc.client.Error):
        return None


def supervisord_running(sock):
    """True when a supervisord answers on sock and is not shutting down (its own word, not a pidfile)."""
    return supervisord_state(sock) == "RUNNING"


# A deployment's supervisord runs as a "generation": its config, socket and
# pidfile are supervisord.<gen>.conf, run/<gen>.sock and run/<gen>.pid, and
# supervisord.conf, run/sock and run/supervisord.pid link to the serving one's
# (cron's @reboot line starts whatever supervisord.conf names). An overlapping
# handover starts the new release under a new generation while the old one
# still serves, switches the links, then lets the old one drain.


def generation_paths(p, gen):
    """The socket and pidfile of supervisord generation gen of a deployment (paths())."""
    return p["run"] / f"{gen}.sock", p["run"] / f"{gen}.pid"


def generation_conf(p, gen):
    return p["state"] / f"supervisord.{gen}.conf"


def write_conf(p, gen, text):
    """Write generation gen's supervisord.conf: root's, 0600 (it carries env)."""
    write_atomic(generation_conf(p, gen), text, 0o600)


def generation(p):
    """The serving generation: the one run/sock links to ("1" before any started)."""
    try:
        return Path(os.readlink(p["socket"])).name.removesuffix(".sock")
    except OSError:
        return "1"


def generations(p):
    """{gen: pid} of every supervisord generation of a deployment still alive (serving or draining)."""
    alive = {}
    for sock in sorted(p["run"].glob("*.sock")) if p["run"].is_dir() else ():
        gen = sock.name.removesuffix(".sock")
        pid = read_pid(generation_paths(p, gen)[1])
        if supervisord_state(sock) or _supervisord_alive(pid):
            alive[gen] = pid
    return alive


def free_generation(p):
    """A generation no live supervisord of the deployment holds."""
    taken = set(generations(p)) | {generation(p)}
    return next(str(n) for n in range(1, len(taken) + 2) if str(n) not in taken)


def link_generation(p, gen):
    """Make gen the serving generation: the conf, socket and pidfile links point at its own."""
    sock, pidfile = generation_paths(p, gen)
    _relink(p["socket"], sock.name)
    _relink(p["pidfile"], pidfile.name)
    _relink(p["conf"], generation_conf(p, gen).name)
    # Configs of generations gone (they carry env): only the serving and draining ones stay.
    alive = {*generations(p), gen}
    for conf in p["state"].glob("supervisord.*.conf"):
        if conf.name.removeprefix("supervisord.").removesuffix(".conf") not in alive:
            conf.unlink(missing_ok=True)


def process_info(sock):
    try:
        return rpc(sock, timeout=10).supervisor.getAllProcessInfo()
    except (OSError, xmlrpc.client.Error):
        return []


def start_supervisord(cfg, settings, gen):
    """Start supervisord generation gen from its own config (write_conf)."""
    p = paths(cfg["root"], cfg["user"], cfg["name"])
    sock = generation_paths(p, gen)[0]
    binary = find_tool("supervisord", settings["supervisord"])
    if not binary:
        raise DeploymentError(
            "saltfleet:supervisord: no supervisord found beside Salt's Python or on PATH; install supervisor"
        )
    proc = subprocess.run(
        [binary, "-c", str(generation_conf(p, gen))],
        env=supervisord_env(cfg),
        cwd=str(p["home"]),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if supervisord_running(sock):
            return
        time.sleep(0.1)
    raise DeploymentError(
        f"deployments:{cfg['name']}: supervisord did not start: {(proc.stderr or proc.stdout).strip()[-500:]} "
        f"(see {p['logs'] / 'supervisord.log'})"
    )


def stop_supervisord(sock, pidfile=None, timeout=700, wait=True):
    """
    Ask supervisord to stop its programs gracefully and exit; wait for it
    unless wait is False. Returns False when none was running, True once it
    stopped (or, without wait, was asked to).
    """
    pid = read_pid(pidfile) if pidfile else None

    def alive():
        # A supervisord shutting down no longer answers: its pid tells.
        return bool(supervisord_state(sock)) or _supervisord_alive(pid)

    if not alive():
        return False
    server = rpc(sock).supervisor
    # SIGTERM to every program at once: supervisord's shutdown alone stops one
    # group after another, and the groups not yet signalled go on taking tasks.
    with contextlib.suppress(OSError, xmlrpc.client.Error):
        server.stopAllProcesses(False)
    with contextlib.suppress(OSError, xmlrpc.client.Error):
        server.shutdown()
    deadline = time.monotonic() + timeout
    while wait and time.monotonic() < deadline:
        if not alive():
            return True
        time.sleep(0.2)
    if wait:
        raise DeploymentError(
            f"supervisord (pid {pid}, socket {sock}) did not stop within {timeout} s; stop it by hand"
        )
    return True


def stop_generations(p, timeout=700):
    """Stop every supervisord generation of a deployment, draining ones too; True when one was running."""
    alive = generations(p)
    for gen in alive:
        stop_supervisord(*generation_paths(p, gen), wait=False)
    for gen in alive:
        stop_supervisord(*generation_paths(p, gen), timeout=timeout)
    return bool(alive)


def read_pid(pidfile):
    try:
        return int(Path(pidfile).read_text().strip())
    except (OSError, ValueError):
        return None


def _supervisord_alive(pid):
    """True while pid is a live (not zombie) supervisord: a pidfile may outlive its process."""
    if not pid:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z" and b"supervisord" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError):
        return False


def _proc_name(info):
    return info["name"] if info["group"] == info["name"] else f"{info['group']}:{info['name']}"


def _autostart(server):
    """(group, name) of the programs supervisord starts by itself."""
    return {(c["group"], c["name"]) for c in server.getAllConfigInfo() if c.get("autostart")}


def idle_groups(sock):
    """Groups with a program that should run (autostart) but is STOPPED, EXITED or FATAL."""
    try:
        server = rpc(sock, timeout=10).supervisor
        autostart = _autostart(server)
        infos = server.getAllProcessInfo()
    except (OSError, xmlrpc.client.Error):
        return []
    return sorted(
        {
            i["group"]
            for i in infos
            if (i["group"], i["name"]) in autostart and i["statename"] in ("STOPPED", "EXITED", "FATAL")
        }
    )


def wait_running(sock, names=None, timeout=120):
    """
    Wait until the programs that start by themselves (autostart) are RUNNING
    (they outlived their startsecs) or supervisord gave up on them; return
    {name: state} of those not RUNNING.
    """
    started = time.monotonic()
    try:
        autostart = _autostart(rpc(sock, timeout=10).supervisor)
    except (OSError, xmlrpc.client.Error) as exc:
        return {str(sock): f"supervisord does not answer ({exc})"}
    while True:
        pending = {
            _proc_name(i): i["statename"]
            for i in process_info(sock)
            if (names is None or i["group"] in names)
            and (i["group"], i["name"]) in autostart
            and i["statename"] != "RUNNING"
        }
        waited = time.monotonic() - started
        final = all(s == "FATAL" or (s in ("STOPPED", "EXITED") and waited > 2) for s in pending.values())
        if not pending or final or waited > timeout:
            return pending
        time.sleep(0.2)


def stop_groups(sock, groups, timeout=3600):
    """Stop groups together: SIGTERM, then supervisord waits up to each program's stopwaitsecs."""
    server = rpc(sock).supervisor
    for group in groups:
        with contextlib.suppress(xmlrpc.client.Fault):
            server.stopProcessGroup(group, False)
    deadline = time.monotonic() + timeout
    busy = ("STARTING", "RUNNING", "BACKOFF", "STOPPING")
    while time.monotonic() < deadline:
        if not any(i["group"] in groups and i["statename"] in busy for i in process_info(sock)):
            return
        time.sleep(0.2)


def apply_group_changes(sock, diff):
    """What `supervisorctl update` does, limited to the groups in diff."""
    server = rpc(sock).supervisor
    server.reloadConfig()
    stop_groups(sock, diff["removed"] + diff["changed"])
    for group in diff["removed"] + diff["changed"]:
        with contextlib.suppress(xmlrpc.client.Fault):
            server.removeProcessGroup(group)
    for group in diff["changed"] + diff["added"]:
        server.addProcessGroup(group)


def restart_groups(sock, groups):
    """
    Restart groups gracefully (SIGTERM, each program's stopwaitsecs for the
    task in hand), all at once; return {name: state} of those not RUNNING after.
    """
    if not groups:
        return {}
    stop_groups(sock, groups)
    server = rpc(sock).supervisor
    for group in groups:
        with contextlib.suppress(xmlrpc.client.Fault):
            server.startProcessGroup(group, False)
    return wait_running(sock, names=set(groups))


# ------------------------------------------------------------------ sysfiles


def sysfile_mode(content):
    return 0o755 if content.startswith(b"#!") else 0o644


def check_sysfiles(owner, files, root):
    """Reject sysfiles cron would ignore, or that another owner installed."""
    errors = []
    for rel in sorted(files):
        parts = Path(rel).parts
        if len(parts) >= 3 and parts[0] == "etc" and parts[1] == "cron.d" and not CRON_NAME_RE.match(parts[-1]):
            errors.append(
                f"deployments:{owner}:sysfiles: etc/cron.d/{parts[-1]} would be ignored by cron "
                "(names may hold only letters, digits, '-' and '_'); rename it"
            )
    for other, manifest in installed_sysfiles(root).items():
        if other == owner:
            continue
        for rel in sorted(set(files) & set(manifest)):
            errors.append(f"deployments:{owner}:sysfiles: {rel} is already installed by '{other}'; rename one of them")
    return errors


def installed_sysfiles(root):
    """{owner: {relpath: sha256}} of the sysfiles saltfleet installed under root."""
    found = {}
    folder = registry(root) / "sysfiles"
    if folder.is_dir():
        for entry in folder.glob("*.json"):
            found[entry.stem] = read_json(entry, {})
    return found


def diff_sysfiles(owner, files, root):
    """What installing files (relpath -> bytes) would change under root."""
    root = Path(root)
    previous = installed_sysfiles(root).get(owner, {})
    changes = {"added": [], "changed": [], "removed": []}
    for rel, content in sorted(files.items()):
        target = root / rel
        if not target.exists():
            changes["added"].append(rel)
        elif target.read_bytes() != content or (target.stat().st_mode & 0o777) != sysfile_mode(content):
            changes["changed"].append(rel)
    for rel in sorted(set(previous) - set(files)):
        if os.path.lexists(root / rel):
            changes["removed"].append(rel)
    return {k: v for k, v in changes.items() if v}


def apply_sysfiles(owner, files, root):
    root = Path(root)
    previous = installed_sysfiles(root).get(owner, {})
    for rel, content in sorted(files.items()):
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if (
            not target.exists()
            or target.read_bytes() != content
            or (target.stat().st_mode & 0o777) != sysfile_mode(content)
        ):
            write_atomic(target, content, sysfile_mode(content))
    for rel in sorted(set(previous) - set(files)):
        with contextlib.suppress(FileNotFoundError):
            (root / rel).unlink()
    record = registry(root) / "sysfiles" / f"{owner}.json"
    digests = {rel: hashlib.sha256(c).hexdigest() for rel, c in sorted(files.items())}
    if files and digests != previous:
        write_manifest(record, digests)
    elif not files:
        with contextlib.suppress(FileNotFoundError):
            record.unlink()


# ------------------------------------------------------------------- status


def status(root, name, manifest):
    """What one installed deployment is doing: release, supervisord, programs."""
    p = paths(root, manifest.get("user", "root"), name)
    serving = generation(p)
    running = supervisord_running(p["socket"])
    programs = {_proc_name(i): i["statename"] for i in process_info(p["socket"])} if running else {}
    return {
        "release": manifest.get("release"),
        "rev": manifest.get("rev"),
        "repo": manifest.get("repo"),
        "user": manifest.get("user"),
        "path": str(p["project"]),
        "supervisord": "running" if running else "stopped",
        "programs": programs,
        "running": sum(1 for s in programs.values() if s == "RUNNING"),
        # pids of supervisords of earlier releases whose programs still finish their tasks
        "draining": sorted(pid for gen, pid in generations(p).items() if gen != serving and pid),
    }
