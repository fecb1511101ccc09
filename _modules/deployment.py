"""
Look at and drive the saltfleet deployments on a host: what the old Fabric
tasks did, through Salt.

.. code-block:: bash

    salt 'worker-*' deployment.status
    salt 'worker-7' deployment.restart daily-fetcher
    salt '*' deployment.validate
"""

import logging
import os
import shutil

import salt.utils.templates

log = logging.getLogger(__name__)

__virtualname__ = "deployment"
__func_alias__ = {"list_": "list"}


def __virtual__():
    if "saltfleet.validate" not in __utils__:
        return False, "saltfleet's _utils are not synced: run saltutil.sync_all"
    return __virtualname__


def _u(name):
    return __utils__[f"saltfleet.{name}"]


def _default_root():
    return __opts__.get("root_dir") or "/"


def settings():
    """
    The host-level settings (pillar ``saltfleet``) with defaults filled in.

    .. code-block:: bash

        salt '*' deployment.settings
    """
    host, errors = _u("validate_host")(__pillar__.get("saltfleet"), _default_root())
    if errors:
        raise _u("error")("\n".join(errors))
    return host


def _root():
    return _u("host_root")(__pillar__, __opts__)


def validate():
    """
    Check this host's pillar against saltfleet's schema; return the errors
    (an empty list when all is well).

    .. code-block:: bash

        salt '*' deployment.validate
    """
    _, _, errors = _u("validate")(dict(__pillar__), _default_root())
    return errors


def config(name, **overrides):
    """
    Return (host settings, deployment config) for deployment ``name`` from
    pillar, keyword overrides on top, validated; raise with every error found.
    """
    host, errors = _u("validate_host")(__pillar__.get("saltfleet"), _default_root())
    deployments = __pillar__.get("deployments") or {}
    spec = deployments.get(name) if isinstance(deployments, dict) else None
    if spec is None and not overrides:
        errors.append(f"deployments:{name}: not in this minion's pillar; assign it in pillar/top.sls")
        raise _u("error")("\n".join(errors))
    spec = dict(spec or {}, **overrides)
    cfg, dep_errors = _u("validate_deployment")(name, spec, host)
    errors.extend(dep_errors)
    if errors:
        raise _u("error")("\n".join(errors))
    return host, cfg


def list_():
    """
    The deployments installed on this host (those saltfleet recorded).

    .. code-block:: bash

        salt '*' deployment.list
    """
    return sorted(_u("installed")(_root()))


def status(name=None):
    """
    Release, supervisord and program states of the installed deployments
    (or of ``name``), asked of each deployment's own supervisord.

    .. code-block:: bash

        salt '*' deployment.status
        salt 'worker-7' deployment.status daily-fetcher
    """
    root = _root()
    manifests = _u("installed")(root)
    if name is not None:
        manifests = {name: manifests[name]} if name in manifests else {}
    return {n: _u("status")(root, n, m) for n, m in manifests.items()}


def _socket(name):
    root = _root()
    manifest = _u("installed")(root).get(name)
    if not manifest:
        raise _u("error")(f"deployment {name} is not installed on this host; deployment.list shows those that are")
    return _u("paths")(root, manifest["user"], name)["socket"]


def restart(name, program=None):
    """
    Restart a deployment's programs (or one program group) gracefully: SIGTERM,
    then up to ``stopwaitsecs`` for tasks in hand to finish.

    .. code-block:: bash

        salt 'worker-7' deployment.restart daily-fetcher
    """
    sock = _socket(name)
    groups = [program] if program else sorted({i["group"] for i in _u("process_info")(sock)})
    failed = _u("restart_groups")(sock, groups)
    return {"restarted": [g for g in groups if g not in failed], "failed": failed}


def stop(name):
    """Stop a deployment's supervisord and its programs (gracefully)."""
    root = _root()
    manifest = _u("installed")(root).get(name) or {}
    p = _u("paths")(root, manifest.get("user", "root"), name)
    return _u("stop_generations")(p)


def sources(name, cfg):
    """
    What the master ships for deployment ``name``: its rendered supervisord.conf
    and its sysfiles ({path under root: bytes}).
    """
    prefix = f"deployments/{name}/"
    files = __salt__["cp.list_master"](prefix=prefix)
    context = template_context(cfg)
    sections = {}
    template = cfg.get("supervisord_conf")
    if not template:
        for candidate in ("files/supervisord.conf.jinja", "files/supervisord.conf"):
            if prefix + candidate in files:
                template = f"salt://{prefix}{candidate}"
                break
    if template:
        text = _fetch(template, name, "supervisord_conf")
        if template.endswith(".jinja"):
            text = _render(text, context, name, template)
        sections.update(_u("program_sections")(text, name, template))
    for section, opts in _u("pillar_programs")(cfg).items():
        if section in sections:
            raise _u("error")(
                f"deployments:{name}:programs:{section.split(':', 1)[1]}: also defined in {template}; keep one"
            )
        sections[section] = opts
    if not sections:
        raise _u("error")(
            f"deployments:{name}:programs: the deployment runs nothing: set pillar programs or ship "
            f"deployments/{name}/files/supervisord.conf(.jinja)"
        )
    return {
        "sections": sections,
        "conf": _u("render_supervisord_conf")(cfg, sections),
        "sysfiles": sysfiles_sources(name, context, files),
    }


def sysfiles_sources(name, context=None, files=None):
    """
    The files of ``deployments/<name>/sysfiles/`` as {path under root: bytes};
    ``*.jinja`` files are rendered (suffix dropped) with the deployment's context.
    """
    prefix = f"deployments/{name}/sysfiles/"
    if files is None:
        files = __salt__["cp.list_master"](prefix=prefix)
    found = {}
    for path in sorted(f for f in files if f.startswith(prefix)):
        rel = path[len(prefix) :]
        text = _fetch(f"salt://{path}", name, "sysfiles")
        if rel.endswith(".jinja"):
            rel = rel[: -len(".jinja")]
            text = _render(text, context or {"name": name}, name, path)
        found[rel] = text.encode()
    return found


def template_context(cfg):
    """What a deployment's templates see: its paths, env, and pillar `context` keys."""
    p = _u("paths")(cfg["root"], cfg["user"], cfg["name"])
    context = dict(cfg.get("context") or {})
    context.update(
        name=cfg["name"],
        user=cfg["user"],
        home=str(p["home"]),
        project_dir=str(p["project"]),
        venv=str(p["project"] / "venv"),
        log_dir=str(p["logs"]),
        env=dict(cfg.get("env") or {}),
        context=dict(cfg.get("context") or {}),
    )
    return context


def _fetch(url, name, key):
    text = __salt__["cp.get_file_str"](url)
    if text is False or text is None:
        raise _u("error")(f"deployments:{name}:{key}: {url} not found on the master's file server")
    return text


def _render(text, context, name, source):
    out = salt.utils.templates.TEMPLATE_REGISTRY["jinja"](
        text,
        from_str=True,
        to_str=True,
        context=context,
        saltenv=__opts__.get("saltenv") or "base",
        grains=__grains__,
        pillar=__pillar__,
        salt=__salt__,
        opts=__opts__,
    )
    if not out.get("result"):
        raise _u("error")(f"deployments:{name}: rendering {source} failed: {out.get('data')}")
    data = out["data"]
    return data.decode() if isinstance(data, bytes) else data


def remove(name, purge=False, test=False):
    """
    Stop deployment ``name`` and remove its sysfiles, secrets and record; with
    ``purge`` its releases, virtualenvs and logs too. Returns the changes.
    """
    root = settings()["root"]
    manifest = _u("installed")(root).get(name)
    if not manifest:
        return {}
    p = _u("paths")(root, manifest["user"], name)
    changes = {}
    if _u("generations")(p):
        changes["supervisord"] = {"old": "running", "new": "stopped"}
    sysfiles = _u("diff_sysfiles")(name, {}, root)
    if sysfiles:
        changes["sysfiles"] = sysfiles
    removed = [str(p["state"])]
    if purge:
        removed += [str(p[k]) for k in ("project", "releases", "venvs", "logs")]
    changes["removed"] = [r for r in removed if os.path.lexists(r)]
    if test:
        return changes
    _u("stop_generations")(p)
    _u("apply_sysfiles")(name, {}, root)
    for path in changes["removed"]:
        if os.path.islink(path):
            os.unlink(path)
        else:
            shutil.rmtree(path, ignore_errors=True)
    p["manifest"].unlink(missing_ok=True)
    return changes
