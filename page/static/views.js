// The fleet's views, from fleet.overview: hosts, deployments, queues, history.
import { h, short, text, when } from "./dom.js";

function table(columns, rows, props = {}) {
  return h(
    "table",
    props,
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", {}, c)))),
    h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: columns.length, class: "empty" }, "none"))),
  );
}

function list(values) {
  return Array.isArray(values) && values.length ? values.join(", ") : "-";
}

function running(count, total) {
  if (count === null || count === undefined) return "?";
  return `${count}/${text(total)} RUNNING`;
}

// One row per minion: exactly fleet.inventory's rows.
export function hostsView(hosts) {
  const rows = hosts.map((host) =>
    h(
      "tr",
      { class: `status-${host.status === "up" ? "up" : "down"}`, "data-host": host.id },
      h("td", { class: "host-id" }, host.id),
      h("td", { class: "host-status" }, text(host.status)),
      h("td", {}, text(host.provider)),
      h("td", {}, text(host.region)),
      h("td", {}, list(host.public_ips)),
      h("td", {}, list(host.private_ips)),
      h(
        "td",
        { class: "host-deployments" },
        Object.entries(host.deployments || {}).map(([name, facts]) =>
          h(
            "div",
            { class: "host-deployment", "data-deployment": name },
            h("span", { class: "name" }, name),
            " ",
            h("code", {}, short(facts.release)),
            facts.rev && facts.rev !== facts.release ? h("span", { class: "muted" }, ` ${facts.rev}`) : null,
            " ",
            h("span", { class: "programs" }, running(facts.running, facts.programs)),
          ),
        ),
      ),
      h("td", { class: "muted" }, when(host.last_seen)),
    ),
  );
  const up = hosts.filter((host) => host.status === "up").length;
  return [
    h("p", { class: "summary" }, `${hosts.length} minions, ${up} up, ${hosts.length - up} down`),
    table(["ID", "Status", "Provider", "Region", "Public IP", "Private IP", "Deployments", "Last seen"], rows, {
      id: "hosts-table",
    }),
  ];
}

function majority(releases) {
  let best = null;
  for (const [sha, minions] of Object.entries(releases || {})) {
    if (!best || minions.length > releases[best].length) best = sha;
  }
  return best;
}

function held(facts) {
  const entries = Object.entries(facts.held || {});
  if (!entries.length) return "-";
  return entries.map(([program, reason]) =>
    h("div", { class: "held" }, h("span", { class: "name" }, program === "*" ? "all programs" : program), ": ", text(reason)),
  );
}

function draining(facts) {
  const pids = facts.draining || [];
  if (!pids.length) return "-";
  return pids.map((pid) => `supervisord ${pid}: ${text(facts.draining_tasks?.[String(pid)])} tasks in hand`).join("; ");
}

// Per deployment: which release on which host (drift marked), held programs and why, draining generations.
export function deploymentsView(deployments, actions, act) {
  const names = Object.keys(deployments).sort();
  if (!names.length) return h("p", { class: "empty" }, "No deployment is known to the master yet.");
  return names.map((name) => {
    const d = deployments[name];
    const most = majority(d.releases);
    const may = actions[name] || {};
    const floors = Object.entries(d.min_consumers || {});
    return h(
      "section",
      { class: ["deployment", d.drift ? "drift" : null], "data-deployment": name },
      h(
        "h3",
        {},
        h("span", { class: "name" }, name),
        d.drift ? h("span", { class: "badge drift-badge" }, `drift: ${Object.keys(d.releases).length} releases`) : null,
      ),
      floors.length
        ? h("p", { class: "floors" }, "min_consumers: ", floors.map(([q, n]) => `${q} ${n}`).join(", "))
        : null,
      act.buttons(name, may),
      table(
        ["Host", "Minion", "Release", "Commit", "Programs", "Held", "Draining"],
        Object.entries(d.hosts).map(([minion, facts]) =>
          h(
            "tr",
            { "data-host": minion, class: facts.release && most && facts.release !== most ? "differs" : null },
            h("td", {}, minion),
            h("td", {}, text(facts.status)),
            h("td", {}, h("code", {}, short(facts.release)), facts.rev ? h("span", { class: "muted" }, ` ${facts.rev}`) : null),
            h("td", { class: "subject" }, text(facts.subject)),
            h("td", { title: Object.entries(facts.programs || {}).map(([p, st]) => `${p} ${st}`).join("\n") }, running(facts.running, facts.total)),
            h("td", { class: "held-cell" }, held(facts)),
            h("td", {}, draining(facts)),
          ),
        ),
      ),
    );
  });
}

// Consumers per Celery queue across the fleet, beside each deployment's floor.
export function queuesView(queues, floorsRead = true) {
  const rows = Object.entries(queues.queues || {}).map(([name, info]) =>
    h(
      "tr",
      { "data-queue": name, class: info.below ? "below" : null },
      h("td", {}, name),
      h("td", {}, `${info.up} up / ${(info.consumers || []).length}`),
      h(
        "td",
        {},
        floorsRead
          ? Object.entries(info.floors || {})
              .map(([d, n]) => `${n} (${d})`)
              .join(", ") || "-"
          : "reading…",
      ),
      h(
        "td",
        {},
        (info.consumers || [])
          .map((c) => `${c.node} on ${c.minion}${c.status === "up" ? "" : " (down)"}, ${text(c.active)} active`)
          .join("; ") || "-",
      ),
    ),
  );
  return [
    table(["Queue", "Consumers", "Floor (min_consumers)", "Workers"], rows, { id: "queues-table" }),
    (queues.unanswered || []).length
      ? h(
          "p",
          { class: "error" },
          "Not answering: ",
          queues.unanswered.map((u) => `${u.deployment} on ${u.minion}: ${u.error}`).join("; "),
        )
      : null,
  ];
}

function hostOutcomes(hosts) {
  return Object.entries(hosts || {})
    .map(([minion, row]) => `${minion}: ${text(row?.outcome)}${row?.release ? ` ${short(row.release)}` : ""}`)
    .join(", ");
}

// The deploy ledger, newest first.
export function historyView(history) {
  const rows = history.map((item) =>
    h(
      "tr",
      { "data-jid": item.jid || "" },
      h("td", {}, when(item.when)),
      h("td", {}, text(item.who)),
      h("td", {}, text(item.what)),
      h("td", {}, text(item.deployment)),
      h("td", {}, text(item.rev)),
      h("td", { class: "outcome" }, text(item.outcome)),
      h("td", { class: "muted" }, hostOutcomes(item.hosts) || "-"),
    ),
  );
  return table(["When", "Who", "What", "Deployment", "Rev", "Outcome", "Hosts"], rows, { id: "history-table" });
}
