// The usage dashboard: calls the API with the pasted token (kept in this tab's
// sessionStorage) and shows what it answers. Every figure and every string from
// the server is set with textContent, never parsed as HTML.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const KEY = "vsc-dashboard-token";
  const DAYS = 30;
  const state = { token: sessionStorage.getItem(KEY) || "", me: null, admin: false, target: null, nextBefore: null };

  async function api(method, path, body) {
    const headers = { Authorization: `Bearer ${state.token}` };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const init = { method, headers, cache: "no-store" };
    if (body !== undefined) init.body = JSON.stringify(body);
    const resp = await fetch(path, init);
    const text = await resp.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
    if (!resp.ok) {
      const err = new Error(`${resp.status}: ${(data && (data.detail || data.title)) || resp.statusText}`);
      err.status = resp.status;
      throw err;
    }
    return data;
  }

  const enc = encodeURIComponent;
  const num = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));
  const when = (t) => (t ? new Date(t).toISOString().replace("T", " ").slice(0, 19) + " UTC" : "–");

  function say(text, isError) {
    const s = $("status");
    s.textContent = text;
    s.className = isError ? "error" : "";
  }

  // One row of cells: a cell is a value, or {text, cls} or a DOM node.
  function row(tbody, cells) {
    const tr = document.createElement("tr");
    for (const c of cells) {
      const td = document.createElement("td");
      if (c instanceof Node) td.appendChild(c);
      else if (c !== null && typeof c === "object") { td.textContent = c.text; td.className = c.cls || ""; }
      else td.textContent = c === null || c === undefined ? "–" : String(c);
      tr.appendChild(td);
    }
    tbody.appendChild(tr);
    return tr;
  }

  function rows(tableId, items, cells, empty) {
    const tbody = $(tableId).tBodies[0];
    while (tbody.firstChild) tbody.removeChild(tbody.firstChild);
    for (const it of items) row(tbody, cells(it));
    if (!items.length && empty) {
      const tr = row(tbody, [empty]);
      tr.firstChild.colSpan = $(tableId).tHead.rows[0].cells.length;
    }
  }

  const n = (v) => ({ text: num(v), cls: "num" });

  // The last DAYS UTC dates, oldest first (what analytics' `daily` holds).
  function lastDays() {
    const out = [];
    const today = Date.UTC(new Date().getUTCFullYear(), new Date().getUTCMonth(), new Date().getUTCDate());
    for (let i = DAYS - 1; i >= 0; i--) out.push(new Date(today - i * 86400000).toISOString().slice(0, 10));
    return out;
  }

  // Usage of the caller from analytics; of another user (an admin looking) from usage/stats.
  async function usage(id) {
    const sessions = await api("GET", `/api/users/${enc(id)}/usage/stats?group_by=session`);
    if (id === state.me.user_id) {
      const a = await api("GET", `/api/vscode/analytics?days=${DAYS}`);
      return {
        totals: a.totals,
        daily: a.daily.map((d) => ({ date: d.date, tokens: d.total_tokens, credits: d.credits_consumed })),
        byModel: a.by_model.map((m) => ({ ...m, tokens: m.prompt_tokens + m.completion_tokens })),
        byProvider: a.by_provider,
        byFeature: a.by_feature,
        sessions: sessions.rows,
      };
    }
    const stats = async (g) => (await api("GET", `/api/users/${enc(id)}/usage/stats?group_by=${g}`)).rows;
    const [day, model, provider, feature] = await Promise.all(["day", "model", "provider", "feature"].map(stats));
    const byDay = new Map(day.map((r) => [r.key, r]));
    const tok = (r) => r.prompt_tokens + r.completion_tokens;
    const t = sessions.totals || {};
    return {
      totals: { total_tokens: (t.prompt_tokens || 0) + (t.completion_tokens || 0), credits_consumed: t.credits_consumed, requests: t.requests },
      daily: lastDays().map((d) => ({ date: d, tokens: byDay.has(d) ? tok(byDay.get(d)) : 0, credits: byDay.has(d) ? byDay.get(d).credits_consumed : 0 })),
      byModel: model.map((r) => ({ model: r.key, provider: "", requests: r.requests, tokens: tok(r) })),
      byProvider: provider.filter((r) => r.key !== null).map((r) => ({ provider: r.key, requests: r.requests, total_tokens: tok(r) })),
      byFeature: feature.filter((r) => r.key !== null).map((r) => ({ feature: r.key, events: r.feature_events })),
      sessions: sessions.rows,
    };
  }

  function details(t) {
    const parts = [];
    if (t.model) parts.push(`model ${t.model}`);
    if (t.provider) parts.push(`provider ${t.provider}`);
    if (t.prompt_tokens !== null || t.completion_tokens !== null) {
      parts.push(`tokens ${num(t.prompt_tokens || 0)} prompt + ${num(t.completion_tokens || 0)} completion`);
    }
    if (t.feature) parts.push(`feature ${t.feature}`);
    if (t.session_id) parts.push(`session ${t.session_id}`);
    if (t.hold_id) parts.push(`hold ${t.hold_id}`);
    parts.push(t.price ? `price ${JSON.stringify(t.price)}` : "price: as sent (no price book)");
    return { text: parts.join(" · "), cls: "details" };
  }

  async function ledger(id, more) {
    const q = more && state.nextBefore ? `&before=${enc(state.nextBefore)}` : "";
    const page = await api("GET", `/api/users/${enc(id)}/credits/transactions?limit=20${q}`);
    const tbody = $("ledger").tBodies[0];
    if (!more) while (tbody.firstChild) tbody.removeChild(tbody.firstChild);
    for (const t of page.transactions) {
      row(tbody, [when(t.created_at), t.kind, n(t.amount), n(t.balance_after), details(t), t.description]).dataset.id = t.id;
    }
    state.nextBefore = page.next_before;
    $("older").hidden = !page.next_before;
  }

  function limits(l) {
    const names = Object.keys(l.limits);
    rows("limits", names, (c) => {
      const x = l.limits[c];
      return [c, `${num(x.limit)} per ${num(x.window_secs)} s`, n(x.remaining), `${num(x.reset_secs)} s`, x.source];
    });
    const p = l.limits.profile || l.limits[names[0]];
    const overrides = Object.keys(l.overrides);
    $("limits-explained").textContent =
      `Your plan is "${l.plan}". Each kind of request (a class) has its own limit: you may send up to the limit at once, ` +
      `and it refills steadily over its window (for example ${num(p.limit)} per ${num(p.window_secs)} s is one more request every ` +
      `${(p.window_secs / Math.max(1, p.limit)).toFixed(2)} s). Over a limit the server answers 429 with Retry-After, and every ` +
      `answer carries RateLimit-Limit, RateLimit-Remaining and RateLimit-Reset. usage_events counts each event of a usage batch. ` +
      (overrides.length ? `An administrator set your own limit for: ${overrides.join(", ")}.` : "No per-user override is set.");
  }

  async function showUser(id) {
    state.target = id;
    const self = id === state.me.user_id;
    $("viewing").textContent = self ? `Signed in as ${id}.` : `Viewing ${id} (as admin ${state.me.user_id}).`;
    const [profile, holds, u] = await Promise.all([
      api("GET", `/api/users/${enc(id)}/profile`),
      api("GET", `/api/users/${enc(id)}/credits/holds`),
      usage(id),
    ]);
    $("balance").textContent = num(profile.credits.balance);
    $("held").textContent = num(profile.credits.held);
    $("plan").textContent = profile.plan;
    $("account-status").textContent = profile.status;
    $("total-tokens").textContent = num(u.totals.total_tokens);
    $("total-credits").textContent = num(u.totals.credits_consumed);
    $("total-requests").textContent = num(u.totals.requests);
    rows("holds", holds.holds, (h) => [h.hold_id, n(h.amount), when(h.expires_at), h.model, h.provider], "No open hold.");
    window.Chart.bars($("chart-tokens"), u.daily.map((d) => ({ label: d.date, value: d.tokens })));
    window.Chart.bars($("chart-credits"), u.daily.map((d) => ({ label: d.date, value: d.credits })));
    rows("by-model", u.byModel, (m) => [m.model, m.provider, n(m.requests), n(m.tokens)], "No model requests.");
    rows("by-provider", u.byProvider, (p) => [p.provider, n(p.requests), n(p.total_tokens)], "No model requests.");
    rows("by-feature", u.byFeature, (f) => [f.feature, n(f.events)], "No feature events.");
    rows("by-session", u.sessions, (s) => [s.key === null ? "(no session)" : s.key, n(s.requests),
      n(s.prompt_tokens + s.completion_tokens), n(s.credits_consumed)], "No sessions.");
    await ledger(id, false);
    $("limits-section").hidden = !self;
    if (self) limits(await api("GET", "/api/vscode/user/limits"));
    $("controls").hidden = !state.admin || self;
    $("controls-user").textContent = id;
    $("plan-name").value = profile.plan;
    if (state.admin) await audit();
    $("main").hidden = false;
  }

  async function audit() {
    const a = await api("GET", "/api/admin/audit?limit=50");
    rows("audit", a.entries, (e) => [when(e.at), e.actor, e.action, e.target, { text: JSON.stringify(e.details), cls: "details" }], "No entries.");
  }

  async function search(query) {
    const found = await api("GET", `/api/admin/users?limit=50&query=${enc(query)}`);
    rows("users", found.users, (u) => {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = "View";
      b.addEventListener("click", () => run(() => showUser(u.user_id)));
      return [u.user_id, u.email, u.name, u.plan, u.status, n(u.credits_balance), b];
    }, "No user matches.");
  }

  async function run(f, done) {
    try {
      say("Loading…");
      await f();
      say(done || "");
    } catch (e) {
      say(e.message, true);
    }
  }

  async function start() {
    const l = await api("GET", "/api/vscode/user/limits");
    state.me = { user_id: l.user_id };
    state.admin = l.admin === true;
    $("admin").hidden = !state.admin;
    await showUser(state.me.user_id);
    if (state.admin) await search("");
    document.body.dataset.loaded = "true";
  }

  function adminAction(method, suffix, body, what) {
    const id = state.target;
    run(async () => {
      await api(method, `/api/admin/users/${enc(id)}/${suffix}`, body);
      await showUser(id);
    }, `${what} done for ${id}.`);
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("token").value = state.token;
    $("token-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      state.token = $("token").value.trim();
      sessionStorage.setItem(KEY, state.token);
      run(start);
    });
    $("forget").addEventListener("click", () => {
      sessionStorage.removeItem(KEY);
      state.token = "";
      $("token").value = "";
      $("main").hidden = true;
      say("Token forgotten.");
    });
    $("older").addEventListener("click", () => run(() => ledger(state.target, true)));
    $("search-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      run(() => search($("search").value.trim()));
    });
    $("view-self").addEventListener("click", () => run(() => showUser(state.me.user_id)));
    $("grant-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const reason = $("grant-description").value.trim() || "dashboard grant";
      adminAction("POST", "credits/grant", { amount: Number($("grant-amount").value), reason }, "Grant");
    });
    $("plan-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      adminAction("PUT", "plan", { plan: $("plan-name").value.trim() }, "Plan change");
    });
    $("status-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      adminAction("PUT", "status", { status: $("status-name").value }, "Status change");
    });
    if (state.token) run(start);
  });
})();
