"""
A deployment's virtualenvs: one per digest of what it is built from (the
Python asked for and the requirements files, ``-r``/``-c`` includes followed),
shared by every release whose requirements did not change, built with uv as
the deployment's user.

Requirements are read from root's mirror, never from the user's tree, and an
include that is a symlink or points out of the repository is refused before
anything runs: no file outside the release is read into it, and no content of
one can reach a message.
"""

import hashlib
import posixpath
import re

import salt.loader.context
from salt.exceptions import CommandExecutionError

__virtualname__ = "saltfleet_venv"

# What a plan reads of the repository's requirements, at most (the repository is not trusted).
MAX_FILES = 32
MAX_BYTES = 1 << 20
INCLUDE_RE = re.compile(r"^\s*(?:-r|-c|--requirement|--constraint)(?:\s*=\s*|\s+)(\S+)")


def __virtual__():
    return __virtualname__


def _utils(name):
    # Salt's utils loader packs no __utils__ into utils modules. The loader in
    # context is that mapping while one of their functions runs, or the loader
    # module's whose code runs on (a context manager's body) and holds it.
    loader = salt.loader.context.loader_ctxvar.get()
    return loader.pack.get("__utils__", loader)[name]


def environ(venv, env):
    """What runs in a release with virtualenv ``venv``: its bin first on PATH, and the deployment's ``env``."""
    return {
        "PATH": f"{venv}/bin:/usr/local/bin:/usr/bin:/bin",
        "VIRTUAL_ENV": str(venv),
        **{key: str(value) for key, value in env.items()},
    }


def digest(read, cfg, rebuild=0):
    """
    Digest of what a virtualenv is built from. ``read(relpath)`` returns
    (kind, text) of a file of the release: kind "file", "link" or None (absent).
    ``rebuild`` (deployment.update_virtualenv's count) asks for a new one from
    the same files.
    """
    where = f"deployments:{cfg['name']}:requirements"
    total = hashlib.sha256(f"python={cfg['python']}\n".encode())
    if rebuild:
        total.update(f"rebuild={rebuild}\n".encode())
    top = posixpath.normpath(cfg["requirements"])
    seen, todo, size = set(), [(top, None)], 0
    while todo:
        rel, parent = todo.pop(0)
        if rel in seen:
            continue
        seen.add(rel)
        if len(seen) > MAX_FILES:
            raise CommandExecutionError(
                f"{where}: '{cfg['requirements']}' and its -r/-c includes are more than {MAX_FILES} files; "
                "include fewer"
            )
        kind, text = read(rel)
        size += len(text or "")
        if size > MAX_BYTES:
            raise CommandExecutionError(
                f"{where}: '{cfg['requirements']}' and its includes hold more than {MAX_BYTES} bytes; trim them"
            )
        named = f"'{rel}'" + (f" (included by '{parent}')" if parent else "")
        if kind == "link":
            raise CommandExecutionError(
                f"{where}: {named} is a symlink in the repository; saltfleet reads only files of the "
                "release: commit the file itself"
            )
        if kind is None:
            if parent is None:
                raise CommandExecutionError(
                    f"{where}: '{cfg['requirements']}' is not in the repository at this revision; "
                    "set requirements to the app's requirements file"
                )
            total.update(f"{rel}\n(missing)\n".encode())
            continue
        total.update(f"{rel}\n{text}\n".encode())
        for line in text.splitlines():
            match = INCLUDE_RE.match(line)
            if not match or "://" in match.group(1):
                continue
            include = match.group(1)
            target = posixpath.normpath(posixpath.join(posixpath.dirname(rel), include))
            if posixpath.isabs(include) or target == ".." or target.startswith("../"):
                raise CommandExecutionError(
                    f"{where}: '{rel}' includes '{include}', outside the repository; "
                    "include only files of the repository (relative paths)"
                )
            todo.append((target, rel))
    return total.hexdigest()[:16]


def build(cfg, settings, uv, home, venv, release):
    """As the user: create ``venv`` and install the release's requirements into it with ``uv`` (root's)."""
    user = cfg["user"]
    env = {"UV_PYTHON_DOWNLOADS": "never", "UV_NO_PROGRESS": "1"}
    if cfg.get("uv_cache"):
        env["UV_CACHE_DIR"] = cfg["uv_cache"]
    run, remove = _utils("saltfleet_user.run"), _utils("saltfleet_user.remove")
    steps = (
        [uv, "venv", "-q", "--python", cfg["python"], venv],
        [uv, "pip", "install", "-q", "--python", venv / "bin" / "python", "-r", release / cfg["requirements"]],
    )
    remove(user, home, venv)
    for argv in steps:
        proc = run(user, argv, home, cwd=release, env=env)
        if proc.returncode:
            remove(user, home, venv)
            said = _utils("saltfleet_user.scrub")(proc.stderr or proc.stdout, cfg["env"])
            tail = "\n".join(said.strip().splitlines()[-12:])
            raise CommandExecutionError(
                f"deployments:{cfg['name']}:requirements: installing '{cfg['requirements']}' failed "
                f"(uv {argv[1]} exited {proc.returncode}):\n{tail}"
            )
    _utils("saltfleet_user.write")(user, home, _utils("saltfleet_paths.venv_marker")(venv), cfg["requirements"])
