"""
Sysfiles: files a deployment installs into the host's system directories
(``deployments/<name>/sysfiles/`` on the master, e.g. ``etc/cron.d/<name>``),
and those every host gets (``deployments/common/sysfiles/``).

Each owner's installed files are recorded (``<root>/var/lib/saltfleet/sysfiles/
<owner>.json``), so a file no longer shipped is removed and two owners never
claim one path. Sysfiles go only where root alone writes.
"""

import contextlib
import hashlib
import re
from pathlib import Path, PurePosixPath

import salt.loader.context

__virtualname__ = "saltfleet_sysfiles"

# cron ignores files in /etc/cron.d whose names hold anything else.
CRON_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def __virtual__():
    return __virtualname__


def _utils(name):
    # Salt's utils loader packs no __utils__ into utils modules. The loader in
    # context is that mapping while one of their functions runs, or the loader
    # module's whose code runs on (a context manager's body) and holds it.
    loader = salt.loader.context.loader_ctxvar.get()
    return loader.pack.get("__utils__", loader)[name]


def mode_of(content):
    return 0o755 if content.startswith(b"#!") else 0o644


def installed(root):
    """{owner: {relpath: sha256}} of the sysfiles saltfleet installed under root."""
    folder = _utils("saltfleet_paths.registry")(root) / "sysfiles"
    read = _utils("saltfleet_files.read_json")
    return {entry.stem: read(entry, {}) for entry in sorted(folder.glob("*.json"))} if folder.is_dir() else {}


def check(owner, files, root):
    """Errors for sysfiles cron would ignore, that leave the root, or that another owner installed."""
    errors = []
    for rel in sorted(files):
        parts = PurePosixPath(rel).parts
        if PurePosixPath(rel).is_absolute() or ".." in parts or not parts:
            errors.append(f"deployments:{owner}:sysfiles: {rel} is not a path under the host's root; rename it")
        elif len(parts) >= 3 and parts[:2] == ("etc", "cron.d") and not CRON_NAME_RE.match(parts[-1]):
            errors.append(
                f"deployments:{owner}:sysfiles: etc/cron.d/{parts[-1]} would be ignored by cron "
                "(names may hold only letters, digits, '-' and '_'); rename it"
            )
    for other, record in installed(root).items():
        if other != owner:
            for rel in sorted(set(files) & set(record)):
                errors.append(
                    f"deployments:{owner}:sysfiles: {rel} is already installed by '{other}'; rename one of them"
                )
    return errors


def _differs(target, content):
    try:
        return target.read_bytes() != content or (target.stat().st_mode & 0o777) != mode_of(content)
    except OSError:
        return True


def diff(owner, files, root):
    """What installing ``files`` (relpath -> bytes) would change under root: {added, changed, removed}."""
    root = Path(root)
    previous = installed(root).get(owner, {})
    changes = {"added": [], "changed": [], "removed": []}
    for rel, content in sorted(files.items()):
        target = root / rel
        if not target.exists():
            changes["added"].append(rel)
        elif _differs(target, content):
            changes["changed"].append(rel)
    changes["removed"] = [rel for rel in sorted(set(previous) - set(files)) if (root / rel).is_file()]
    return {k: v for k, v in changes.items() if v}


def apply(owner, files, root):
    """Install ``files`` under root, remove what the owner no longer ships, and record what is installed."""
    root = Path(root)
    files_utils = {name: _utils(f"saltfleet_files.{name}") for name in ("root_dir", "write_atomic", "check_trusted")}
    previous = installed(root).get(owner, {})
    for rel, content in sorted(files.items()):
        target = root / rel
        if _differs(target, content):
            files_utils["root_dir"](target.parent, 0o755, f"deployments:{owner}:sysfiles", enforce=False)
            files_utils["write_atomic"](target, content, mode_of(content))
    for rel in sorted(set(previous) - set(files)):
        target = root / rel
        files_utils["check_trusted"](target.parent)
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
    record = _utils("saltfleet_paths.sysfiles_record")(root, owner)
    digests = {rel: hashlib.sha256(c).hexdigest() for rel, c in sorted(files.items())}
    if files and digests != previous:
        files_utils["root_dir"](record.parent, 0o755)
        _utils("saltfleet_files.write_json")(record, digests)
    elif not files:
        with contextlib.suppress(FileNotFoundError):
            record.unlink()
