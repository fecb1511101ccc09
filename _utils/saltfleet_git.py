"""
Git for a deployment: root's mirror of the app's repository, and the
releases the deployment's user checks out of it.

Root holds the deploy key, so root alone talks to the git server: it keeps a
bare mirror in its own state dir (``repo.git``, readable by the user) and
reads from it what a plan needs (which commit ``rev`` names, the requirements
files). The deployment's user clones a release from the mirror into their own
tree; nothing of theirs is ever written by root.

The deploy key reaches ssh through ``GIT_SSH_COMMAND`` as a path, never on a
command line, with the pinned host keys and ``StrictHostKeyChecking=yes``.
"""

import contextlib
import logging
import os
import re
import tempfile
from pathlib import Path

import salt.loader.context
from salt.exceptions import CommandExecutionError

log = logging.getLogger(__name__)

__virtualname__ = "saltfleet_git"

SHA_RE = re.compile(r"^[0-9a-f]{40}$")
# A repository reached over ssh: only ever with the deployment's own deploy key.
SSH_RE = re.compile(r"^((ssh|git\+ssh|ssh\+git)://|[^/:]+@[^/:]+:)")
# The transports the schema accepts, enforced by git itself too.
ALLOWED_PROTOCOLS = "ssh:https:git:file"
FETCH_TIMEOUT = 900
# How long ssh may take to reach the git server.
CONNECT_TIMEOUT = 10
# A commit's subject as the master learns it: one line, no longer than this.
SUBJECT_MAX = 200


def __virtual__():
    return __virtualname__


def _utils(name):
    # Salt's utils loader packs no __utils__ into utils modules. The loader in
    # context is that mapping while one of their functions runs, or the loader
    # module's whose code runs on (a context manager's body) and holds it.
    loader = salt.loader.context.loader_ctxvar.get()
    return loader.pack.get("__utils__", loader)[name]


def _read(path):
    try:
        return Path(path).read_text()
    except OSError:
        return None


def is_sha(text):
    """True when ``text`` is a full commit SHA (a release folder's name)."""
    return SHA_RE.fullmatch(text) is not None


def secrets_of(p):
    """Where git finds a deployment's deploy key and known_hosts (root's, 0600)."""
    return {"deploy_key": p["deploy_key"], "known_hosts": p["known_hosts"]}


def environ(cfg, secrets, home=None):
    """
    Root's git environment: the deploy key and pinned host keys, never on a
    command line. With ``home`` (an empty folder), nothing else of root's:
    no ssh config, agent or identity, no git config or credential helper.
    """
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0", GIT_ALLOW_PROTOCOL=ALLOWED_PROTOCOLS)
    ssh = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT}"]
    if home is not None:
        for key in ("SSH_AUTH_SOCK", "SSH_ASKPASS", "GIT_ASKPASS", "GIT_SSH", "GIT_SSH_COMMAND", "GIT_CONFIG"):
            env.pop(key, None)
        env.update(HOME=str(home), XDG_CONFIG_HOME=str(home), GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull)
        ssh += ["-F", os.devnull, "-o", "IdentityAgent=none"]
    if cfg.get("deploy_key"):
        ssh += ["-i", str(secrets["deploy_key"])]
    if cfg.get("deploy_key") or home is not None:
        ssh += ["-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=yes"]
        ssh += ["-o", f"UserKnownHostsFile={secrets['known_hosts']}"]
        env["GIT_SSH_COMMAND"] = " ".join(ssh)
    return env


def _git(args, cfg, secrets, cwd=None, check=True, timeout=FETCH_TIMEOUT, home=None):
    try:
        proc = _utils("saltfleet_user.run_root")(["git", *args], environ(cfg, secrets, home), timeout, cwd=cwd)
    except CommandExecutionError:
        raise CommandExecutionError(
            f"deployments:{cfg['name']}:repo: git {args[0]} of {cfg['repo']} ran over {timeout} s"
        ) from None
    if proc.returncode:
        if check:
            raise CommandExecutionError(explain(proc.stderr, args[0], cfg))
        return None
    return proc.stdout.rstrip("\n")


def explain(stderr, command, cfg):
    """The error a failed git ``command`` gives, naming the deployment's key to fix."""
    where = f"deployments:{cfg['name']}"
    stderr = (stderr or "").replace("\r", "").strip()
    if "Host key verification failed" in stderr:
        offered = re.search(r"key sent by the remote host is\s*\n?(\S+ \S+)", stderr)
        return (
            f"{where}:known_hosts: the SSH host key of {cfg['repo']} does not match the pinned known_hosts "
            f"(Host key verification failed{'; the server offered ' + offered.group(1) if offered else ''}); "
            f"check the server's key and update {where}:known_hosts in pillar"
        )
    tail = "; ".join(line for line in stderr.splitlines()[-4:] if "@@@" not in line)
    return f"{where}:repo: git {command} of {cfg['repo']} failed: {tail or 'no output'}"


def write_secrets(cfg, secrets, test=False):
    """
    Write the deploy key and known_hosts, 0600 and root's, to ``secrets``
    (paths in a directory of root's); return the keys that changed (or would).
    """
    changed = []
    for key in ("deploy_key", "known_hosts"):
        value = cfg.get(key)
        if not value:
            continue
        text = value if value.endswith("\n") else value + "\n"
        path = Path(secrets[key])
        try:
            same = path.read_text() == text and (path.stat().st_mode & 0o777) == 0o600
        except OSError:
            same = False
        if not same:
            changed.append(key)
            if not test:
                _utils("saltfleet_files.write_atomic")(path, text, 0o600)
    return changed


def ls_remote(cfg, secrets, timeout=FETCH_TIMEOUT, home=None):
    """{ref: SHA} on the remote, in one round trip (``home``: with nothing of root's, see :func:`environ`)."""
    out = _git(["ls-remote", "--", cfg["repo"]], cfg, secrets, timeout=timeout, home=home)
    refs = {}
    for line in out.splitlines():
        sha, _, ref = line.partition("\t")
        refs[ref] = sha
    return refs


def resolve_remote(rev, refs):
    """The SHA the remote gives ``rev``, or None if rev is no ref there."""
    for ref in (rev, f"refs/heads/{rev}", f"refs/tags/{rev}^{{}}", f"refs/tags/{rev}"):
        if ref in refs:
            return refs[ref]
    return None


def resolve_here(name, spec, rev, timeout=20):
    """
    The commit ``rev`` of deployment ``name``'s repo (its pillar ``spec``)
    is now, asked from here (the master) with the deployment's own deploy
    key in a throwaway folder; None (logged) when it cannot be asked in time,
    or must not be: root's own ssh identity is never offered for a repo
    without a deploy key.
    """
    if is_sha(str(rev)):
        return str(rev)
    repo = spec.get("repo") if isinstance(spec, dict) else None
    if not isinstance(repo, str) or (SSH_RE.match(repo) and not spec.get("deploy_key")):
        return None
    cfg = {"name": name, "repo": repo, "deploy_key": spec.get("deploy_key"), "known_hosts": spec.get("known_hosts")}
    with tempfile.TemporaryDirectory(prefix="saltfleet-rev-") as tmp:
        secrets = {key: Path(tmp) / key for key in ("deploy_key", "known_hosts")}
        try:
            write_secrets(cfg, secrets)
            return resolve_remote(str(rev), ls_remote(cfg, secrets, timeout=timeout, home=tmp))
        except CommandExecutionError as exc:
            log.warning("saltfleet: %s: %s is left for the hosts to resolve: %s", name, rev, exc)
            return None


def has_commit(repo, sha, cfg, secrets):
    if not Path(repo, "HEAD").exists():
        return False
    return _git(["cat-file", "-e", f"{sha}^{{commit}}"], cfg, secrets, cwd=repo, check=False) is not None


def _rev_parse(repo, rev, cfg, secrets):
    return _git(
        ["rev-parse", "-q", "--verify", "--end-of-options", f"{rev}^{{commit}}"], cfg, secrets, cwd=repo, check=False
    )


def read_file(repo, sha, relpath, cfg, secrets):
    """
    (kind, text) of ``relpath`` at commit ``sha``: kind is "file", "link" (its
    text is the link's target) or None when the path is not in the commit.
    """
    entry = _git(["ls-tree", "-z", sha, "--", relpath], cfg, secrets, cwd=repo, check=False)
    if not entry:
        return None, None
    mode, kind, obj = entry.split("\t", 1)[0].split()
    if kind != "blob":
        return None, None
    text = _git(["cat-file", "blob", obj], cfg, secrets, cwd=repo)
    return ("link" if mode == "120000" else "file"), text


def subject(repo, sha, cfg, secrets):
    """
    The subject (first line) of commit ``sha`` in root's ``repo``, at most
    SUBJECT_MAX characters, or None when git cannot say. The app's authors
    wrote it: it is text for people to read (the fleet page shows it as
    text), never markup or a command.
    """
    text = _git(["show", "-s", "--format=%s", "--end-of-options", sha], cfg, secrets, cwd=repo, check=False, timeout=30)
    if text is None:
        return None
    text = "".join(ch for ch in text.splitlines()[0] if ch.isprintable()) if text else ""
    return text if len(text) <= SUBJECT_MAX else text[: SUBJECT_MAX - 3] + "..."


def fetch(repo, cfg, secrets):
    """
    Create or update a bare mirror of the app's repository (heads and tags),
    in root's tree, readable by root and the deployment's user alone (who
    clones releases from it) from the moment it exists.
    """
    repo = Path(repo)
    if not (repo / "HEAD").exists():
        _utils("saltfleet_files.root_dir")(repo, 0o700, f"deployments:{cfg['name']}", enforce=False)
        _utils("saltfleet_files.readable_by")(repo, _utils("saltfleet_user.account")(cfg["user"]).pw_uid)
        _git(["init", "-q", "--bare", str(repo)], cfg, secrets)
    refspecs = ["+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"]
    _git(["fetch", "-q", "--prune", "--force", "--", cfg["repo"], *refspecs], cfg, secrets, cwd=repo)


def resolve(cfg, repo, secrets, known=None):
    """
    Turn pillar ``rev`` into a full SHA present in ``repo``, fetching only when
    repo lacks it; an error naming the rev when the remote does not have it.
    ``known`` is the commit rev already resolved to (by the master, for the
    whole fleet): no ls-remote then.
    """
    rev = cfg["rev"]
    for sha in (rev, known):
        if sha and SHA_RE.match(sha) and has_commit(repo, sha, cfg, secrets):
            return sha
    sha = known or resolve_remote(rev, ls_remote(cfg, secrets))
    if sha and has_commit(repo, sha, cfg, secrets):
        return sha
    fetch(repo, cfg, secrets)
    found = sha or _rev_parse(repo, rev, cfg, secrets)
    if not found or not has_commit(repo, found, cfg, secrets):
        raise CommandExecutionError(
            f"deployments:{cfg['name']}:rev: '{rev}' not found in {cfg['repo']}; "
            "set rev to an existing branch, tag or commit"
        )
    return found


@contextlib.contextmanager
def view(cfg, mirror, secrets, test):
    """
    Yield (repo, secrets) to read revisions from: the mirror itself, or in test
    mode a throwaway repository that borrows the mirror's objects (and a copy
    of the key), so a dry run learns exactly what the real run would check out
    and changes nothing on the host.
    """
    if not test:
        yield mirror, secrets
        return
    with tempfile.TemporaryDirectory(prefix="saltfleet-dry-") as tmp:
        dry = {key: Path(tmp) / key for key in ("deploy_key", "known_hosts")}
        write_secrets(cfg, dry)
        repo = Path(tmp) / "view.git"
        _git(["init", "-q", "--bare", str(repo)], cfg, dry)
        if (Path(mirror) / "objects").is_dir():
            (repo / "objects" / "info" / "alternates").write_text(f"{Path(mirror) / 'objects'}\n")
        yield repo, dry


def clone_release(user, p, release, sha, repo_url):
    """As the user: check commit ``sha`` out of root's mirror into the user's release directory."""
    mirror, home = p["mirror"], p["home"]
    config = f"[safe]\n\tdirectory = {mirror}\n"
    if _read(p["gitconfig"]) != config:
        _utils("saltfleet_files.write_atomic")(p["gitconfig"], config, 0o644)
    script = (
        "set -e\n"
        'rm -rf -- "$2"\n'
        'git clone -q --no-checkout --no-hardlinks -- "$1" "$2"\n'
        'cd "$2"\n'
        'git -c advice.detachedHead=false checkout -q --detach "$3"\n'
        'git remote set-url origin "$4"\n'
        # The venv link lives in the work tree but is not the app's: hide it from git.
        "echo /venv >> .git/info/exclude\n"
    )
    proc = _utils("saltfleet_user.run")(
        user,
        ["/bin/sh", "-c", script, "sh", mirror, release, sha, repo_url],
        home,
        cwd=home,
        env={"GIT_CONFIG_GLOBAL": str(p["gitconfig"]), "GIT_ALLOW_PROTOCOL": "file"},
        timeout=FETCH_TIMEOUT,
    )
    _utils("saltfleet_user.check")(proc, f"checking out {sha[:12]} into {release} as {user} failed")
    return Path(release)
