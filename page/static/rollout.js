// A rollout as the page follows it: the deploy ledger's lines of one rollout
// (fleet.overview's "rollouts" at load, then the same lines live from the
// master's event bus as saltfleet/rollout/<id>/<event>), folded in order.
//
// Lines (README, "Canary rollouts", says what each field means):
//   start    {kind, user, deployment, rev, batches: [[minion]], serving: {minion: release}, steps?}
//   batch    {batch, jid, hosts: [minion]}; {rollback: true, jid, hosts} when changed hosts go back
//   host     {batch, minion, outcome, release | reason}; {rollback: true, minion, outcome, ...} likewise
//   analysis {step, seconds, elapsed, releases: {new, old}, decision, why, limit, early?, thresholds,
//             notes, series: [{at, elapsed, new: {failure_rate, p95}, old}], new: {figures}, old: {figures}}:
//            every window of a step on the bus (decision "running"), and its end in the ledger too
//   pause    {why}: the rollout waits for fleet.promote or fleet.abort
//   promote  {user, skipped?}; abort {user}
//   end      {outcome, summary, hosts: {minion: {outcome, release | reason}}}
// Lines of other kinds are listed as they come.
import { pair, percent, seconds, series } from "./charts.js";
import { h, short, text, when } from "./dom.js";

export function newRollout(id) {
  return {
    id,
    kind: null,
    deployment: null,
    rev: null,
    user: null,
    started: null,
    batches: [],
    hosts: {},
    // The latest line of each analysis step, in step order of arrival.
    analysis: [],
    paused: null,
    end: null,
    lines: [],
    seen: new Set(),
    note: null,
    // What the user opened in the view (the per-task table), kept across redraws.
    shown: {},
  };
}

// A line's identity: the ledger's copy and the bus's copy of one line share it.
function key(line) {
  return [line.event, line.batch, line.minion, line.step, line.at, line.jid, line.elapsed]
    .map((v) => (v === undefined || v === null ? "" : v))
    .join("|");
}

function sameStep(line) {
  return (other) => other.event === "analysis" && line.step !== undefined && other.step === line.step;
}

// An analysis line replaces the one before it of the same step (each window's figures include the last's),
// unless it is older than that one.
function foldAnalysis(rollout, line) {
  const before = rollout.analysis.findIndex(sameStep(line));
  if (before < 0) {
    rollout.analysis.push(line);
    rollout.lines.push(line);
    return;
  }
  const previous = rollout.analysis[before];
  if (typeof line.elapsed === "number" && typeof previous.elapsed === "number" && line.elapsed < previous.elapsed) {
    return;
  }
  rollout.analysis[before] = line;
  rollout.lines = rollout.lines.filter((other) => other !== previous);
  rollout.lines.push(line);
}

function foldBatch(rollout, line) {
  const hosts = rollout.hosts;
  for (const minion of Array.isArray(line.hosts) ? line.hosts : []) {
    if (line.rollback) {
      hosts[minion] = { ...hosts[minion], outcome: "rolling back" };
    } else if (!hosts[minion] || ["waiting", undefined].includes(hosts[minion].outcome)) {
      hosts[minion] = { ...hosts[minion], batch: line.batch, outcome: "deploying" };
    }
  }
}

// Fold one ledger line into the rollout; false when it was folded already.
export function fold(rollout, line) {
  if (!line || typeof line !== "object" || typeof line.event !== "string") return false;
  const k = key(line);
  if (rollout.seen.has(k)) return false;
  rollout.seen.add(k);
  if (line.event === "analysis") {
    foldAnalysis(rollout, line);
    return true;
  }
  rollout.lines.push(line);
  const hosts = rollout.hosts;
  switch (line.event) {
    case "start":
      Object.assign(rollout, {
        kind: line.kind,
        deployment: line.deployment,
        rev: line.rev,
        user: line.user,
        started: line.at,
        batches: Array.isArray(line.batches) ? line.batches : [],
      });
      rollout.batches.forEach((batch, i) => {
        for (const minion of Array.isArray(batch) ? batch : []) {
          hosts[minion] = hosts[minion] || { batch: i + 1, outcome: "waiting", release: line.serving?.[minion] };
        }
      });
      break;
    case "batch":
      rollout.paused = null;
      foldBatch(rollout, line);
      break;
    case "host":
      hosts[line.minion] = {
        batch: line.batch ?? hosts[line.minion]?.batch,
        outcome: line.outcome,
        release: line.release,
        reason: line.reason,
      };
      break;
    case "pause":
      rollout.paused = line;
      break;
    case "promote":
    case "abort":
      rollout.paused = null;
      break;
    case "end":
      rollout.end = line;
      rollout.paused = null;
      for (const [minion, row] of Object.entries(line.hosts || {})) {
        hosts[minion] = { batch: hosts[minion]?.batch, ...row };
      }
      break;
    default:
      break;
  }
  return true;
}

function progress(line) {
  const elapsed = typeof line.elapsed === "number" ? `${Math.round(line.elapsed)}` : "?";
  return `${elapsed} of ${text(line.seconds)} s`;
}

function state(rollout) {
  if (rollout.end) return text(rollout.end.summary || rollout.end.outcome);
  if (rollout.paused) return `paused: ${text(rollout.paused.why)}`;
  const last = rollout.lines[rollout.lines.length - 1];
  if (last?.event === "analysis" && last.decision === "running") {
    return `running: analysis ${text(last.step)}, ${progress(last)}`;
  }
  if (rollout.lines.some((l) => l.event === "batch" && l.rollback)) return "rolling back";
  const sent = rollout.lines.filter((l) => l.event === "batch" && !l.rollback).length;
  return `running: batch ${sent} of ${rollout.batches.length}`;
}

function hostList(hosts) {
  return (Array.isArray(hosts) ? hosts : []).map(text).join(", ");
}

function lineText(line) {
  switch (line.event) {
    case "start":
      return `${text(line.kind)} ${text(line.rev)} by ${text(line.user)}: ${(line.batches || []).length} batches`;
    case "batch":
      return line.rollback ? `rolling back: ${hostList(line.hosts)}` : `batch ${text(line.batch)}: ${hostList(line.hosts)}`;
    case "host":
      return `${text(line.minion)}: ${text(line.outcome)}${line.release ? ` ${short(line.release)}` : ""}${
        line.reason ? `: ${text(line.reason)}` : ""
      }`;
    case "analysis":
      return line.decision === "running"
        ? `analysis ${text(line.step)}: running, ${progress(line)}`
        : `analysis ${text(line.step)}: ${text(line.decision)}${line.why ? `: ${text(line.why)}` : ""}`;
    case "pause":
      return `paused: ${text(line.why)}`;
    case "promote":
      return `promoted by ${text(line.user)}${line.skipped ? ` (${text(line.skipped)} skipped)` : ""}`;
    case "abort":
      return `aborted by ${text(line.user)}`;
    case "end":
      return text(line.summary || line.outcome);
    default:
      return text(line.event);
  }
}

// ------------------------------------------------------------ the analysis

const number = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);
const count = (v) => text(number(v));
const rate = (v) => (number(v) === null ? text(v) : percent(v));
const time = (v) => (number(v) === null ? text(v) : seconds(v));

function side(value) {
  return value && typeof value === "object" && !Array.isArray(value) ? value : {};
}

// Tasks finished: succeeded + failed (a retry that ends in success is no failure).
function finished(figures) {
  const [ok, failed] = [number(figures.succeeded), number(figures.failed)];
  return ok === null || failed === null ? null : ok + failed;
}

const ROWS = [
  ["tasks", finished, count],
  ["failed", (f) => f.failed, count],
  ["retried", (f) => f.retried, count],
  ["failure rate", (f) => f.failure_rate, rate],
  ["run time p50", (f) => f.p50, time],
  ["run time p95", (f) => f.p95, time],
];

function shas(releases, which) {
  const list = Array.isArray(releases?.[which]) ? releases[which] : [];
  return list.length ? list.map(short).join(", ") : "-";
}

function numbers(old, young, releases) {
  return h(
    "table",
    { class: "analysis-numbers" },
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        h("th", {}, ""),
        h("th", { "data-side": "old" }, `old ${shas(releases, "old")}`),
        h("th", { "data-side": "new" }, `new ${shas(releases, "new")}`),
      ),
    ),
    h(
      "tbody",
      {},
      ROWS.map(([label, read, fmt]) =>
        h("tr", {}, h("th", {}, label), h("td", {}, fmt(read(old))), h("td", {}, fmt(read(young)))),
      ),
    ),
  );
}

// Per task name, each side's tasks, failure rate and p95: which task a failing release fails. Open or
// closed as the user left it (``shown.tasks``): the view is drawn anew at every window.
function perTask(old, young, shown) {
  const [olds, news] = [side(old.tasks), side(young.tasks)];
  const names = [...new Set([...Object.keys(news), ...Object.keys(olds)])].sort();
  if (!names.length) return null;
  const cells = (figures) => [
    h("td", {}, count(finished(figures))),
    h("td", {}, rate(figures.failure_rate)),
    h("td", {}, time(figures.p95)),
  ];
  return h(
    "details",
    { class: "analysis-tasks", open: Boolean(shown.tasks), ontoggle: (event) => (shown.tasks = event.target.open) },
    h("summary", {}, `per task (${names.length})`),
    h(
      "table",
      {},
      h(
        "thead",
        {},
        h("tr", {}, ["Task", "old tasks", "old failure rate", "old p95", "new tasks", "new failure rate", "new p95"].map((c) => h("th", {}, c))),
      ),
      h(
        "tbody",
        {},
        names.map((name) => h("tr", { "data-task": name }, h("th", {}, name), cells(side(olds[name])), cells(side(news[name])))),
      ),
    ),
  );
}

function thresholdsText(line) {
  const t = side(line.thresholds);
  const parts = [];
  if (number(line.limit) !== null) parts.push(`failure rate limit ${percent(line.limit)}`);
  if (number(t.runtime_ratio) !== null) parts.push(`p95 at most ${t.runtime_ratio} × the old release's`);
  if (number(t.min_tasks) !== null) parts.push(`min_tasks ${t.min_tasks}`);
  if (number(t.confidence) !== null) parts.push(`confidence ${percent(t.confidence)}`);
  if (number(t.window) !== null) parts.push(`window ${t.window} s`);
  if (t.inconclusive !== undefined) parts.push(`inconclusive: ${text(t.inconclusive)}`);
  return parts.join("; ");
}

// The canary analysis of a step: old vs new failure rate and run time as small charts, the numbers beside them.
export function analysisView(line, shown = {}) {
  const old = side(line.old);
  const young = side(line.new);
  const ratio = number(side(line.thresholds).runtime_ratio);
  const slowest = number(old.p95) !== null && ratio !== null ? old.p95 * ratio : null;
  const points = Array.isArray(line.series) ? line.series : [];
  const notes = Array.isArray(line.notes) ? line.notes : [];
  const decision = String(line.decision ?? "").replace(/[^a-z]/g, "");
  return h(
    "section",
    { class: ["analysis", `decision-${decision}`], "data-step": text(line.step) },
    h(
      "h4",
      {},
      `Canary analysis ${text(line.step)}: `,
      h("span", { class: "decision" }, text(line.decision)),
      h("span", { class: "muted" }, ` ${progress(line)}${line.early ? ", decided early" : ""}`),
    ),
    line.why ? h("p", { class: "analysis-why" }, text(line.why)) : null,
    h(
      "div",
      { class: "charts" },
      pair("failure rate", old.failure_rate, young.failure_rate, percent, line.limit),
      pair("run time p50", old.p50, young.p50, seconds),
      pair("run time p95", old.p95, young.p95, seconds, slowest),
      series("failure rate per window", points, "failure_rate", percent),
      series("p95 per window", points, "p95", seconds),
    ),
    numbers(old, young, line.releases),
    perTask(old, young, shown),
    h("p", { class: "analysis-thresholds muted" }, thresholdsText(line)),
    notes.length ? h("ul", { class: "analysis-notes" }, notes.map((note) => h("li", {}, text(note)))) : null,
  );
}

// ---------------------------------------------------------------- the view

function hostCell(row) {
  if (row.reason) return text(row.reason);
  return ["waiting", "deploying", "not touched", "rolling back"].includes(row.outcome)
    ? `serves ${short(row.release)}`
    : short(row.release);
}

// One rollout: its state, analysis, the buttons its pause allows, each batch and host, and its lines as they came.
export function rolloutView(rollout, buttons) {
  const hosts = Object.entries(rollout.hosts).sort(
    ([a, x], [b, y]) => (x.batch || 0) - (y.batch || 0) || a.localeCompare(b),
  );
  const latest = rollout.analysis[rollout.analysis.length - 1];
  return h(
    "article",
    { class: ["rollout", rollout.end ? "ended" : "running"], "data-rollout": rollout.id },
    h(
      "h3",
      {},
      `${text(rollout.kind)} ${text(rollout.deployment)} ${text(rollout.rev)}`,
      h("span", { class: "muted" }, ` by ${text(rollout.user)}, ${when(rollout.started)}`),
    ),
    h(
      "p",
      { class: "rollout-state", "data-state": rollout.end ? rollout.end.outcome : rollout.paused ? "paused" : "running" },
      state(rollout),
    ),
    rollout.note ? h("p", { class: "error rollout-note" }, rollout.note) : null,
    buttons,
    latest ? analysisView(latest, rollout.shown) : null,
    h(
      "table",
      { class: "batches" },
      h("thead", {}, h("tr", {}, ["Batch", "Host", "Outcome", "Release or reason"].map((c) => h("th", {}, c)))),
      h(
        "tbody",
        {},
        hosts.map(([minion, row]) =>
          h(
            "tr",
            { class: `outcome-${String(row.outcome || "").replace(/[^a-z]/g, "")}`, "data-host": minion },
            h("td", {}, text(row.batch)),
            h("td", {}, minion),
            h("td", { class: "outcome" }, text(row.outcome)),
            h("td", {}, hostCell(row)),
          ),
        ),
      ),
    ),
    h(
      "ol",
      { class: "rollout-log" },
      rollout.lines.map((line) =>
        h(
          "li",
          // data-stamp: when the master fired the line (live lines only), for the tests and the bench.
          { "data-key": `${rollout.id}|${key(line)}`, "data-event": line.event, "data-stamp": line._stamp },
          h("time", {}, when(line.at)),
          " ",
          lineText(line),
        ),
      ),
    ),
  );
}
