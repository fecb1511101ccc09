"""
A deployment's plan: what is on the host, what pillar asks, and what would
change, computed once per apply and frozen. The dry run and the real run
share it: ``test=True`` returns its changes, a real run hands it to the
handover (saltfleet_handover), and nothing changes it on the way.

Three steps, each its own function:

- :func:`context`: the facts read once per apply (settings and config from
  pillar, the deployment's paths, its user, the tools root runs, the
  manifest, the commit the master resolved rev to);
- :func:`on_host` and :func:`resolve`: what the host runs now (supervisord
  generations, the serving config, who may read root's files) and which
  commit and virtualenv pillar asks for (git through a throwaway view in a
  dry run);
- :func:`decide`: from those facts alone, the changes, the generation that
  will serve, the handover, and what retention prunes. No I/O: the unit tier
  tests it with facts of its own.
"""

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import salt.loader.context
from salt.exceptions import CommandExecutionError

__virtualname__ = "saltfleet_plan"

PROGRAM_KINDS = ("program:", "fcgi-program:", "eventlistener:")
# The binaries root runs for a deployment: pillar names uv's and supervisord's, else found (saltfleet_files).
TOOLS = ("uv", "supervisord", "setpriv")


def __virtual__():
    return __virtualname__


def _utils(name):
    # Salt's utils loader packs no __utils__ into utils modules: the loader in context.
    loader = salt.loader.context.loader_ctxvar.get()
    return loader.pack.get("__utils__", loader)[name]


# ----------------------------------------------------------------- context


@dataclass(frozen=True)
class Context:
    """What one apply of one deployment reads once and passes down."""

    name: str
    cfg: dict  # the deployment's validated pillar, rev as it will be deployed (an operator's pin wins)
    settings: dict  # pillar saltfleet, validated
    p: dict  # saltfleet_paths.paths
    uid: int
    gid: int
    tools: dict  # {"uv": path, "supervisord": path, "setpriv": path}: root's, checked once
    manifest: dict  # as the apply found it
    pillar_rev: str  # pillar's own rev (the pin is released once they agree)
    pinned: str = None  # the note a comment gives when an operator's pin wins
    fleet: dict = field(default_factory=dict)  # {sha, at}: the master's resolution of rev, when it applies

    @property
    def user(self):
        return self.cfg["user"]


def context(settings, cfg, pillar_rev, asked_rev=False, fleet_revs=None, minion_id=None):
    """
    The context of an apply of ``cfg`` (validated): its tools checked (a tool
    the user owns fails it before anything changes), the manifest read, an
    operator's pinned rev applied. ``pillar_rev``: pillar's own rev (an
    operator's pin is dropped once they agree); ``asked_rev``: the state was
    given a rev of its own (update_code), which wins.
    """
    name = cfg["name"]
    tools = {tool: _utils("saltfleet_files.trusted_tool")(tool, settings.get(tool)) for tool in TOOLS}
    if cfg["python"].startswith("/"):
        _utils("saltfleet_files.check_trusted")(cfg["python"], f"deployments:{name}:python")
    account = _utils("saltfleet_user.account")(cfg["user"], f"deployments:{name}")
    p = _utils("saltfleet_paths.paths")(settings["root"], cfg["user"], name)
    manifest = _utils("saltfleet_manifest.read")(p)
    rev, pinned = _utils("saltfleet_manifest.wanted_rev")(manifest, cfg["rev"], asked_rev, minion_id)
    known = (fleet_revs or {}).get(name) or {}
    fleet = known if (known.get("repo"), known.get("rev")) == (cfg["repo"], rev) else {}
    return Context(
        name=name,
        cfg={**cfg, "rev": rev},
        settings=settings,
        p=p,
        uid=account.pw_uid,
        gid=account.pw_gid,
        tools=tools,
        manifest=manifest,
        pillar_rev=pillar_rev,
        pinned=pinned,
        fleet={"sha": known.get("sha"), "at": known.get("at")} if fleet else {},
    )


# ------------------------------------------------------------------- facts


@dataclass(frozen=True)
class OnHost:
    """What runs on the host for the deployment now."""

    serving: str = None  # the generation the supervisord.conf link names
    running: bool = False  # and its supervisord answers RUNNING
    serving_info: dict = None  # its {pid, start}
    draining: dict = field(default_factory=dict)  # {gen: record} of older generations finishing their tasks
    orphans: dict = field(default_factory=dict)  # {gen: record} left taking work by an interrupted apply
    old_conf: str = None  # the serving generation's config
    old_boot: str = None  # and its boot script
    old_env: str = None  # and its env
    idle: tuple = ()  # its groups that should run and do not
    ungranted: tuple = ()  # root's files of the deployment that others than its user may still read
    taken: tuple = ()  # generation numbers in use
    unbuilt: tuple = ()  # releases (SHAs) a build left half done for lack of room: removed once one has room


def on_host(ctx):
    """The facts of the host (supervisord is asked, as the user's listener: see saltfleet_supervisor)."""
    sup, p = "saltfleet_supervisor", ctx.p
    serving = _utils(f"{sup}.serving")(p)
    gens = _utils(f"{sup}.generations")(p, ctx.uid, ctx.manifest.get("draining") or {})
    running = serving is not None and gens.get(serving, {}).get("state") == "RUNNING"
    now = time.time()
    # Not serving, yet taking work: left by an apply that was interrupted. It drains now.
    # So is a drain whose drainer should have finished long ago.
    orphans = {
        g: i
        for g, i in gens.items()
        if g != serving and (i["state"] == "RUNNING" or (i.get("answering") and i.get("until", 0) < now))
    }
    generation = _utils("saltfleet_paths.generation")
    paths = generation(p, serving) if serving else {}
    known = _utils(f"{sup}.known_generations")(p)
    readable = [p["mirror"], *(generation(p, gen)["conf"] for gen in known)]
    idle = _utils(f"{sup}.idle_groups")(paths["socket"], ctx.uid) if running else []
    return OnHost(
        serving=serving,
        running=running,
        serving_info=gens.get(serving),
        draining={g: i for g, i in gens.items() if g != serving and g not in orphans},
        orphans=orphans,
        old_conf=_read(paths["conf"]) if serving else None,
        old_boot=_read(paths["boot"]) if serving else None,
        old_env=_read(paths["env"]) if serving else None,
        idle=tuple(idle),
        ungranted=tuple(path for path in readable if not _utils("saltfleet_files.granted")(path, ctx.uid)),
        taken=tuple(sorted(set(gens) | set(known))),
        unbuilt=_unbuilt(p),
    )


def _unbuilt(p):
    """The releases whose failed marker says the build ran out of room (the user's tree, read, never followed)."""
    folder = p["releases"]
    if not folder.is_dir() or folder.is_symlink():
        return ()
    shas = [entry.name for entry in folder.iterdir() if _utils("saltfleet_git.is_sha")(entry.name)]
    return tuple(sorted(sha for sha in shas if _no_room(_failure(folder / sha))))


def _no_room(record):
    # Empty: the disk had no room even for the reason.
    return record == {} or (isinstance(record, dict) and record.get("no_room") is True)


def _read(path):
    try:
        return Path(path).read_text()
    except OSError:
        return None


@dataclass(frozen=True)
class Asked:
    """What pillar asks for, resolved: the commit, its virtualenv, the programs, the files."""

    sha: str
    digest: str
    sections: dict  # supervisord sections, as pillar and the template give them
    sysfiles: dict  # {path under root: bytes}
    secrets: tuple = ()  # deploy key, known_hosts that would be written
    build_release: bool = True
    build_venv: bool = True
    build_steps: tuple = ()  # the commands of pillar build
    build_failed: str = None  # why these build steps failed on this release before (not retried)


def resolve(ctx, test):
    """
    (sha, digest, written): the commit pillar's rev names and its
    virtualenv's inputs, from the cheapest facts; and the secrets a real run
    wrote to reach the repository (the key, before git can use it).
    """
    git, cfg, manifest, p = "saltfleet_git", ctx.cfg, ctx.manifest, ctx.p
    rebuild = _utils("saltfleet_manifest.intent")(manifest).rebuild
    release = manifest.get("release")
    settled = _utils("saltfleet_manifest.settled")(manifest, cfg, ctx.fleet.get("sha"), rebuild)
    if settled and _complete(_utils("saltfleet_paths.release")(p, release)):
        return release, manifest["venv"], ()
    secrets = _utils(f"{git}.secrets_of")(p)
    written = ()
    if not test:
        # The real run needs the key before it can reach a private repo.
        root_dirs(p)
        written = tuple(_utils(f"{git}.write_secrets")(cfg, secrets))
    with _utils(f"{git}.view")(cfg, p["mirror"], secrets, test) as (repo, view_secrets):
        sha = _utils(f"{git}.resolve")(cfg, repo, view_secrets, ctx.fleet.get("sha"))
        same_inputs = manifest.get("venv") and all(manifest.get(k) == cfg[k] for k in ("requirements", "python"))
        if same_inputs and manifest.get("rebuild", 0) == rebuild and sha == release:
            return sha, manifest["venv"], written
        read_file = _utils(f"{git}.read_file")
        digest = _utils("saltfleet_venv.digest")(lambda rel: read_file(repo, sha, rel, cfg, view_secrets), cfg, rebuild)
        return sha, digest, written


def root_dirs(p):
    """Root's folders of the deployment: the registry (0755) and its state dir (0711)."""
    _utils("saltfleet_files.root_dir")(p["state"].parent, 0o755)
    _utils("saltfleet_files.root_dir")(p["state"], 0o711)


def _complete(release):
    return _utils("saltfleet_paths.markers")(release)["complete"].exists()


def build_digest(steps):
    """What identifies a list of build steps: a failure is not retried until the release or this changes."""
    return hashlib.sha256(json.dumps(list(steps)).encode()).hexdigest()[:16]


def _failure(release):
    """
    What the failed marker of ``release`` records (the user's file: bounded,
    never through a link): a dict, {} when it is empty, None when there is none.
    """
    marker = _utils("saltfleet_paths.markers")(release)["failed"]
    try:
        text = _utils("saltfleet_files.read_users_file")(marker, 8192)
        record = json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _failed_build(release, steps):
    """Why ``steps`` failed on ``release`` before (its failed marker), or None."""
    record = _failure(release)
    if not record or record.get("build") != build_digest(steps) or not steps:
        return None
    # The user's word (their tree's marker): hidden whole, in the state's hiding block, before it is cut.
    return _utils("saltfleet_user.scrub")(str(record.get("reason")))[:2000]


def asked(ctx, sha, digest, sections, sysfiles, written=()):
    """What pillar asks, with what it takes to build it (``written``: the secrets :func:`resolve` wrote)."""
    p = ctx.p
    release = _utils("saltfleet_paths.release")(p, sha)
    venv = _utils("saltfleet_paths.venv")(p, digest)
    pending = _utils("saltfleet_git.write_secrets")(ctx.cfg, _utils("saltfleet_git.secrets_of")(p), test=True)
    secrets = [key for key in ("deploy_key", "known_hosts") if key in written or key in pending]
    steps = tuple(ctx.cfg.get("build") or ())
    built = _complete(release)
    return Asked(
        sha=sha,
        digest=digest,
        sections=sections,
        sysfiles=sysfiles,
        secrets=tuple(secrets),
        build_release=not built,
        build_venv=not (Path(_utils("saltfleet_paths.venv_marker")(venv))).exists(),
        build_steps=steps,
        build_failed=None if built else _failed_build(release, steps),
    )


# ------------------------------------------------------------------ decide


@dataclass(frozen=True)
class Plan:
    """Everything an apply would change, and how."""

    changes: dict
    action: str  # start, handover, renew, reconfigure, record or none
    gen: str  # the generation that serves after it
    conf: str  # that generation's config
    boot: str  # and boot script
    env: str  # and env script
    workers: dict  # its Celery workers (saltfleet_celery.workers_in)
    sections: dict  # its program sections, held programs kept from starting
    switch: bool  # the programs move to another release, venv or env
    history: tuple  # the manifest's history after it
    prune: tuple  # release and venv folders retention deletes (as the user)
    holds: dict
    host: OnHost
    asked: Asked

    @property
    def release(self):
        return self.asked.sha

    @property
    def digest(self):
        return self.asked.digest


def held_sections(sections, holds):
    """``sections`` with the held programs kept from starting (now and after a reboot)."""
    kept = {}
    for section, opts in sections.items():
        program = section.partition(":")[2]
        held = section.startswith(PROGRAM_KINDS) and (program in holds or "*" in holds)
        kept[section] = {**opts, "autostart": "false"} if held else dict(opts)
    return kept


def free_generation(taken):
    """A generation number that neither a running supervisord nor a config of the deployment uses."""
    return next(str(n) for n in range(1, len(taken) + 2) if str(n) not in set(taken))


def decide(ctx, host, want):
    """The plan, from the facts (``on_host``, ``asked``) alone."""
    cfg, p, manifest = ctx.cfg, ctx.p, ctx.manifest
    conf_util = "saltfleet_supervisor_conf"
    current = manifest.get("release")
    intent = _utils("saltfleet_manifest.intent")(manifest)
    if want.build_failed:
        raise CommandExecutionError(
            f"deployments:{ctx.name}:build: release {want.sha[:12]} failed its build steps before, and they are "
            f"not run again until the release or the steps change: {want.build_failed}"
        )
    changes = {}
    if want.secrets:
        changes["secrets"] = list(want.secrets)
    if want.sha != current or want.build_release:
        changes["release"] = {"old": current, "new": want.sha}
        if want.build_release and want.build_steps:
            changes["build"] = [_shown(step) for step in want.build_steps]
    elif current and manifest.get("rev") != cfg["rev"]:
        # The serving release is what rev names now (a pin dropped, a rev naming the same commit): recorded,
        # so grains and the inventory say which rev the host follows.
        changes["rev"] = {"old": manifest.get("rev"), "new": cfg["rev"]}
    if want.digest != manifest.get("venv") or want.build_venv:
        changes["virtualenv"] = {"old": manifest.get("venv"), "new": want.digest}
    if host.orphans:
        changes["generations"] = {"stopped": sorted(i["pid"] for i in host.orphans.values())}
    env_changed = host.running and _env_changes(ctx, host, changes)
    # The programs move to another release or venv, or supervisord to another env: a new generation serves.
    switch = want.sha != current or want.digest != manifest.get("venv") or env_changed
    strategy = _utils("saltfleet_handover.strategy")(cfg["handover"])
    if not host.running:
        gen = host.serving if host.serving and host.serving not in host.taken else free_generation(host.taken)
        changes["supervisord"] = {"old": "stopped", "new": "running"}
    elif switch and (strategy.new_generation or env_changed):
        gen = free_generation(host.taken)
    else:
        gen = host.serving
    sections = held_sections(want.sections, intent.holds)
    # Celery workers get node names of their generation: two generations never share one.
    workers = _utils("saltfleet_celery.per_generation")(sections, gen)
    release = _utils("saltfleet_paths.release")(p, want.sha)
    venv = _utils("saltfleet_paths.venv")(p, want.digest)
    conf = _utils(f"{conf_util}.render")(cfg, sections, p, gen, release, venv)
    if host.running:
        programs = program_changes(ctx, host, want, gen, conf, switch, intent.holds)
        if programs:
            changes["programs"] = programs
        elif host.old_conf != conf:
            changes["supervisord_conf"] = "rewritten"
    sysfiles = _utils("saltfleet_sysfiles.diff")(ctx.name, want.sysfiles, ctx.settings["root"])
    if sysfiles:
        changes["sysfiles"] = sysfiles
    if host.ungranted:
        changes["permissions"] = [f"{path}: readable by {ctx.user} alone" for path in host.ungranted]
    history, prune = retention(ctx, host, want, switch and strategy.drains)
    if prune:
        changes["pruned"] = [str(path) for path in prune]
    return Plan(
        changes=changes,
        action=_action(host, switch, env_changed and not strategy.new_generation, changes),
        gen=gen,
        conf=conf,
        boot=_utils(f"{conf_util}.boot_script")(cfg, ctx.tools, p, gen, ctx.uid, ctx.gid),
        env=_utils(f"{conf_util}.env_script")(cfg),
        workers=workers,
        sections=sections,
        switch=switch,
        history=tuple(history),
        prune=tuple(prune),
        holds=intent.holds,
        host=host,
        asked=want,
    )


def _shown(step):
    return step if isinstance(step, str) else " ".join(map(str, step))


def _action(host, switch, renew, changes):
    """What the handover does: ``renew``, a new supervisord that a strategy of one supervisord cannot give."""
    if not changes:
        return "none"
    if not host.running:
        return "start"
    if renew:
        return "renew"
    if switch:
        return "handover"
    if "programs" in changes or "supervisord_conf" in changes:
        return "reconfigure"
    return "record"


def _env_changes(ctx, host, changes):
    """
    True when the serving supervisord runs with another env (or supervisord)
    than pillar's: the names of the variables that differ go to ``changes``,
    never their values.
    """
    conf_util = "saltfleet_supervisor_conf"
    boot = _utils(f"{conf_util}.boot_script")(ctx.cfg, ctx.tools, ctx.p, host.serving, ctx.uid, ctx.gid)
    if host.old_boot == boot and host.old_env == _utils(f"{conf_util}.env_script")(ctx.cfg):
        return False
    before = _utils(f"{conf_util}.boot_env")(host.old_env or "")
    after = {k: str(v) for k, v in ctx.cfg["env"].items()}
    names = sorted(k for k in {*before, *after} - {"PATH", "LANG"} if before.get(k) != after.get(k))
    changes["env"] = names or ["supervisord"]
    return True


def program_changes(ctx, host, want, gen, conf, switch, holds):
    """What happens to the serving programs: groups added, changed, removed, restarted (new release) or started."""
    p, manifest = ctx.p, ctx.manifest
    release, venv = _utils("saltfleet_paths.release"), _utils("saltfleet_paths.venv")
    # Groups that differ only by their release, venv or generation are the same program restarted.
    same = [
        (f"{text}{g}{end}", f"{text}{end}")
        for g in (host.serving, gen)
        for text, end in (("/", ".sock"), (".g", "@"), (".g", ".log"))
    ]
    if manifest.get("release"):
        same += [(str(release(p, manifest["release"])), "@release@")]
    if manifest.get("venv"):
        same += [(str(venv(p, manifest["venv"])), "@venv@")]
    same += [(str(release(p, want.sha)), "@release@"), (str(venv(p, want.digest)), "@venv@")]
    diff = _utils("saltfleet_supervisor_conf.diff_groups")(host.old_conf, conf, same)
    programs = {key: diff[key] for key in ("added", "changed", "removed") if diff[key]}
    held, was = set(holds), set(manifest.get("held") or {})
    if held != was and diff["changed"]:
        groups = set(diff["changed"])
        for key, names in (("held", held - was), ("released", was - held)):
            named = sorted(groups if "*" in names else groups & names)
            if named:
                programs[key] = named
                groups -= set(named)
        programs = {k: v for k, v in programs.items() if k != "changed"}
        if groups:
            programs["changed"] = sorted(groups)
    if switch and diff["kept"]:
        programs["restarted"] = diff["kept"]
    elif not switch:
        idle = [g for g in host.idle if g in diff["kept"]]
        if idle:
            programs["started"] = idle
    return programs


def retention(ctx, host, want, old_drains):
    """
    The history to record (newest last, each release with its venv) and the
    release and venv folders to delete: only names saltfleet made (commit
    SHAs in its history, venv digests), never through a symlink, and none
    that a draining generation still runs (``old_drains``: the serving one
    will, after this apply).
    """
    cfg, p, manifest = ctx.cfg, ctx.p, ctx.manifest
    history = manifest.get("history") or []
    entry = next((h for h in history if h["release"] == want.sha and h.get("venv") == want.digest), None)
    history = [h for h in history if h["release"] != want.sha]
    history.append(entry or {"release": want.sha, "venv": want.digest})
    keep = history[-cfg["keep_releases"] :]
    busy = [*keep, *host.draining.values(), *host.orphans.values()]
    if host.running and old_drains:
        busy.append(manifest)  # it drains after this apply
    spared = {h.get("release") for h in busy}
    used = {h.get("venv") for h in busy}
    prune = [
        p["releases"] / h["release"]
        for h in history
        if h["release"] not in spared and (p["releases"] / h["release"]).is_dir()
    ]
    # What a build left half done for lack of room goes once an apply has room (the one it asks is built anew).
    prune += [p["releases"] / sha for sha in host.unbuilt if sha != want.sha and sha not in spared]
    if p["venvs"].is_dir() and not p["venvs"].is_symlink():
        prune += sorted(v for v in p["venvs"].iterdir() if len(v.name) == 16 and v.name not in used and v.is_dir())
    # A release spared only while it drains stays in the history, so a later apply prunes it.
    history = [h for h in history if h in keep or h["release"] in spared]
    plain = _utils("saltfleet_user.plain_path")
    return history, [path for path in prune if plain(p["home"], path)]


# ---------------------------------------------------------------- describe


def _rev_note(ctx, sha):
    """What rev is, for a comment: the branch or tag, and where it resolved to the commit."""
    if ctx.fleet.get("sha") == sha:
        return f"{ctx.cfg['rev']}, which the master resolved to {sha[:12]} at {ctx.fleet.get('at')}"
    return ctx.cfg["rev"]


def describe(ctx, plan, dry, drain_pid=None):
    """The state's comment: what the deployment serves, or what was (or would be) changed."""
    changes, sha = plan.changes, plan.release
    notes = [ctx.pinned] if ctx.pinned else []
    notes += [f"{p} held: {h.get('reason') or 'no reason given'}" for p, h in sorted(plan.holds.items())]
    notes = "".join(f"; {n}" for n in notes).replace("* held", "all programs held")
    if not changes:
        return f"Deployment {ctx.name} is at {sha[:12]} ({_rev_note(ctx, sha)}) and running{notes}"
    verb = "would be" if dry else "was"
    # The same for a plural subject (programs, sysfiles, build steps, old releases).
    verbs = "would be" if dry else "were"
    parts = []
    if "release" in changes:
        parts.append(f"release {verb} switched to {sha[:12]} ({_rev_note(ctx, sha)})")
    if "rev" in changes:
        parts.append(f"rev {verb} recorded as {ctx.cfg['rev']}: it names {sha[:12]}, which serves already")
    if "build" in changes:
        parts.append(f"{len(changes['build'])} build step(s) {verbs} run: " + "; ".join(changes["build"]))
    if "virtualenv" in changes and plan.asked.build_venv:
        parts.append(f"virtualenv {verb} built")
    if "env" in changes:
        parts.append(f"supervisord {verb} started with the new env ({', '.join(changes['env'])})")
    if "supervisord" in changes:
        parts.append(f"supervisord {verb} started")
    if "programs" in changes:
        done = "; ".join(f"{k} {', '.join(v)}" for k, v in changes["programs"].items())
        parts.append(f"programs {verbs} updated: {done}")
    if "generations" in changes:
        pids = ", ".join(map(str, changes["generations"]["stopped"]))
        parts.append(f"supervisord {pids} left by an interrupted apply {verb} stopped")
    if drain_pid:
        parts.append(f"the previous programs finish their tasks in the background (pid {drain_pid})")
    if "sysfiles" in changes:
        parts.append(f"sysfiles {verbs} updated")
    if "permissions" in changes:
        parts.append(f"who may read its files {verb} updated")
    if "secrets" in changes:
        parts.append(f"{', '.join(changes['secrets'])} {verbs if len(changes['secrets']) > 1 else verb} written")
    if "pruned" in changes:
        parts.append(f"{len(changes['pruned'])} old release(s) and venv(s) {verbs} pruned")
    return f"Deployment {ctx.name}: " + "; ".join(parts or [f"configuration {verb} updated"]) + notes
