// The fleet page: log in through salt-api's eauth, read fleet.overview, follow
// rollouts on the master's event bus, and act where Salt's ACL allows.
import { h, replace } from "./dom.js";
import { fold, newRollout, rolloutView } from "./rollout.js";
import { AuthError, SaltApi } from "./saltapi.js";
import { deploymentsView, historyView, hostsView, queuesView } from "./views.js";

const SESSION = "saltfleet.session";
const EAUTH = "saltfleet.eauth";
const ROLLOUT_TAG = /^saltfleet\/rollout\/([^/]+)\/([^/]+)$/;
const RUNNER_RET = /^salt\/run\/([^/]+)\/ret$/;
// The runner functions the page starts, as their return events name them.
const ACTED = /^runner\.fleet\.(deploy|rollback|promote|abort)$/;
// Returns of those kept for a job the page has not heard the jid of yet.
const EARLY_MAX = 20;
const VIEWS = ["hosts", "deployments", "queues", "rollout", "history"];
// The mine, which most of fleet.overview reads, changes at each heartbeat (60 s): no use asking more often.
const REFRESH_EVERY = 60000;

const $ = (id) => document.getElementById(id);

const page = {
  api: new SaltApi(),
  session: null,
  overview: null,
  rollouts: new Map(),
  started: new Map(),
  // A quick job's return can come on the bus before salt-api's answer that started it: {jid: return}.
  early: new Map(),
  stream: null,
  timer: null,
  refreshing: null,
};

// ------------------------------------------------------------------ status

function say(message, kind = "info") {
  replace($("status"), message || "");
  $("status").className = kind;
}

function failed(error) {
  if (error instanceof AuthError) {
    signedOut(`${error.message}. Log in again.`);
    return;
  }
  say(error.message || String(error), "error");
}

// ------------------------------------------------------------------ session

function saved() {
  try {
    const session = JSON.parse(sessionStorage.getItem(SESSION) || "null");
    return session && typeof session.token === "string" && session.expire * 1000 > Date.now() ? session : null;
  } catch {
    return null;
  }
}

function signedOut(message) {
  sessionStorage.removeItem(SESSION);
  page.session = null;
  page.api.token = null;
  page.overview = null;
  page.rollouts.clear();
  page.early.clear();
  if (page.stream) page.stream.abort();
  page.stream = null;
  clearInterval(page.timer);
  for (const id of VIEWS) replace($(`view-${id}`));
  $("app").hidden = true;
  $("login").hidden = false;
  replace($("login-error"), message || "");
  $("password").value = "";
  $("username").focus();
}

async function login(event) {
  event.preventDefault();
  const username = $("username").value.trim();
  const eauth = $("eauth").value.trim() || "pam";
  $("login-button").disabled = true;
  replace($("login-error"));
  try {
    const session = await page.api.login(username, $("password").value, eauth);
    $("password").value = "";
    localStorage.setItem(EAUTH, eauth);
    page.session = { token: session.token, user: session.user, perms: session.perms, expire: session.expire };
    sessionStorage.setItem(SESSION, JSON.stringify(page.session));
    await start();
  } catch (error) {
    page.api.token = null;
    $("password").value = "";
    replace($("login-error"), error instanceof AuthError ? `Login refused: ${error.message}` : error.message);
  } finally {
    $("login-button").disabled = false;
  }
}

async function logout() {
  try {
    await page.api.logout();
    signedOut("Logged out: the token is revoked.");
  } catch (error) {
    signedOut(`Logged out here; salt-api said: ${error.message}`);
  }
}

// ------------------------------------------------------------------ data

async function overview(floors, announce) {
  const kwarg = { perms: page.session.perms || [], floors };
  const data = await page.api.runner("fleet.overview", { kwarg });
  if (!data || typeof data !== "object" || !Array.isArray(data.hosts)) {
    throw new Error(`fleet.overview returned no overview: ${JSON.stringify(data).slice(0, 300)}`);
  }
  page.overview = data;
  // Whether the queues' floors are in yet (the first look leaves them out).
  $("app").dataset.floors = data.floors_read ? "read" : "reading";
  for (const item of data.rollouts || []) {
    const rollout = page.rollouts.get(item.id) || newRollout(item.id);
    for (const line of item.events || []) fold(rollout, line);
    page.rollouts.set(item.id, rollout);
  }
  render();
  if (announce) say(`Read ${data.generated} for ${data.user}.`);
}

async function refresh() {
  if (page.refreshing) return page.refreshing;
  page.refreshing = (async () => {
    try {
      // The first look without the queues' floors (the master compiles every host's pillar for them):
      // the hosts show at once, the floors a moment later, quietly (an action's word stays on the status line).
      const first = !page.overview;
      if (first) await overview(false, true);
      if (page.session) await overview(true, !first);
    } catch (error) {
      failed(error);
    } finally {
      page.refreshing = null;
    }
  })();
  return page.refreshing;
}

function onEvent(event) {
  const rollout = ROLLOUT_TAG.exec(event.tag);
  if (rollout) {
    const line = event.data || {};
    const id = line.id || rollout[1];
    const known = page.rollouts.get(id) || newRollout(id);
    page.rollouts.set(id, known);
    if (fold(known, line)) renderRollouts();
    if (line.event === "end") refresh();
    return;
  }
  const ret = RUNNER_RET.exec(event.tag);
  if (ret && page.started.has(ret[1])) {
    finished(ret[1], event.data?.return);
  } else if (ret && ACTED.test(String(event.data?.fun))) {
    page.early.set(ret[1], event.data?.return);
    for (const jid of page.early.keys()) if (page.early.size > EARLY_MAX) page.early.delete(jid);
  }
}

// A job the page started has returned: its error (or its comment) under the rollout it concerns, and in the status.
function finished(jid, result) {
  const { what, rollout } = page.started.get(jid);
  page.started.delete(jid);
  const error = result && typeof result === "object" ? result.error : typeof result === "string" ? result : null;
  const comment = result && typeof result === "object" && typeof result.comment === "string" ? result.comment : null;
  // The fleet runners' errors begin with the call they refuse.
  const said = error === null || error === undefined ? null : String(error);
  const message = said && !said.startsWith(what) ? `${what}: ${said}` : said;
  // A deploy's rollout is its job; a promote's or an abort's is the rollout it was asked of.
  const known = page.rollouts.get(rollout || jid);
  if (known) {
    known.note = message;
    renderRollouts();
  }
  // After the refresh, whose own word would hide this one.
  refresh().then(() => {
    if (!page.session) return;
    if (message) say(message, "error");
    else if (comment) say(`${what}: ${comment}`);
  });
}

async function follow() {
  const controller = new AbortController();
  page.stream = controller;
  while (page.stream === controller) {
    try {
      await page.api.events(onEvent, controller.signal);
    } catch (error) {
      if (page.stream !== controller) return;
      if (error instanceof AuthError) {
        signedOut(`${error.message}. Log in again.`);
        return;
      }
    }
    // The stream ended (salt-api restarted, a proxy timed out): again after a pause, and catch up.
    await new Promise((resolve) => setTimeout(resolve, 1000));
    if (page.stream === controller) refresh();
  }
}

// ------------------------------------------------------------------ actions

function confirmed(message) {
  const dialog = $("confirm");
  replace($("confirm-text"), message);
  dialog.showModal();
  $("confirm-yes").focus();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "yes"), { once: true });
  });
}

// Run ``fun`` for deployment ``name`` once the user confirms; ``rollout``: the id of the rollout it concerns, if any.
async function act(fun, name, kwarg, message, rollout = null) {
  if (!(await confirmed(message))) {
    say("Nothing was changed.");
    return false;
  }
  try {
    const job = await page.api.runnerAsync(fun, { arg: [name], kwarg });
    page.started.set(job.jid, { what: `${fun} ${name}`, rollout });
    say(`${fun} ${name} started (job ${job.jid}).`);
    show("rollout");
    if (page.early.has(job.jid)) {
      const result = page.early.get(job.jid);
      page.early.delete(job.jid);
      finished(job.jid, result);
    }
    return true;
  } catch (error) {
    // A 401 here is Salt's ACL refusing this call (the session still reads): nothing was changed.
    say(`${fun} ${name} refused: ${error.message}`, "error");
    return false;
  }
}

function hostsOf(name) {
  return Object.keys(page.overview?.deployments?.[name]?.hosts || {}).length;
}

function deployForm(name) {
  const rev = h("input", { name: "rev", required: true, placeholder: "branch, tag or SHA", autocomplete: "off" });
  const batch = h("input", { name: "batch", value: "1", size: 4, autocomplete: "off" });
  const form = h(
    "form",
    { class: "deploy-form", hidden: true, "data-action": "deploy-form" },
    h("label", {}, "rev ", rev),
    " ",
    h("label", {}, "batch ", batch),
    " ",
    h("button", { type: "submit", "data-action": "deploy-submit" }, "Deploy…"),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const kwarg = { rev: rev.value.trim(), batch: batch.value.trim() || "1" };
    const message = `Deploy ${kwarg.rev} of ${name} to its ${hostsOf(name)} host(s), ${kwarg.batch} per batch?`;
    if (await act("fleet.deploy", name, kwarg, message)) form.hidden = true;
  });
  return form;
}

const actions = {
  buttons(name, may) {
    const shown = [];
    if (may.deploy) {
      const form = deployForm(name);
      shown.push(
        h(
          "button",
          {
            type: "button",
            "data-action": "deploy",
            onclick: () => {
              form.hidden = !form.hidden;
              if (!form.hidden) form.querySelector("input").focus();
            },
          },
          "Deploy a rev",
        ),
        form,
      );
    }
    if (may.rollback) {
      shown.push(
        h(
          "button",
          {
            type: "button",
            "data-action": "rollback",
            onclick: () =>
              act("fleet.rollback", name, {}, `Roll ${name} back on its ${hostsOf(name)} host(s), batch by batch?`),
          },
          "Roll back",
        ),
      );
    }
    return shown.length ? h("div", { class: "actions" }, shown) : null;
  },
};

function pauseButtons(rollout) {
  if (!rollout.paused || rollout.end) return null;
  const may = page.overview?.actions?.[rollout.deployment] || {};
  const can = page.overview?.capabilities || {};
  const shown = [];
  if (can.promote && may.promote) {
    shown.push(
      h(
        "button",
        {
          type: "button",
          "data-action": "promote",
          onclick: () =>
            act(
              "fleet.promote",
              rollout.deployment,
              {},
              `Promote ${rollout.deployment}: go on with the rollout past its pause?`,
              rollout.id,
            ),
        },
        "Promote",
      ),
    );
  }
  if (can.abort && may.abort) {
    shown.push(
      h(
        "button",
        {
          type: "button",
          "data-action": "abort",
          onclick: () =>
            act(
              "fleet.abort",
              rollout.deployment,
              {},
              `Abort ${rollout.deployment}: stop the rollout and send every host it changed back?`,
              rollout.id,
            ),
        },
        "Abort",
      ),
    );
  }
  return shown.length ? h("div", { class: "actions" }, shown) : null;
}

// ------------------------------------------------------------------ rendering

function renderRollouts() {
  const all = [...page.rollouts.values()].filter((r) => r.lines.length || r.note);
  const running = all.filter((r) => !r.end).reverse();
  const ended = all.filter((r) => r.end).reverse();
  const shown = [...running, ...ended.slice(0, running.length ? 1 : 2)];
  replace(
    $("view-rollout"),
    running.length ? null : h("p", { class: "empty" }, "No rollout in progress."),
    shown.map((r) => rolloutView(r, pauseButtons(r))),
  );
  const tab = document.querySelector('nav button[data-view="rollout"]');
  tab.classList.toggle("live", running.length > 0);
}

function render() {
  const o = page.overview;
  replace($("user"), o.user || page.session.user);
  replace($("view-hosts"), hostsView(o.hosts));
  // When the hosts table was first filled, for the bench: performance.getEntriesByName("saltfleet:hosts").
  performance.mark("saltfleet:hosts");
  // An operator filling in a deploy form keeps it as typed: the view is drawn again once it is closed or sent.
  if (!$("view-deployments").querySelector("form.deploy-form:not([hidden])")) {
    replace($("view-deployments"), deploymentsView(o.deployments || {}, o.actions || {}, actions));
  }
  replace($("view-queues"), queuesView(o.queues || {}, o.floors_read !== false));
  replace($("view-history"), historyView(o.history || []));
  renderRollouts();
}

function show(view) {
  for (const id of VIEWS) {
    $(`view-${id}`).hidden = id !== view;
    document.querySelector(`nav button[data-view="${id}"]`).setAttribute("aria-selected", String(id === view));
  }
}

async function start() {
  page.api.token = page.session.token;
  $("login").hidden = true;
  $("app").hidden = false;
  show("hosts");
  await refresh();
  if (!page.session) return;
  follow();
  clearInterval(page.timer);
  page.timer = setInterval(() => document.visibilityState === "visible" && refresh(), REFRESH_EVERY);
}

function init() {
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", logout);
  $("refresh").addEventListener("click", () => refresh());
  for (const button of document.querySelectorAll("nav button[data-view]")) {
    button.addEventListener("click", () => show(button.dataset.view));
  }
  $("eauth").value = localStorage.getItem(EAUTH) || $("eauth").value;
  page.session = saved();
  if (page.session) start();
  else signedOut("");
}

init();
