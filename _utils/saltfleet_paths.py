"""
Where saltfleet keeps things on a host: the only place a host path is spelled.

Every path hangs off a root prefix (pillar ``saltfleet:root``, default the
minion's ``root_dir``), so tests and the local demo converge a sandbox. Two
trees, by who may write them:

root's, under ``<root>/var/lib/saltfleet/`` (root writes only here)::

    deployments/<name>/               0711 root
        manifest.json                 what serves: release, venv, generation, history
        supervisord.<gen>.conf        root's, readable by the deployment's user alone
                                      (supervisord rereads it as the user); no env in it
        supervisord.<gen>.boot        0700: starts that generation's supervisord as the
                                      user (setpriv), who then sources its env
        supervisord.<gen>.env         the deployment's env, readable by its user alone
        supervisord.conf, .boot       links to the serving generation's (cron's @reboot
                                      line runs supervisord.boot)
        deploy_key, known_hosts       0600
        lock                          one change at a time
        repo.git/                     mirror fetched by root, cloned from by the user
                                      (root's, passable by that user alone)
        gitconfig                     what the user's clone runs with (safe.directory)
        run/                          the user's (0700): sockets and pidfiles that
                                      supervisord makes once it runs as the user
    sysfiles/<owner>.json             the sysfiles each owner installed

the deployment user's, under ``<root>/home/<user>/`` (written only as that user)::

    Projects-<name>                   link to the serving release (the seed's path)
    Projects-<name>.releases/<sha>/   one checkout per commit; in its .git/, the
                                      markers saltfleet-complete (built: its venv
                                      digest) or saltfleet-failed (why it did not;
                                      empty when the disk had no room for why)
    Projects-<name>.venvs/<digest>/   one virtualenv per requirements digest
                                      (.saltfleet-complete once it is built)
    log/<name>/                       logs: <program>.g<gen>.log, supervisord.g<gen>.log,
                                      drain.<gen>.log, build.<sha>.log
"""

from pathlib import Path

__virtualname__ = "saltfleet_paths"

# A unix socket's path must fit in sockaddr_un (108 bytes with its NUL).
UNIX_SOCKET_MAX = 107
# supervisord binds ``<socket>.<its pid>`` first and renames it: room for the
# longest pid the kernel hands out (pid_max is at most 2**22, 7 digits).
PID_SUFFIX_MAX = len(".4194304")
# The longest generation number a socket's name is checked for.
LONGEST_GENERATION = "999"


def __virtual__():
    return __virtualname__


def registry(root):
    """Root's tree: what saltfleet installed on the host and the state of each deployment."""
    return Path(root) / "var" / "lib" / "saltfleet"


def home(root, user):
    return Path(root) / "home" / user


def paths(root, user, name):
    """Every host path of deployment ``name`` run by ``user`` under ``root``."""
    root = Path(root)
    user_home = home(root, user)
    state = registry(root) / "deployments" / name
    return {
        "root": root,
        "home": user_home,
        "project": user_home / f"Projects-{name}",
        "releases": user_home / f"Projects-{name}.releases",
        "venvs": user_home / f"Projects-{name}.venvs",
        "logs": user_home / "log" / name,
        "state": state,
        "manifest": state / "manifest.json",
        "lock": state / "lock",
        "mirror": state / "repo.git",
        # The only git config the user's clones of the mirror run with: it names
        # the mirror safe (git refuses a repository another user owns otherwise).
        "gitconfig": state / "gitconfig",
        "conf": state / "supervisord.conf",
        "boot": state / "supervisord.boot",
        "deploy_key": state / "deploy_key",
        "known_hosts": state / "known_hosts",
        "run": state / "run",
    }


def generation(p, gen):
    """The config, boot script, socket and pidfile of supervisord generation ``gen`` of a deployment (``paths``)."""
    return {
        "conf": p["state"] / f"supervisord.{gen}.conf",
        "boot": p["state"] / f"supervisord.{gen}.boot",
        "env": p["state"] / f"supervisord.{gen}.env",
        "socket": p["run"] / f"{gen}.sock",
        "pidfile": p["run"] / f"{gen}.pid",
    }


def release(p, sha):
    return p["releases"] / sha


def venv(p, digest):
    return p["venvs"] / digest


def markers(release_dir):
    """What saltfleet writes (as the user) into a release it built: complete, or failed and why."""
    git = Path(release_dir) / ".git"
    return {"complete": git / "saltfleet-complete", "failed": git / "saltfleet-failed"}


def venv_marker(venv_dir):
    """The file whose presence says a virtualenv was built whole."""
    return Path(venv_dir) / ".saltfleet-complete"


def log(p, what, gen):
    """The log of ``what`` (a program, ``supervisord`` or ``drain``) of generation ``gen``."""
    return p["logs"] / (f"drain.{gen}.log" if what == "drain" else f"{what}.g{gen}.log")


def generation_logs(gen):
    """Name patterns of every log generation ``gen`` writes in the logs folder (see :func:`log`)."""
    return (f"*.g{gen}.log", f"drain.{gen}.log")


def build_log(p, sha):
    """Where a release's build steps write what they say."""
    return p["logs"] / f"build.{sha[:12]}.log"


def sysfiles_record(root, owner):
    return registry(root) / "sysfiles" / f"{owner}.json"


def socket_overflow(path, appended=0):
    """
    By how many bytes a unix socket at ``path`` (to which its maker appends
    ``appended`` bytes first) is too long; 0 when it fits.
    """
    return max(0, len(bytes(Path(path))) + appended - UNIX_SOCKET_MAX)


def deployment_socket(root, user, name):
    """
    (overflow, path) of the deployment's longest supervisord socket path:
    ``socket_overflow`` counts the temporary name supervisord binds first.
    """
    sock = generation(paths(root, user, name), LONGEST_GENERATION)["socket"]
    return socket_overflow(sock, PID_SUFFIX_MAX), sock
