"""
Rolling changes across the fleet, for the ``fleet`` runner: batches, one
job per batch through Salt's LocalClient, and what each host's return means
(which minions host a deployment: ``saltfleet_hosts``).

A host's outcome is one of:

- ``deployed``: it answered and serves the new release (``release``: its SHA);
- ``failed``: it answered with an error (``reason``); ``release`` is what it
  still serves, as it said;
- ``no answer``: it did not return within the timeout (its minion is down or
  hung): never a success, and whether it switched is not known;
- ``not touched``: the rollout stopped before its batch; ``release`` is what
  the master last heard it serve;
- ``skipped``: it already served the commit the rollout goes to (``release``),
  as the master last heard: a rollout run again after its runner died
  resumes where it stopped;
- ``rolled back``: it was deployed, and a failed analysis (or ``fleet.abort``)
  sent it back to the release it served before (``release``); ``rollback
  failed`` when that did not work (``reason``).

A batch succeeds only when every host in it is ``deployed``; the rollout
stops at the first batch that does not.
"""

import dataclasses
import logging
import math
import shlex

import salt.client
import salt.loader
import salt.loader.context

log = logging.getLogger(__name__)

__virtualname__ = "saltfleet_rollout"

DEPLOYED, FAILED, NO_ANSWER, NOT_TOUCHED = "deployed", "failed", "no answer", "not touched"
ROLLED_BACK, ROLLBACK_FAILED, SKIPPED = "rolled back", "rollback failed", "skipped"
REASON_MAX = 2000
# The level of a progress step (``emit(text, level)``): how the fleet_progress outputter colors its line.
INFO, OK, FAIL, WARN = "info", "ok", "fail", "warn"


def __virtual__():
    return __virtualname__


def count(number, noun):
    """``1 host``, ``2 hosts``: a number and its noun, agreeing."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}es" if noun.endswith("ch") else f"{number} {noun}s"


# ------------------------------------------------------------------ planning


def batches(hosts, size):
    """
    ``hosts`` in batches of ``size``: a count (``1``, ``'2'``) or a share of
    the hosts (``'20%'``, rounded up: never a batch of none).
    """
    hosts = list(hosts)
    text = str(size).strip()
    try:
        if text.endswith("%"):
            share = float(text[:-1])
            if not 0 < share <= 100:
                raise ValueError
            count = max(1, math.ceil(len(hosts) * share / 100))
        else:
            count = int(text)
            if count < 1:
                raise ValueError
    except ValueError:
        raise ValueError(f"batch={size!r}: give a number of hosts (batch=2) or a share of them (batch=20%)") from None
    return [hosts[i : i + count] for i in range(0, len(hosts), count)]


def within_floor(plan, consumers, floors):
    """
    ``plan`` (batches of minion ids, the first as large as any) cut again so
    that no batch leaves a Celery queue with fewer consumers than its floor.
    As with a minimum of healthy hosts, a host counts as out of service for
    its batch. ``consumers``: {minion: {queue: workers consuming it}}, every
    consumer across the fleet that is up; ``floors``: {queue: fewest}.

    Returns (batches, held back: [{batch, queue, floor, consumers}] for each
    batch cut short). ValueError when a host alone would take a queue below
    its floor: no order of batches deploys it.
    """
    if not floors:
        return plan, []
    size = max(len(batch) for batch in plan)
    total = {queue: sum(mine.get(queue, 0) for mine in consumers.values()) for queue in floors}

    def short(batch):
        """The first floored queue ``batch`` takes below its floor, or None."""
        for queue, floor in sorted(floors.items()):
            out = sum(consumers.get(minion, {}).get(queue, 0) for minion in batch)
            if out and total[queue] - out < floor:
                return queue
        return None

    cut, held, batch = [], [], []
    for minion in (m for b in plan for m in b):
        alone = short([minion])
        if alone:
            raise ValueError(
                f"queue {alone} has {total[alone]} consumers up and a floor of {floors[alone]} (min_consumers): "
                f"{minion} consumes it with {consumers[minion][alone]}, and deploying it would leave "
                f"{total[alone] - consumers[minion][alone]}"
            )
        queue = short([*batch, minion]) if len(batch) < size else None
        if batch and (len(batch) == size or queue):
            if queue:
                held.append({"batch": len(cut) + 1, "queue": queue, "floor": floors[queue], "consumers": total[queue]})
            cut.append(batch)
            batch = []
        batch.append(minion)
    cut.append(batch)
    return cut, held


def _utils(name):
    # Salt's utils loader packs no __utils__ into utils modules: the loader in context holds them.
    loader = salt.loader.context.loader_ctxvar.get()
    return loader.pack.get("__utils__", loader)[name]


def commands(value, what):
    """
    Hook commands as argv lists: a string is one command (split like a
    shell's words, never run by one); a list holds several, each a string or
    an argv list.
    """
    if value in (None, "", []):
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"{what}: give a command (a string) or a list of them")
    argvs = []
    for item in items:
        argv = shlex.split(item) if isinstance(item, str) else [str(word) for word in item]
        if not argv:
            raise ValueError(f"{what}: an empty command")
        argvs.append(argv)
    return argvs


def hooks_in_pillar(pillar, name):
    """``deployments:<name>:hooks`` of a host's pillar: {pre: [argv...], post: [argv...]}."""
    spec = (((pillar or {}).get("deployments") or {}).get(name) or {}).get("hooks") or {}
    if not isinstance(spec, dict):
        raise ValueError(f"deployments:{name}:hooks: give a mapping with pre and/or post")
    return {when: commands(spec.get(when), f"deployments:{name}:hooks:{when}") for when in ("pre", "post")}


# ---------------------------------------------------------------- returns


def _publish(*args, **kwargs):
    return _utils("saltfleet_jobs.publish")(*args, **kwargs)


def reason(text):
    """A host's word as one reason: without Salt's `ERROR: ` and cut at REASON_MAX characters."""
    text = str(text).strip()
    if text.startswith("ERROR: "):
        text = text[len("ERROR: ") :]
    return text if len(text) <= REASON_MAX else text[: REASON_MAX - 3] + "..."


def outcome(data):
    """What a host's return of ``deployment.update_code``/``rollback`` means (``None``: no return)."""
    if data is None:
        return {"outcome": NO_ANSWER}
    ret, retcode = (data.get("ret"), data.get("retcode") or 0) if isinstance(data, dict) else (data, 1)
    if isinstance(ret, dict) and "result" in ret:
        try:
            release = _utils("saltfleet_minion_data.sha")(ret.get("release"), "release")
        except ValueError as exc:
            return {"outcome": FAILED, "reason": reason(f"bad data: {exc}")}
        if ret["result"] is True and not retcode:
            return {"outcome": DEPLOYED, "release": release}
        return {"outcome": FAILED, "reason": reason(ret.get("comment") or "failed"), "release": release}
    return {"outcome": FAILED, "reason": reason(ret)}


def dry_outcome(data):
    """What a host's return of ``state.single deployment.present ... test=True`` says it would do."""
    if data is None:
        return {"outcome": NO_ANSWER}
    ret = data.get("ret")
    state = next(iter(ret.values()), None) if isinstance(ret, dict) and ret else None
    if not isinstance(state, dict) or "result" not in state:
        return {"outcome": FAILED, "reason": reason("; ".join(map(str, ret)) if isinstance(ret, list) else ret)}
    if state["result"] is False:
        return {"outcome": FAILED, "reason": reason(state.get("comment"))}
    changes = state.get("changes")
    release = (changes.get("release") if isinstance(changes, dict) else None) or {}
    row = {"outcome": "would change" if state["result"] is None else "no change", "comment": state.get("comment")}
    if release:
        row["release"] = release
    return row


# ---------------------------------------------------------------- a rollout


def _batch(opts, name, number, total, batch, fun, arg, timeout, emit, journal, hosts):
    """Send batch ``number`` of ``total``; each host's outcome into ``hosts``. Why it stopped the rollout, or None."""
    emit(f"{name}: batch {number} of {total}: {', '.join(batch)}")

    def returned(minion, data):
        row = outcome(data)
        what = row.get("release") if row["outcome"] == DEPLOYED else row.get("reason")
        emit(f"{name}: {minion}: {row['outcome']}: {what}", OK if row["outcome"] == DEPLOYED else FAIL)
        journal({"event": "host", "batch": number, "minion": minion, **row})

    try:
        _, returns = _publish(
            opts,
            batch,
            fun,
            arg,
            timeout=timeout,
            on_jid=lambda jid: journal({"event": "batch", "batch": number, "jid": jid, "hosts": batch}),
            on_return=returned,
        )
    except Exception as exc:  # pylint: disable=broad-except
        # The master failed us mid-batch: what its hosts did is not known.
        for minion in batch:
            hosts[minion] = {"outcome": NO_ANSWER, "reason": str(exc)}
        return f"batch {number} of {total}: {exc}; the rollout stopped there"
    for minion in batch:
        hosts[minion] = outcome(returns.get(minion))
        if minion not in returns:
            emit(f"{name}: {minion}: no answer within {timeout} s", FAIL)
            journal({"event": "host", "batch": number, "minion": minion, **hosts[minion]})
    bad = [m for m in batch if hosts[m]["outcome"] != DEPLOYED]
    if bad:
        return f"batch {number} of {total} failed ({_words(bad, hosts)}); the rollout stopped there"
    return None


def _skip(name, number, batch, rev, serving, hosts, emit, journal):
    """
    The hosts of ``batch`` to send the job to: not those that already serve
    the commit the rollout goes to (``rev`` when it is a SHA, else what the
    hosts deployed so far in this rollout resolved it to), as the master last
    heard (a rollout resumed after its runner died, a host deployed by hand):
    each of those is ``skipped``.
    """
    deployed = {r["release"] for r in hosts.values() if r["outcome"] == DEPLOYED}
    target = {rev} if _utils("saltfleet_git.is_sha")(str(rev)) else deployed
    sending = []
    for minion in batch:
        if len(target) == 1 and serving.get(minion) in target:
            hosts[minion] = {"outcome": SKIPPED, "release": serving[minion]}
            emit(f"{name}: {minion}: already serves {serving[minion][:12]}: skipped", OK)
            journal({"event": "host", "batch": number, "minion": minion, **hosts[minion]})
        else:
            sending.append(minion)
    return sending


def revert(opts, name, hosts, serving, timeout, emit, journal):
    """
    Send every host this rollout changed (``deployed`` on another release
    than the one it served before, in ``serving``) back to that release,
    through ``deployment.rollback`` (the same handover: the old release
    takes the queues again, nothing in flight is killed); all at once, one
    job per release gone back to. Each host's row becomes ``rolled back`` or
    ``rollback failed``.
    """
    changed = {
        m: serving[m]
        for m, row in hosts.items()
        if row["outcome"] == DEPLOYED and serving.get(m) and serving[m] != row.get("release")
    }
    by_release = {}
    for minion, release in sorted(changed.items()):
        by_release.setdefault(release, []).append(minion)
    for release, minions in by_release.items():
        emit(f"{name}: rolling {', '.join(minions)} back to {release[:12]}", WARN)
        try:
            # Recorded as a batch of the rollout: the hosts' returns show under it in fleet.history.
            _, returns = _publish(
                opts,
                minions,
                "deployment.rollback",
                [name, release],
                timeout=timeout,
                on_jid=lambda jid, m=minions: journal({"event": "batch", "rollback": True, "jid": jid, "hosts": m}),
            )
        except Exception as exc:  # pylint: disable=broad-except
            returns = {m: {"ret": f"ERROR: {exc}"} for m in minions}
        for minion in minions:
            row = outcome(returns.get(minion))
            if row["outcome"] == DEPLOYED and row.get("release") == release:
                hosts[minion] = {"outcome": ROLLED_BACK, "release": release}
                emit(f"{name}: {minion}: rolled back: {release}", OK)
            else:
                why = (
                    "no answer"
                    if row["outcome"] == NO_ANSWER
                    else (row.get("reason") or f"serves {row.get('release')}")
                )
                hosts[minion] = {"outcome": ROLLBACK_FAILED, "reason": why, "release": row.get("release")}
                emit(f"{name}: {minion}: rollback failed: {why}", FAIL)
            journal({"event": "host", "rollback": True, "minion": minion, **hosts[minion]})
    return hosts


def rollout(opts, name, plan, serving, fun, arg, hooks, timeout, emit, journal, lock, watch=None, target=None):
    """
    Run ``fun`` with ``arg`` over ``plan``'s actions (``saltfleet_steps.actions``:
    batches of minion ids, analyses, pauses), stopping at the first batch
    with a host that is not ``deployed``; ``hooks`` {pre, post: [argv]} run
    through ``deployment.run`` on the first host, ``pre`` before any host
    changes, ``post`` after the last action. A failed (or aborted) analysis
    or pause sends the hosts changed back (``revert``). ``serving``:
    {minion: release} before the rollout; ``emit`` takes progress lines,
    ``journal`` ledger events; ``lock`` (held) is checked before each action
    and asked for an operator's verdict; ``watch`` (``saltfleet_steps.Watch``)
    runs the analyses; ``target``, the commit ``arg``'s rev is (when known),
    makes hosts already on it ``skipped`` (``_skip``). Returns (hosts
    {minion: outcome}, hook results, analyses, why it stopped or None).
    """
    batches = [a["batch"] for a in plan if "batch" in a]
    hosts = {m: {"outcome": NOT_TOUCHED, "release": serving.get(m)} for batch in batches for m in batch}
    ran, analyses = {}, []
    stopped = _hooks("pre", hooks.get("pre"), opts, name, batches[0][0], timeout, emit, ran)
    if stopped:
        return hosts, ran, analyses, f"{stopped}; no host was changed"
    number, said = 0, None
    # The place of the analysis whose listeners went out with the batch before it, until that step takes them.
    listening = None
    try:
        for place, action in enumerate(plan):
            try:
                lock.check()
            except Exception as exc:  # pylint: disable=broad-except
                return hosts, ran, analyses, str(exc)
            # A promote waits for the next analysis or pause (it skips that step); an abort acts now.
            said = lock.told() or said
            if said and said["verdict"] == "abort":
                journal({"event": "abort", "user": said["user"]})
                revert(opts, name, hosts, serving, timeout, emit, journal)
                return hosts, ran, analyses, f"aborted by {said['user']}; every host it changed was sent back"
            if "batch" in action:
                number += 1
                sending = _skip(name, number, action["batch"], target or arg[1], serving, hosts, emit, journal)
                ahead = plan[place + 1] if place + 1 < len(plan) else {}
                if sending and "analyse" in ahead:
                    listening = place + 1
                    _utils("saltfleet_steps.listen_ahead")(watch, listening, ahead["analyse"], timeout)
                stopped = sending and _batch(
                    opts, name, number, len(batches), sending, fun, arg, timeout, emit, journal, hosts
                )
                if stopped:
                    return hosts, ran, analyses, stopped
                continue
            # The step ends its listeners itself (the analysis when it ends, a promote when it skips it).
            listening = None
            why = _step(watch, action, place, hosts, analyses, said)
            said = None
            if why:
                revert(opts, name, hosts, serving, timeout, emit, journal)
                return hosts, ran, analyses, f"{why}; every host it changed was sent back"
    finally:
        if listening is not None:
            # The rollout ends before the step (a failed batch, an abort, a lost lock): so do the users' listeners.
            _utils("saltfleet_steps.stop_listening")(watch, listening)
    stopped = _hooks("post", hooks.get("post"), opts, name, batches[0][0], timeout, emit, ran)
    return hosts, ran, analyses, stopped


def _step(watch, action, place, hosts, analyses, promoted):
    """
    Run the analysis or pause at ``place`` (skipped when ``promoted``); why
    the rollout rolls back (None: it goes on).
    """
    kind = "analysis" if "analyse" in action else "pause"
    if promoted:
        if kind == "analysis":
            # Its listeners may have started with the batch before it.
            _utils("saltfleet_steps.stop_listening")(watch, place)
        watch.journal({"event": "promote", "user": promoted["user"], "skipped": kind})
        watch.emit(f"{watch.name}: {kind} skipped: promoted by {promoted['user']}", OK)
        return None
    if kind == "pause":
        told = _utils("saltfleet_steps.pause")(watch, "a pause step")
        return f"aborted by {told['user']}" if told["verdict"] == "abort" else None
    # The hosts on the new release: those this rollout deployed, and those it found on it already.
    on_new = {m: row["release"] for m, row in hosts.items() if row["outcome"] in (DEPLOYED, SKIPPED)}
    changed, new = set(on_new), {release for release in on_new.values() if release}
    record = _utils("saltfleet_steps.analyse")(watch, len(analyses) + 1, place, action["analyse"], new, changed)
    analyses.append(record)
    decision = record["decision"]
    if decision == "inconclusive":
        decision = {"pause": None, "pass": "passed", "fail": "failed"}[watch.settings["inconclusive"]]
        if decision is None:
            told = _utils("saltfleet_steps.pause")(watch, f"analysis {len(analyses)} is inconclusive: {record['why']}")
            decision = "aborted" if told["verdict"] == "abort" else "promoted"
    if decision in ("failed", "aborted"):
        return f"analysis {len(analyses)} {decision}: {record['why']}"
    return None


def roll(opts, lock, journal, start, plan, serving, fun, hooks, timeout, emit, watch=None):
    """
    ``rollout`` of ``start`` ({kind, user, deployment, rev}) under ``lock``
    (held), its start, batches, analyses and end in the ledger through
    ``journal``; the report. ``start``'s ``sha``, when the master resolved
    the rev, is the commit hosts already serving are skipped for.
    """
    name, rev = start["deployment"], start["rev"]
    if lock.replaced:
        emit(
            f"{name}: the lock's last holder, {lock.describe(lock.replaced)}, died before its end (see fleet.history)",
            WARN,
        )
    batches = [a["batch"] for a in plan if "batch" in a]
    steps = _utils("saltfleet_steps.describe")(plan) if len(plan) > len(batches) else None
    emit(
        f"{name}: {start['kind']} {rev} to {count(len(serving), 'host')} in "
        + (f"steps: {steps}" if steps else count(len(batches), "batch"))
    )
    journal({"event": "start", **start, "batches": batches, "serving": serving} | ({"steps": plan} if steps else {}))
    hosts, ran, analyses, stopped = rollout(
        opts, name, plan, serving, fun, [name, rev], hooks, timeout, emit, journal, lock, watch, start.get("sha")
    )
    out = report(name, rev, batches, hosts, stopped, ran, analyses)
    journal({"event": "end", "outcome": out["outcome"], "summary": out["summary"], "hosts": hosts})
    emit(f"{name}: {out['summary']}", FAIL if out["retcode"] else OK)
    return out


def _words(minions, hosts):
    return ", ".join(f"{m}: {hosts[m]['outcome']}" for m in minions)


def _hooks(when, argvs, opts, name, host, timeout, emit, ran):
    """Run the ``when`` hooks on ``host``; what stopped them (None: all succeeded)."""
    for argv in argvs or []:
        emit(f"{name}: {when} hook on {host}: {shlex.join(argv)}")
        try:
            # One argument: a word like KEY=value would otherwise reach it as a keyword.
            _, returns = _publish(opts, [host], "deployment.run", [name, shlex.join(argv)], timeout=timeout)
        except Exception as exc:  # pylint: disable=broad-except
            returns = {host: {"ret": f"ERROR: {exc}"}}
        data = returns.get(host)
        ret = data.get("ret") if data else None
        row = {"host": host, "command": shlex.join(argv)}
        if isinstance(ret, dict):
            row.update(retcode=ret.get("retcode"), stdout=ret.get("stdout", "")[-REASON_MAX:])
            row["stderr"] = ret.get("stderr", "")[-REASON_MAX:]
        else:
            row.update(retcode=None, error=reason(ret) if data else f"{host} did not answer within {timeout} s")
        ran.setdefault(when, []).append(row)
        if row["retcode"] != 0:
            why = row.get("error") or f"exit code {row['retcode']}"
            return f"the {when} hook `{row['command']}` failed on {host}: {why}"
    return None


def dry_run(opts, name, rev, plan, timeout, emit):
    """
    What each host would do for ``rev`` (``state.single deployment.present
    NAME rev=REV test=True``), and the rollout's batches and steps (``plan``'s actions).
    """
    batches = [action["batch"] for action in plan if "batch" in action]
    hosts = [minion for batch in batches for minion in batch]
    emit(f"{name}: asking {count(len(hosts), 'host')} what deploying {rev} would do (test=True: nothing changes)")
    _, returns = _publish(
        opts, hosts, "state.single", ["deployment.present", name], {"rev": rev, "test": True}, timeout
    )
    rows = {minion: dry_outcome(returns.get(minion)) for minion in hosts}
    bad = sorted(m for m, row in rows.items() if row["outcome"] in (FAILED, NO_ANSWER))
    changing = sum(r["outcome"] == "would change" for r in rows.values())
    summary = f"test: {changing} of {count(len(hosts), 'host')} would change"
    if bad:
        summary += "; the rollout would stop at " + ", ".join(f"{m} ({rows[m]['outcome']})" for m in bad)
    report = {"deployment": name, "rev": rev, "test": True, "batches": batches, "hosts": rows, "summary": summary}
    if len(plan) > len(batches):
        report["steps"] = _utils("saltfleet_steps.describe")(plan)
    return {**report, "retcode": 1 if bad else 0}


def rollback_target(opts, name, hosts, requested, timeout, emit):
    """The release ``fleet.rollback`` goes to (``choose_release``); ValueError if a host cannot say what it keeps."""
    emit(f"{name}: asking {count(len(hosts), 'host')} which releases they keep")
    _, returns = _publish(opts, hosts, "deployment.releases", [name], None, timeout)
    read = _utils("saltfleet_minion_data.releases")
    kept, unknown = {}, {}
    for minion in hosts:
        if minion not in returns:
            unknown[minion] = f"no answer within {timeout} s"
            continue
        ret = returns[minion].get("ret")
        if not isinstance(ret, list):
            unknown[minion] = reason(ret)
            continue
        try:
            kept[minion] = [dataclasses.asdict(row) for row in read(ret, "deployment.releases")]
        except ValueError as exc:  # saltfleet_minion_data.Bad: the loader hands out functions only
            unknown[minion] = f"bad data: {exc}"
    if unknown:
        why = "; ".join(f"{m}: {ret}" for m, ret in sorted(unknown.items()))
        raise ValueError(f"{name}: every host must say which releases it keeps, and {why}")
    return choose_release(name, kept, requested)


# ----------------------------------------------------------------- reports


def report(name, rev, plan, hosts, stopped, hooks=None, analyses=None):
    """
    The rollout's report: hosts by outcome, one line of summary, the analyses
    (``saltfleet_steps.analyse``'s records), and a retcode (0 only when complete).
    """
    by = {DEPLOYED: {}, FAILED: {}, NO_ANSWER: [], NOT_TOUCHED: {}, ROLLED_BACK: {}, SKIPPED: {}}
    for minion, row in sorted(hosts.items()):
        if row["outcome"] in (DEPLOYED, ROLLED_BACK, SKIPPED):
            by[row["outcome"]][minion] = row.get("release")
        elif row["outcome"] in (FAILED, ROLLBACK_FAILED):
            by[FAILED][minion] = {"reason": row.get("reason"), "still serves": row.get("release")}
        elif row["outcome"] == NO_ANSWER:
            by[NO_ANSWER].append(minion)
        else:
            by[NOT_TOUCHED][minion] = row.get("release")
    total = len(hosts)
    done = len(by[DEPLOYED]) + len(by[SKIPPED])
    if stopped:
        summary = f"stopped: {stopped}; {done} of {count(total, 'host')} on {rev}"
    else:
        summary = f"complete: {count(total, 'host')} in {count(len(plan), 'batch')} on {rev}"
    if by[ROLLED_BACK]:
        summary += f"; {count(len(by[ROLLED_BACK]), 'host')} rolled back"
    if by[SKIPPED]:
        summary += f"; {count(len(by[SKIPPED]), 'host')} already on it, skipped"
    shas = sorted({sha for sha in by[DEPLOYED].values() if sha})
    if len(shas) > 1:
        summary += f"; {rev} resolved to {len(shas)} commits ({', '.join(s[:12] for s in shas)}): it moved meanwhile"
    out = {
        "deployment": name,
        "rev": rev,
        "outcome": ("rolled back" if by[ROLLED_BACK] else "stopped") if stopped else "complete",
        "summary": summary,
        "batches": plan,
        "deployed": by[DEPLOYED],
        "failed": by[FAILED],
        "no answer": by[NO_ANSWER],
        "not touched": by[NOT_TOUCHED],
        "retcode": 1 if stopped else 0,
    }
    for kind in (ROLLED_BACK, SKIPPED):
        if by[kind]:
            out[kind] = by[kind]
    if analyses:
        out["analysis"] = analyses
    if hooks:
        out["hooks"] = hooks
    return out


def choose_release(name, releases, requested=None):
    """
    The release a fleet rollback goes to, from ``deployment.releases`` of
    every host ({minion: rows}): ``requested`` (a SHA or prefix) if every
    host keeps it complete, else the newest release complete on all of them
    other than the newest one serving (the one being rolled back).
    """
    complete = {m: {r["release"]: r for r in rows if r.get("complete")} for m, rows in releases.items()}
    common = set.intersection(*(set(c) for c in complete.values())) if complete else set()

    def deployed(sha):
        return max(complete[m][sha].get("deployed") or "" for m in complete if sha in complete[m])

    if requested is not None:
        matches = sorted(s for s in common if s.startswith(str(requested)))
        if len(matches) != 1:
            raise ValueError(
                f"{name}: {requested!r} names {len(matches)} of the releases complete on every host "
                f"({', '.join(s[:12] for s in sorted(common, key=deployed)) or 'none'})"
            )
        return matches[0]
    serving = {}
    for minion, rows in releases.items():
        for row in rows:
            if row.get("serving"):
                serving[minion] = (row.get("deployed") or "", row["release"])
    newest = max(serving.values())[1] if serving else None
    candidates = sorted((s for s in common if s != newest), key=deployed)
    if not candidates:
        raise ValueError(
            f"{name}: no release other than the serving {(newest or '?')[:12]} is kept complete on every host; "
            "name one with release=SHA, or deploy a rev with fleet.deploy"
        )
    return candidates[-1]
