"""
`make demo`: a fleet on this machine, provisioned, deployed and listed with the real Salt commands.

Everything lives under .demo/ (git-ignored): the master's config, keys, cache
and logs (.demo/etc/salt, .demo/var), the instances salt-cloud's local driver
creates (.demo/minions/<name>, each its own minion root_dir), the sample app's
git repository (.demo/sample-app.git), its Celery broker (a private RabbitMQ
node in .demo/rabbitmq: localfleet/rabbitmq.py) and its data folder (results
and execution records, .demo/sample-data). The broker's URL holds its
password: the master's config (0600) hands it to the deployments' pillar,
and the commands the demo prints read it from .demo/rabbitmq/url.
The daemons know .demo/ by a short link to it under the system's temporary
directory (``daemons.short_alias``; `make demo-down` removes it): Salt puts
every path of a daemon, its unix sockets' too, under its root_dir, and a
socket's path holds 107 bytes, whatever the length of the checkout's path.
The master listens on 127.0.0.1 only, on ports chosen free at the first run.
"""

import getpass
import json
import os
import shlex
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from localfleet import api, procs
from localfleet import daemons as local
from localfleet.config import REPO, stop_deployments
from localfleet.daemons import UV_CACHE, FleetError, Master, command, environ, free_ports, port_free, short_alias
from localfleet.rabbitmq import RabbitMQ
from localfleet.sampleapp import SAMPLE_APP

DEMO = REPO / ".demo"
ETC = DEMO / "etc" / "salt"
SANDBOXES = DEMO / "minions"
APP_SOURCE = SAMPLE_APP
APP_REPO = DEMO / "sample-app.git"
APP_BRANCH = "main"
SECOND_REVISION = "v2"
BROKER_DIR = DEMO / "rabbitmq"
APP_DATA = DEMO / "sample-data"
WORKERS = ("demo-worker-1", "demo-worker-2")
# Where the beat (a program of sample-reporter) runs, and the queues it sends sample-fetcher a task on.
BEAT_HOST = "demo-worker-2"
BEAT_QUEUES = ("sample-fetcher.instagram", "sample-fetcher.twitter")
PROFILE = "local-worker"
# What the user types from the repository (the commands the demo prints).
CONFIG_ARG = f"-c {ETC.relative_to(REPO)}"


class DemoError(FleetError):
    """A step failed; the message says which and where to look."""


# ------------------------------------------------------------------ output


class Progress:
    def __init__(self, total):
        self.total = total
        self.step = 0
        self.started = time.monotonic()

    def __call__(self, text):
        self.step += 1
        elapsed = time.monotonic() - self.started
        print(f"\n==> [{self.step}/{self.total}] {text}  (t+{elapsed:.0f}s)", flush=True)


def shown(cmd):
    """The command as the user would type it from the repository."""
    return " ".join(shlex.quote(str(a)) for a in cmd)


def run(cmd, echo=True, check=True, capture=False, timeout=None):
    """Run a salt command from the repository, showing it and its output."""
    if echo:
        print(f"$ {shown(cmd)}", flush=True)
    proc = subprocess.run(
        [command(cmd[0]), *map(str, cmd[1:])],
        cwd=REPO,
        env=environ(),
        stdin=subprocess.DEVNULL,
        capture_output=capture,
        text=True,
        check=False,
        timeout=timeout,
    )
    if check and proc.returncode:
        detail = f"\n{proc.stdout or ''}{proc.stderr or ''}" if capture else ""
        raise DemoError(f"`{shown(cmd)}` exited {proc.returncode}{detail}")
    return proc


# ------------------------------------------------------------------ sample app


def _git(*args, env=None):
    return subprocess.run(
        ["git", *args], check=True, capture_output=True, text=True, env={**os.environ, **(env or {})}
    ).stdout.strip()


def publish_sample_app(source=APP_SOURCE, bare=APP_REPO, branch=APP_BRANCH):
    """Commit source's files into the bare repo's branch, only when they changed; return the SHA."""
    if not (bare / "HEAD").exists():
        bare.parent.mkdir(parents=True, exist_ok=True)
        _git("init", "-q", "--bare", f"--initial-branch={branch}", str(bare))
    env = {
        "GIT_DIR": str(bare),
        "GIT_WORK_TREE": str(source),
        "GIT_INDEX_FILE": str(bare / "saltfleet-demo.index"),
        "GIT_AUTHOR_NAME": "saltfleet demo",
        "GIT_AUTHOR_EMAIL": "demo@saltfleet.invalid",
        "GIT_COMMITTER_NAME": "saltfleet demo",
        "GIT_COMMITTER_EMAIL": "demo@saltfleet.invalid",
    }
    _git("add", "-A", ".", env=env)
    tree = _git("write-tree", env=env)
    head = subprocess.run(
        ["git", "rev-parse", "-q", "--verify", f"refs/heads/{branch}"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=False,
    ).stdout.strip()
    if head and _git("rev-parse", f"{head}^{{tree}}", env=env) == tree:
        sha = head
    else:
        parents = ["-p", head] if head else []
        sha = _git("commit-tree", tree, *parents, "-m", "sample-app as of `make demo`", env=env)
        _git("update-ref", f"refs/heads/{branch}", sha, env=env)
    publish_second_revision(bare, sha, env)
    return sha


def publish_second_revision(bare, base, env):
    """Branch v2 of the sample app: main with VERSION "2", what the demo's printed fleet.deploy rolls out."""
    current = subprocess.run(
        ["git", "rev-parse", "-q", "--verify", f"refs/heads/{SECOND_REVISION}^"],
        capture_output=True,
        text=True,
        env={**os.environ, "GIT_DIR": str(bare)},
        check=False,
    ).stdout.strip()
    if current == base:
        return
    app = (APP_SOURCE / "sampleapp.py").read_text()
    blob = subprocess.run(
        ["git", "hash-object", "-w", "--stdin"],
        input=app.replace('VERSION = "1"', 'VERSION = "2"'),
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "GIT_DIR": str(bare)},
    ).stdout.strip()
    index = {**env, "GIT_INDEX_FILE": str(bare / "saltfleet-demo-v2.index")}
    _git("read-tree", base, env=index)
    _git("update-index", "--cacheinfo", f"100644,{blob},sampleapp.py", env=index)
    tree = _git("write-tree", env=index)
    sha = _git("commit-tree", tree, "-p", base, "-m", "sample-app, second revision (VERSION 2)", env=index)
    _git("update-ref", f"refs/heads/{SECOND_REVISION}", sha, env=index)


# ------------------------------------------------------------------ config


def read_master_config():
    try:
        return yaml.safe_load((ETC / "master").read_text()) or {}
    except OSError:
        return {}


def _ports(running):
    """The master's ports: those of the last run when still usable, else new free ones."""
    old = read_master_config()
    ports = (old.get("publish_port"), old.get("ret_port"))
    if all(ports) and (running or all(port_free(p) for p in ports)):
        return ports
    return tuple(free_ports(2))


def master(running, broker_url):
    """The demo's salt-master: .demo/ is its root_dir, its config .demo/etc/salt/master."""
    user = getpass.getuser()
    settings = {
        "id": "saltfleet-demo-master",
        "log_level_logfile": "info",
        "worker_threads": 3,
        "state_output": "changes",
        # The README's nodegroup example, for the demo's fetcher: `salt -N fetchers ...`.
        "nodegroups": {"fetchers": "G@saltfleet_deployments:sample-fetcher:*"},
        # Read by pillar/top.sls and pillar/demo/*.sls: the demo's own facts.
        "saltfleet_demo": {
            "user": user,
            "app_repo": str(APP_REPO),
            "app_rev": APP_BRANCH,
            "app_data": str(APP_DATA),
            # A secret (its password): the config is the demo user's alone (write_config).
            "broker_url": broker_url,
            "uv_cache": str(UV_CACHE),
        },
    }
    return Master(DEMO, settings, ports=_ports(running), root_dir=short_alias(DEMO))


def write_config(running, broker_url):
    """The demo master's config, salt-cloud's config and the local provider/profile, under .demo/etc/salt."""
    demo_master = master(running, broker_url)
    # Under the master's root_dir as the daemons know it (Salt puts any other path under it).
    root = short_alias(DEMO)
    cloud = {
        "log_file": str(root / "var" / "log" / "salt" / "cloud"),
        "cachedir": str(root / "var" / "cache" / "salt" / "cloud"),
        "update_cachedir": False,
    }
    provider = yaml.safe_load((REPO / "cloud.providers.d" / "local.conf").read_text())
    provider["local"]["sandbox_dir"] = str(instances_dir())
    profiles = yaml.safe_load((REPO / "cloud.profiles.d" / "local.conf").read_text())
    header = "# Written by `make demo` (localfleet/demo.py); rewritten at every run.\n"
    # Readable by the demo's user alone before the broker's URL goes in.
    config = ETC / "master"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.touch(mode=0o600)
    config.chmod(0o600)
    demo_master.write(header)
    files = {
        ETC / "cloud": cloud,
        ETC / "cloud.providers.d" / "local.conf": provider,
        ETC / "cloud.profiles.d" / "local.conf": profiles,
    }
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(header + yaml.safe_dump(data, default_flow_style=False, sort_keys=True))
    _repoint_minions(demo_master.ret_port)
    return demo_master


def _repoint_minions(ret_port):
    """Existing instances follow the master when its port had to change (something else took it)."""
    for config in SANDBOXES.glob("*/etc/salt/minion"):
        minion = yaml.safe_load(config.read_text()) or {}
        if minion.get("master_port") != ret_port:
            minion["master_port"] = ret_port
            config.write_text(yaml.safe_dump(minion, default_flow_style=False))


# ------------------------------------------------------------------ master


def master_pid():
    return local.master_pid(DEMO)


def start_master(demo_master, timeout=60):
    where = f"127.0.0.1:{demo_master.ret_port}"
    if demo_master.pid():
        print(f"salt-master already runs (pid {demo_master.pid()}), on {where}")
        return
    print(f"$ {shown(['salt-master', *demo_master.argv[1:]])}", flush=True)
    demo_master.start(timeout)
    print(f"salt-master runs (pid {demo_master.pid()}), on {where}")


# ------------------------------------------------------------------ broker


def broker():
    """The demo's RabbitMQ node (.demo/rabbitmq), run as the demo's user: its settings kept between runs."""
    return RabbitMQ(BROKER_DIR, user=None)


def known_broker():
    """The demo's RabbitMQ node when a run made one, else None (nothing to find or stop)."""
    return broker() if (BROKER_DIR / "node.json").exists() else None


def start_broker(node):
    """Start the node, or find it running; what to print once it answers."""
    where = f"127.0.0.1:{node.port}"
    if node.pid():
        node.start()
        return f"rabbitmq-server already runs (pid {node.pid()}), on {where}"
    node.start()
    return f"rabbitmq-server runs (pid {node.pid()}), on {where}; log {node.log.relative_to(REPO)}"


# ------------------------------------------------------------------ instances


def instances_dir():
    """Where the instances live, as the daemons know it: through the short link to .demo/."""
    return short_alias(DEMO) / "minions"


def _sandboxes():
    return sorted(instances_dir() / p.name for p in SANDBOXES.glob("*") if p.is_dir())


def daemons():
    """
    {pid: what} of the demo's daemons, from their pidfiles: the master, the
    broker and its epmd, each minion, each supervisord.
    """
    found = {}
    if master_pid():
        found[master_pid()] = "salt-master"
    node = known_broker()
    if node is not None:
        found.update({pid: what for pid, what in ((node.pid(), "rabbitmq-server"), (node.epmd_pid(), "epmd")) if pid})
    for sandbox in _sandboxes():
        minion = local.minion_pid(sandbox)
        if minion:
            found[minion] = f"salt-minion of {sandbox.name}"
        found.update({pid: f"{what} on {sandbox.name}" for pid, what in local.supervisords(sandbox).items()})
    return found


def processes():
    """{pid: (start, command line)}: the demo's daemons and every process they started (jobs, programs)."""
    return procs.tree(daemons())


def instances():
    """{name: 'running'|'stopped'} of the demo's local instances (what `salt-cloud -Q` says)."""
    return {
        record.parent.name: "running" if local.minion_pid(instances_dir() / record.parent.name) else "stopped"
        for record in sorted(SANDBOXES.glob("*/instance.json"))
    }


# ------------------------------------------------------------------ a task


def _fetcher_project():
    return SANDBOXES / "demo-worker-1" / "home" / getpass.getuser() / "Projects-sample-fetcher"


TASK_CODE = (
    "import sampleapp; "
    "print(sampleapp.fetch.apply_async(['instagram'], queue='sample-fetcher.instagram').get(timeout=120))"
)


def task_command():
    """
    A shell line that sends the sample task to the fetchers' queue and prints
    the answer of whichever worker took it. The broker's URL is read from its
    file as the line runs: no command line holds it.
    """
    project = _fetcher_project().relative_to(REPO)
    env = f"SAMPLEAPP_DATA={APP_DATA} SAMPLEAPP_BROKER=$(cat {BROKER_DIR / 'url'})"
    return f'(cd {project} && {env} venv/bin/python -c "{TASK_CODE}")'


def send_task(timeout=180):
    line = task_command()
    print(f"$ {line}", flush=True)
    proc = subprocess.run(["bash", "-c", line], cwd=REPO, text=True, timeout=timeout, check=False)
    if proc.returncode:
        raise DemoError(f"the sample task failed (exit {proc.returncode}); see {_fetcher_project().parent / 'log'}")


def executions_by_host(since):
    """
    {host: executions} of the sample app recorded since ``since`` (epoch
    seconds), by the host part of their Celery node (the fetchers' node_host).
    """
    found = {}
    for entry in os.scandir(APP_DATA / "executions"):
        # <task>.<pid>.<time_ns>.json: the time is in the name, so old records stay unread.
        parts = entry.name.split(".")
        if len(parts) != 4 or parts[3] != "json" or not parts[2].isdigit() or int(parts[2]) < since * 1e9:
            continue
        try:
            node = json.loads(Path(entry.path).read_text())["node"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        host = node.rpartition("@")[2]
        found[host] = found.get(host, 0) + 1
    return found


def watch_traffic(hosts, seconds=5, timeout=60):
    """
    Until the beat's fetches run on every one of ``hosts`` (at least one each
    within ``seconds``): {host: executions in those seconds}; a DemoError
    naming the logs when they do not within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while True:
        started = time.time()
        time.sleep(seconds)
        counts = executions_by_host(started)
        if all(counts.get(host) for host in hosts):
            return counts
        if time.monotonic() > deadline:
            raise DemoError(
                f"in {seconds} s the fetchers ran {counts or 'nothing'}, not a task on each of {', '.join(hosts)}; "
                f"see the beat's and the fetchers' logs in .demo/minions/<name>/home/{getpass.getuser()}/log/"
            )


def canary_command():
    """The printed rollout of the second revision with a canary: one host, 30 s of analysis, then the rest."""
    steps = '[{hosts: 1}, {analyse: 30}, {hosts: "100%"}]'
    return f"salt-run {CONFIG_ARG} fleet.deploy sample-fetcher rev={SECOND_REVISION} steps='{steps}'"


# ------------------------------------------------------------------ up / down


def up(workers=WORKERS):
    with ThreadPoolExecutor(max_workers=1) as background:
        return _up(workers, background)


def _up(workers, background):
    started = time.monotonic()
    progress = Progress(12)
    salt = ["salt", *CONFIG_ARG.split()]

    progress("sample app: examples/sample-app committed into .demo/sample-app.git (the deployments' repo)")
    sha = publish_sample_app()
    APP_DATA.mkdir(parents=True, exist_ok=True)
    print(f"{APP_REPO.relative_to(REPO)} {APP_BRANCH} = {sha}")

    progress(f"the Celery broker: a private RabbitMQ node on 127.0.0.1, all of it in {BROKER_DIR.relative_to(REPO)}")
    node = broker()
    node.choose_ports()
    print(f"node {node.node}, AMQP on 127.0.0.1:{node.port}: starting beside the steps below", flush=True)
    broker_up = background.submit(start_broker, node)

    progress("salt-master on 127.0.0.1 with its config under .demo/etc/salt")
    demo_master = write_config(running=bool(master_pid()), broker_url=node.url())
    start_master(demo_master)

    progress(f"salt-cloud: {', '.join(workers)} from profile {PROFILE} (local driver: a sandbox and a minion each)")
    provision(demo_master, workers)

    progress("sync saltfleet's grains, modules and states to the minions")
    run([*salt, "-t", "120", "*", "saltutil.sync_all", "--out=txt"])

    progress("deploy: state.apply converges every worker to its pillar (pillar/top.sls)")
    print(broker_up.result(), flush=True)
    run([*salt, "-t", "600", "*", "state.apply", "--state-output=terse", "--state-verbose=False"])

    progress("an ad-hoc command on every worker")
    run([*salt, "*", "cmd.run", "uptime"])

    progress("refresh the grains the master caches (deployments and their releases)")
    run([*salt, "*", "saltutil.refresh_grains", "--out=txt"], check=False)

    progress("the fleet, from the master's cache")
    run(["salt-run", *CONFIG_ARG.split(), "-l", "error", "fleet.inventory"])

    progress("a task through the fleet: sampleapp.fetch on queue sample-fetcher.instagram (either fetcher host)")
    send_task()

    queues = ", ".join(BEAT_QUEUES)
    progress(f"steady traffic: the beat (sample-reporter on {BEAT_HOST}) sends a fetch a second to {queues}")
    counts = watch_traffic(workers)
    ran = ", ".join(f"{host} {counts[host]}" for host in workers)
    print(f"fetches run in 5 s: {ran} (records in {(APP_DATA / 'executions').relative_to(REPO)})")

    progress("every deployment's programs across the fleet, asked of the hosts")
    run(["salt-run", *CONFIG_ARG.split(), "fleet.status"])

    print_next_steps(time.monotonic() - started)
    api.up(demo_master)


def provision(demo_master, workers):
    """
    The instances, made or started with salt-cloud as needed, each minion
    answering: ``workers``, and any other the user made (`make demo-down`
    stopped it too; the master, which holds its key, targets it with the rest).
    """
    existing = instances()
    missing = [w for w in workers if w not in existing]
    stopped = [name for name, state in existing.items() if state == "stopped"]
    for name, state in existing.items():
        if state == "running":
            print(f"{name} exists and runs")
    if stopped:
        run(["salt-cloud", *CONFIG_ARG.split(), "-y", "-a", "start", *stopped])
    if missing:
        run(["salt-cloud", *CONFIG_ARG.split(), "-p", PROFILE, *missing])
    after = instances()
    if any(state != "running" for state in after.values()) or any(w not in after for w in workers):
        raise DemoError(f"instances not running after salt-cloud: {after}; see .demo/var/log/salt/cloud")
    demo_master.wait_for_minions(sorted(after), timeout=90)


def print_next_steps(elapsed):
    print(
        f"""
The demo fleet runs ({elapsed:.0f} s). Drive it from {REPO} with the venv's commands
(`source .venv/bin/activate`, or prefix them with .venv/bin/):

    salt {CONFIG_ARG} '*' test.ping
    salt {CONFIG_ARG} '*' deployment.status
    salt {CONFIG_ARG} 'demo-worker-*' cmd.run 'uptime'
    salt {CONFIG_ARG} '*' state.apply
    salt-run {CONFIG_ARG} fleet.inventory
    salt-run {CONFIG_ARG} fleet.status
    salt-run {CONFIG_ARG} fleet.deploy sample-fetcher rev={SECOND_REVISION}   # the app's second revision, host by host
    {canary_command()}   # a canary
    salt-run {CONFIG_ARG} fleet.history
    salt-run {CONFIG_ARG} fleet.ansible_inventory --out=json
    salt-cloud {CONFIG_ARG} -Q
    salt-cloud {CONFIG_ARG} -p {PROFILE} demo-worker-3
    salt-cloud {CONFIG_ARG} -y -d demo-worker-3
    SALT_CONFIG_DIR=.demo/etc/salt localfleet/ansible_inventory.py --list   # an Ansible inventory script

Send the fetchers a task (the beat sends them {len(BEAT_QUEUES)} a second already):
    {task_command()}

Logs: .demo/var/log/salt/ (master, cloud), .demo/minions/<name>/var/log/salt/minion,
the deployments' in .demo/minions/<name>/home/{getpass.getuser()}/log/. Deployments (releases, venvs)
in .demo/minions/<name>/home/{getpass.getuser()}/; their supervisord configs, sockets and manifests
in .demo/minions/<name>/var/lib/saltfleet/deployments/.
Stop every process of the demo: make demo-down    (make clean also removes .demo/)
"""
    )


def down(timeout=120):
    """Stop the instances (deployments and minions), then the master; then make sure nothing of theirs is left.

    Only the demo's daemons (by pidfile) and their descendants are stopped: a
    shell, an editor or a `tail -f` that merely runs in .demo/ is left alone.
    """
    started = time.monotonic()
    api.down(DEMO)
    # Taken before anything stops: a stopped parent's children are reparented
    # and no longer look like the demo's.
    started_by_demo = processes()
    states = instances()
    running = [name for name, state in states.items() if state == "running"]
    # An instance whose minion is stopped may still run deployments (started by hand, or left by a failed stop).
    supervised = [s.name for s in _sandboxes() if s.name in states and local.supervisords(s)]
    names = sorted(set(running) | set(supervised))
    if names and (ETC / "cloud.providers.d" / "local.conf").exists():
        print(f"==> stopping {', '.join(names)} (their deployments, then their minions)", flush=True)
        run(["salt-cloud", *CONFIG_ARG.split(), "-y", "-a", "stop", *names], check=False, timeout=timeout * 6)
    for sandbox in _sandboxes():
        left = local.supervisords(sandbox)
        if left:
            print(f"==> stopping what still runs on {sandbox.name}: {', '.join(sorted(left.values()))}", flush=True)
            stop_deployments(sandbox, timeout=timeout)
    pid = master_pid()
    if pid:
        print(f"==> stopping salt-master (pid {pid})", flush=True)
        procs.stop([pid], timeout=30)
    node = known_broker()
    if node is not None and (node.pid() or node.epmd_pid()):
        print(f"==> stopping rabbitmq-server (pid {node.pid()}) and its epmd", flush=True)
        node.stop()
    # What the daemons started and still runs (a job in flight, a program whose
    # supervisord died): stop it too, and say so.
    leftovers = {**procs.still_running(started_by_demo), **procs.still_running(processes())}
    if leftovers:
        print(f"==> stopping {len(leftovers)} more process(es) the demo started:", flush=True)
        for pid, cmd in sorted(leftovers.items()):
            print(f"    {pid} {cmd[:150]}")
        procs.stop(list(leftovers), timeout=15)
    remaining = {**procs.still_running(started_by_demo), **procs.still_running(processes())}
    if remaining:
        raise DemoError(f"still running: {remaining}")
    short_alias(DEMO).unlink()
    print(f"The demo is stopped ({time.monotonic() - started:.0f} s); `make demo` starts it again.")
