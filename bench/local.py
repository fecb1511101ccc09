"""
One host converged without a master: saltfleet and Salt's built-in states
through `salt-call --local`, and the raw shell floor with no Salt at all.
"""

import json
from pathlib import Path

import yaml

from bench.env import BIN, REPO, USER, UV_CACHE, BenchError, run, serving_socket, wait_programs_running


def deployment_names(count, prefix="bd"):
    return [f"{prefix}{i + 1}" for i in range(count)]


def worker_command(name, concurrency=1):
    # %% is supervisord's escape for a literal %: celery sees -n <name>@%h.
    return f"celery -A sampleapp worker -Q {name} -c {concurrency} -n {name}@%%h"


class LocalHost:
    """
    A sandbox host driven by salt-call --local: its minion config (root_dir is
    the sandbox, so Salt's own cache starts cold like a new machine's) and its
    pillar, rewritten per apply.
    """

    def __init__(self, root, repo, data, sls=None):
        self.root = Path(root)
        self.repo, self.data = repo, data
        self.conf = self.root / "etc" / "salt"
        self.pillar_dir = self.root / "srv" / "pillar"
        self.pillar_dir.mkdir(parents=True)
        file_roots = [str(REPO / "salt")]
        if sls:
            # The built-ins baseline: its own state tree with one SLS, no saltfleet in it.
            tree = self.root / "srv" / "salt"
            tree.mkdir(parents=True)
            (tree / "top.sls").write_text(yaml.safe_dump({"base": {"*": ["builtins"]}}))
            (tree / "builtins.sls").write_text(sls)
            file_roots = [str(tree)]
        minion = {
            "id": f"bench-{self.root.name}",
            "root_dir": str(self.root),
            "user": USER,
            "file_client": "local",
            "file_roots": {"base": file_roots},
            "pillar_roots": {"base": [str(self.pillar_dir)]},
            "utils_dirs": [str(REPO / "_utils")],
            "module_dirs": [str(REPO / "_modules")],
            "states_dirs": [str(REPO / "_states")],
            "grains_dirs": [str(REPO / "_grains")],
            # As saltfleet provisions hosts: a state run syncs no modules first (the
            # dirs above are the repository's own, so there is nothing to sync).
            "autoload_dynamic_modules": False,
            "log_level_logfile": "warning",
            "state_output": "terse",
        }
        self.conf.mkdir(parents=True)
        (self.conf / "minion").write_text(yaml.safe_dump(minion))

    def write_pillar(self, data):
        (self.pillar_dir / "top.sls").write_text(yaml.safe_dump({"base": {"*": ["bench"]}}))
        (self.pillar_dir / "bench.sls").write_text(yaml.safe_dump(data))

    def salt_call(self, *args, check=True):
        return run([BIN / "salt-call", "-c", self.conf, "--local", "--out=json", "-l", "quiet", *args], check=check)

    def apply(self):
        """state.apply; raise unless every state succeeded. Returns {state id: state}."""
        proc = self.salt_call("state.apply", check=False)
        try:
            ret = json.loads(proc.stdout)["local"]
        except (ValueError, KeyError, TypeError):
            raise BenchError(
                f"state.apply on {self.root} gave no states (exit {proc.returncode}):\n"
                f"{(proc.stdout + proc.stderr)[-3000:]}"
            ) from None
        if not isinstance(ret, dict):
            raise BenchError(f"state.apply on {self.root} failed: {ret}")
        failed = {k: v.get("comment") for k, v in ret.items() if v.get("result") is not True}
        if failed or proc.returncode:
            raise BenchError(f"state.apply on {self.root} failed (exit {proc.returncode}): {failed}")
        return {v["__id__"]: v for v in ret.values()}

    def ping(self):
        proc = self.salt_call("test.ping")
        if json.loads(proc.stdout).get("local") is not True:
            raise BenchError(f"test.ping on {self.root}: {proc.stdout}")


# ------------------------------------------------------------------ saltfleet


def saltfleet_pillar(root, repo, data, names, rev="v1", revs=None, env=None, concurrency=1):
    revs = revs or {}
    return {
        "saltfleet": {"root": str(root), "user": USER, "uv_cache": str(UV_CACHE)},
        "deployments": {
            name: {
                "repo": str(repo),
                "rev": revs.get(name, rev),
                "env": {"SAMPLEAPP_DATA": str(data), **(env or {})},
                "programs": {"worker": {"command": worker_command(name, concurrency)}},
            }
            for name in names
        },
    }


class SaltfleetHost(LocalHost):
    """saltfleet's deployments of the sample app; ``env`` (e.g. its broker) and ``concurrency`` for each worker."""

    def __init__(self, root, repo, data, names, env=None, concurrency=1):
        super().__init__(root, repo, data)
        self.names = names
        self.revs = {}
        self.env, self.concurrency = env, concurrency

    def converge(self, revs=None):
        """Apply pillar (revisions by name, v1 otherwise); check every deployment's programs RUNNING."""
        self.revs.update(revs or {})
        pillar = saltfleet_pillar(
            self.root, self.repo, self.data, self.names, revs=self.revs, env=self.env, concurrency=self.concurrency
        )
        self.write_pillar(pillar)
        states = self.apply()
        for name in self.names:
            wait_programs_running(*serving_socket(self.root, USER, name))
        return states

    def changes(self, states):
        return {sid: s["changes"] for sid, s in states.items() if s["changes"]}


# ------------------------------------------------------------------ built-ins


def _supervisord_conf(folder, name, project, venv, data):
    """A plain supervisord.conf, written the way a shell script or an SLS author would."""
    return "\n".join(
        [
            "[unix_http_server]",
            f"file={folder}/supervisor.sock",
            "chmod=0700",
            "[supervisord]",
            f"pidfile={folder}/supervisord.pid",
            f"logfile={folder}/supervisord.log",
            f"childlogdir={folder}",
            f"directory={project}",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory=supervisor.rpcinterface:make_main_rpcinterface",
            "[supervisorctl]",
            f"serverurl=unix://{folder}/supervisor.sock",
            "[program:worker]",
            f"command={worker_command(name)}",
            f"directory={project}",
            f'environment=PATH="{venv}/bin:/usr/local/bin:/usr/bin:/bin",VIRTUAL_ENV="{venv}",SAMPLEAPP_DATA="{data}"',
            f"stdout_logfile={folder}/worker.log",
            "redirect_stderr=true",
            "stopasgroup=true",
            "killasgroup=true",
            "",
        ]
    )


def builtins_sls(root, repo, data, names):
    """Salt's built-in states only: git.latest, virtualenv.managed, file.managed, cmd.run with unless."""
    home = Path(root) / "home" / USER
    states = {}
    for name in names:
        project = home / f"bi-{name}"
        venv = home / f"bi-{name}.venv"
        folder = home / f"bi-{name}.supervisor"
        conf = folder / "supervisord.conf"
        states[f"{name}-checkout"] = {
            "git.latest": [{"name": str(repo)}, {"target": str(project)}, {"rev": "v1"}, {"force_reset": True}]
        }
        states[f"{name}-venv"] = {
            "virtualenv.managed": [
                {"name": str(venv)},
                {"python": "python3"},
                # A bare name (the venv's, first on PATH): Salt takes any venv_bin path that contains
                # "venv" (.venv/bin/virtualenv) for the venv module, which rejects `python`.
                {"venv_bin": "virtualenv"},
                {"requirements": str(project / "requirements.txt")},
                {"require": [{"git": f"{name}-checkout"}]},
            ]
        }
        states[f"{name}-conf"] = {
            "file.managed": [
                {"name": str(conf)},
                {"makedirs": True},
                {"mode": "0600"},
                {"contents": _supervisord_conf(folder, name, project, venv, data)},
            ]
        }
        states[f"{name}-supervisord"] = {
            "cmd.run": [
                {"name": f"{BIN / 'supervisord'} -c {conf}"},
                {"unless": f"{BIN / 'supervisorctl'} -c {conf} status"},
                {"cwd": str(project)},
                {"require": [{"virtualenv": f"{name}-venv"}, {"file": f"{name}-conf"}]},
            ]
        }
    return yaml.safe_dump(states, default_flow_style=False, sort_keys=False)


class BuiltinsHost(LocalHost):
    def __init__(self, root, repo, data, names):
        super().__init__(root, repo, data, sls=builtins_sls(root, repo, data, names))
        self.names = names
        self.write_pillar({})

    def converge(self):
        states = self.apply()
        home = self.root / "home" / USER
        for name in self.names:
            wait_programs_running(home / f"bi-{name}.supervisor" / "supervisor.sock")
        return states


# ------------------------------------------------------------------ raw floor


def raw_floor(root, repo, data, names, python="python3"):
    """
    No Salt: per deployment, one after another, git clone, uv venv + uv pip
    install, write supervisord.conf, start supervisord, wait for RUNNING.
    """
    home = Path(root) / "home" / USER
    home.mkdir(parents=True, exist_ok=True)
    for name in names:
        project = home / f"raw-{name}"
        venv = project / "venv"
        folder = home / f"raw-{name}.supervisor"
        run(["git", "clone", "-q", "--branch", "v1", str(repo), str(project)])
        run([BIN / "uv", "venv", "-q", "--python", python, str(venv)])
        run(
            [
                BIN / "uv",
                "pip",
                "install",
                "-q",
                "--python",
                str(venv / "bin" / "python"),
                "-r",
                str(project / "requirements.txt"),
            ]
        )
        folder.mkdir()
        conf = folder / "supervisord.conf"
        conf.write_text(_supervisord_conf(folder, name, project, venv, data))
        conf.chmod(0o600)
        run([BIN / "supervisord", "-c", str(conf)], cwd=project)
        wait_programs_running(folder / "supervisor.sock")
