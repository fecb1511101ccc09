// salt-api (rest_cherrypy), the page's only server. The token salt-api's
// /login returns travels in the X-Auth-Token header of every request and
// nowhere else: never in a URL, never as a cookie (requests are made with
// credentials "omit", so the session cookie /login also sets is never stored,
// and no other site's request can ride on it).

export class AuthError extends Error {}

export class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

// CherryPy's error pages are HTML with the message in a <p>: parsed inertly (no script runs in a parsed document).
async function reason(response) {
  const body = await response.text();
  let message = "";
  if ((response.headers.get("Content-Type") || "").includes("json")) {
    try {
      const data = JSON.parse(body);
      message = typeof data.return === "string" ? data.return : JSON.stringify(data.return);
    } catch {
      message = "";
    }
  } else {
    const doc = new DOMParser().parseFromString(body, "text/html");
    message = (doc.querySelector("p")?.textContent || "").trim();
  }
  return `salt-api answered ${response.status} ${response.statusText}${message ? `: ${message}` : ""}`;
}

export class SaltApi {
  constructor(token = null) {
    this.token = token;
  }

  headers(extra = {}) {
    const headers = { Accept: "application/json", ...extra };
    if (this.token) headers["X-Auth-Token"] = this.token;
    return headers;
  }

  async post(path, body) {
    const response = await fetch(path, {
      method: "POST",
      credentials: "omit",
      cache: "no-store",
      headers: this.headers({ "Content-Type": "application/json" }),
      body: JSON.stringify(body),
    });
    if (response.status === 401) throw new AuthError(await reason(response));
    if (!response.ok) throw new ApiError(await reason(response), response.status);
    return response.json();
  }

  // {token, user, perms, eauth, expire}; AuthError when the eauth backend refuses.
  async login(username, password, eauth) {
    const data = await this.post("/login", { username, password, eauth });
    const session = (data.return || [])[0];
    if (!session || !session.token) throw new AuthError("salt-api returned no token");
    this.token = session.token;
    return session;
  }

  // Revokes the Salt token behind the session, not just the session.
  async logout() {
    try {
      await this.post("/logout", {});
    } finally {
      this.token = null;
    }
  }

  // A runner function, waiting for its return (salt-api's "runner" client).
  async runner(fun, { arg = [], kwarg = {} } = {}) {
    const data = await this.post("/", [{ client: "runner", fun, arg, kwarg }]);
    return (data.return || [])[0];
  }

  // A runner function started in the background ("runner_async"): {jid, tag}.
  async runnerAsync(fun, { arg = [], kwarg = {} } = {}) {
    const data = await this.post("/", [{ client: "runner_async", fun, arg, kwarg }]);
    const job = (data.return || [])[0];
    if (!job || !job.jid) throw new ApiError(`salt-api did not start ${fun}: ${JSON.stringify(job)}`, 200);
    return job;
  }

  // The master's event bus (salt-api's /events, server-sent events) read over
  // fetch, so that the token goes in a header: onEvent({tag, data}) per event.
  // Resolves when the stream ends; AuthError when the token is refused.
  async events(onEvent, signal) {
    const response = await fetch("/events", {
      credentials: "omit",
      cache: "no-store",
      headers: this.headers({ Accept: "text/event-stream" }),
      signal,
    });
    if (response.status === 401) throw new AuthError(await reason(response));
    if (!response.ok) throw new ApiError(await reason(response), response.status);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end = buffer.indexOf("\n\n");
      while (end >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, ""))
          .join("\n");
        if (data) {
          try {
            const event = JSON.parse(data);
            if (event && typeof event.tag === "string") onEvent(event);
          } catch {
            // Not an event of Salt's: skip it.
          }
        }
        end = buffer.indexOf("\n\n");
      }
    }
  }
}
