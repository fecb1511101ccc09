// A rollout as the page follows it: the deploy ledger's lines of one rollout
// (fleet.overview's "rollouts" at load, then the same lines live from the
// master's event bus as saltfleet/rollout/<id>/<event>), folded in order.
//
// Lines (README, "The fleet page", has the full shapes):
//   start    {kind, user, deployment, rev, batches: [[minion]], serving: {minion: release}}
//   batch    {batch, jid, hosts: [minion]}
//   host     {batch, minion, outcome, release | reason}
//   analysis {step, decision, reason, window, old: {...}, new: {...}, thresholds: {...}, series: [...]}
//   paused   {reason}: the rollout waits for fleet.promote or fleet.abort
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
    analysis: [],
    paused: null,
    end: null,
    lines: [],
    seen: new Set(),
    note: null,
  };
}

function key(line) {
  return [line.event, line.batch, line.minion, line.step, line.at].map((v) => (v === undefined ? "" : v)).join("|");
}

// Fold one ledger line into the rollout; false when it was folded already.
export function fold(rollout, line) {
  if (!line || typeof line !== "object" || typeof line.event !== "string") return false;
  const k = key(line);
  if (rollout.seen.has(k)) return false;
  rollout.seen.add(k);
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
        for (const minion of batch) {
          hosts[minion] = hosts[minion] || { batch: i + 1, outcome: "waiting", release: line.serving?.[minion] };
        }
      });
      break;
    case "batch":
      rollout.paused = null;
      for (const minion of line.hosts || []) {
        if (!hosts[minion] || ["waiting", undefined].includes(hosts[minion].outcome)) {
          hosts[minion] = { ...hosts[minion], batch: line.batch, outcome: "deploying" };
        }
      }
      break;
    case "host":
      hosts[line.minion] = { batch: line.batch, outcome: line.outcome, release: line.release, reason: line.reason };
      break;
    case "analysis":
      rollout.analysis.push(line);
      break;
    case "paused":
      rollout.paused = line;
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

function state(rollout) {
  if (rollout.end) return text(rollout.end.summary || rollout.end.outcome);
  if (rollout.paused) return `paused: ${text(rollout.paused.reason)}`;
  const sent = rollout.lines.filter((l) => l.event === "batch").length;
  return `running: batch ${sent} of ${rollout.batches.length}`;
}

function lineText(line) {
  switch (line.event) {
    case "start":
      return `${text(line.kind)} ${text(line.rev)} by ${text(line.user)}: ${(line.batches || []).length} batches`;
    case "batch":
      return `batch ${text(line.batch)}: ${(line.hosts || []).join(", ")}`;
    case "host":
      return `${text(line.minion)}: ${text(line.outcome)}${line.release ? ` ${short(line.release)}` : ""}${
        line.reason ? `: ${line.reason}` : ""
      }`;
    case "analysis":
      return `analysis, step ${text(line.step)}: ${text(line.decision)}${line.reason ? `: ${line.reason}` : ""}`;
    case "paused":
      return `paused: ${text(line.reason)}`;
    case "end":
      return text(line.summary || line.outcome);
    default:
      return line.event;
  }
}

function measure(side, name) {
  return side && typeof side === "object" ? side[name] : undefined;
}

// The canary analysis of a step: old vs new failure rate and run time as small charts, the numbers beside them.
export function analysisView(line) {
  const old = line.old || {};
  const young = line.new || {};
  const limits = line.thresholds || {};
  const points = Array.isArray(line.series) ? line.series : [];
  const rows = [
    ["tasks", "tasks", text],
    ["failed", "failed", text],
    ["retried", "retried", text],
    ["workers lost", "lost", text],
    ["failure rate", "failure_rate", (v) => (typeof v === "number" ? percent(v) : text(v))],
    ["run time p50", "runtime_p50", (v) => (typeof v === "number" ? seconds(v) : text(v))],
    ["run time p95", "runtime_p95", (v) => (typeof v === "number" ? seconds(v) : text(v))],
  ];
  return h(
    "section",
    { class: ["analysis", `decision-${text(line.decision)}`], "data-key": `analysis:${text(line.step)}:${text(line.at)}` },
    h("h4", {}, `Canary analysis, step ${text(line.step)}: `, h("span", { class: "decision" }, text(line.decision))),
    line.reason ? h("p", { class: "analysis-reason" }, line.reason) : null,
    h(
      "div",
      { class: "charts" },
      pair("failure rate", old.failure_rate, young.failure_rate, percent, limits.failure_rate),
      pair("run time p50", old.runtime_p50, young.runtime_p50, seconds),
      pair("run time p95", old.runtime_p95, young.runtime_p95, seconds, limits.runtime_p95),
      series("failure rate, window", points, "failure_rate", percent),
      series("run time p95, window", points, "runtime_p95", seconds),
    ),
    h(
      "table",
      { class: "analysis-numbers" },
      h(
        "thead",
        {},
        h("tr", {}, h("th", {}, ""), h("th", {}, `old ${short(old.release)}`), h("th", {}, `new ${short(young.release)}`)),
      ),
      h(
        "tbody",
        {},
        rows.map(([label, name, fmt]) =>
          h("tr", {}, h("th", {}, label), h("td", {}, fmt(measure(old, name))), h("td", {}, fmt(measure(young, name)))),
        ),
      ),
    ),
  );
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
    h("p", { class: "rollout-state", "data-state": rollout.end ? rollout.end.outcome : rollout.paused ? "paused" : "running" }, state(rollout)),
    rollout.note ? h("p", { class: "error" }, rollout.note) : null,
    latest ? analysisView(latest) : null,
    buttons,
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
            h(
              "td",
              {},
              row.reason
                ? row.reason
                : ["waiting", "deploying", "not touched"].includes(row.outcome)
                  ? `serves ${short(row.release)}`
                  : short(row.release),
            ),
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
