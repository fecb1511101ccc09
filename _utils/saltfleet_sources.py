"""
What the master's file server gives a deployment: the program sections of a
release (its template, rendered with that release's own paths so that a new
generation runs the new code, and pillar ``programs``) and its sysfiles
(rendered with the ``Projects-<name>`` link's paths). The state hands in the
file server (:class:`Master`): this file decides what is read and how it
fits together, and says clearly what is missing.
"""

from collections.abc import Callable
from dataclasses import dataclass

import salt.loader.context
from salt.exceptions import CommandExecutionError

__virtualname__ = "saltfleet_sources"

TEMPLATES = ("files/supervisord.conf.jinja", "files/supervisord.conf")


def __virtual__():
    return __virtualname__


def _utils(name):
    # Salt's utils loader packs no __utils__ into utils modules: the loader in context.
    loader = salt.loader.context.loader_ctxvar.get()
    return loader.pack.get("__utils__", loader)[name]


@dataclass(frozen=True)
class Master:
    """The master's file server: ``listing(prefix)``, ``get_file_str(url)``, ``render(text, context)`` (Jinja)."""

    listing: Callable
    get_file_str: Callable
    render: Callable
    cache_time: int = 20  # how old the master's file list may be (fileserver_list_cache_time)


def master(listing, get_file_str, render, cache_time=20):
    """A :class:`Master` (Salt's loader hands out functions, not classes)."""
    return Master(listing, get_file_str, render, cache_time)


def template_context(cfg, p, project, venv):
    """What a deployment's templates see: its paths, env, and pillar ``context`` keys."""
    context = dict(cfg.get("context") or {})
    context.update(
        name=cfg["name"],
        user=cfg["user"],
        home=str(p["home"]),
        project_dir=str(project),
        venv=str(venv),
        log_dir=str(p["logs"]),
        env=dict(cfg.get("env") or {}),
        context=dict(cfg.get("context") or {}),
    )
    return context


def _fetch(master, url, name, key):
    text = master.get_file_str(url)
    if text is False or text is None:
        raise CommandExecutionError(f"deployments:{name}:{key}: {url} not found on the master's file server")
    return text


def _render(master, text, context, name, source):
    try:
        return master.render(text, context)
    except CommandExecutionError as exc:
        raise CommandExecutionError(f"deployments:{name}: rendering {source} failed: {exc}") from None


def deployment(master, cfg, p, sha, digest):
    """(program sections, sysfiles) of deployment ``cfg`` at commit ``sha`` with virtualenv ``digest``."""
    name = cfg["name"]
    prefix = f"deployments/{name}/"
    release = _utils("saltfleet_paths.release")(p, sha)
    venv = _utils("saltfleet_paths.venv")(p, digest)
    sections = {}
    template = cfg.get("supervisord_conf")
    if not template:
        listed = master.listing(prefix)
        template = next((f"salt://{prefix}{c}" for c in TEMPLATES if prefix + c in listed), None)
    if template:
        text = _fetch(master, template, name, "supervisord_conf")
        if template.endswith(".jinja"):
            text = _render(master, text, template_context(cfg, p, release, venv), name, template)
        sections.update(_utils("saltfleet_supervisor_conf.template_sections")(text, name, template))
    for section, opts in _utils("saltfleet_supervisor_conf.pillar_sections")(cfg).items():
        if section in sections:
            raise CommandExecutionError(
                f"deployments:{name}:programs:{section.split(':', 1)[1]}: also defined in {template}; keep one"
            )
        sections[section] = opts
    if not sections:
        raise CommandExecutionError(
            f"deployments:{name}:programs: the deployment runs nothing: set pillar programs or ship "
            f"deployments/{name}/files/supervisord.conf(.jinja). If you added that file a moment ago: "
            "the master lists its files from a cache up to fileserver_list_cache_time seconds old "
            "(20 by default); `salt-run fileserver.clear_file_list_cache` refreshes it, then apply again"
        )
    files = sysfiles(master, name, template_context(cfg, p, p["project"], p["project"] / "venv"))
    return sections, files


def sysfiles(master, name, context):
    """The files of ``deployments/<name>/sysfiles/`` as {path under root: bytes}; ``*.jinja`` rendered."""
    prefix = f"deployments/{name}/sysfiles/"
    found = {}
    for path in sorted(master.listing(prefix)):
        rel = path[len(prefix) :]
        text = _fetch(master, f"salt://{path}", name, "sysfiles")
        if rel.endswith(".jinja"):
            rel = rel.removesuffix(".jinja")
            text = _render(master, text, context, name, path)
        found[rel] = text.encode()
    return found
