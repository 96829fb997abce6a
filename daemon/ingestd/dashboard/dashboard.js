// The ingestd dashboard: plain DOM, no build step, no outside requests. One page for
// both endpoints: the daemon's control endpoint (watches, failures with retry, recent
// items) and `ingestd serve` (datasets and their items). /api/info says which.
//
// Every refresh updates rows in place (keyed by item), so buttons and images stay the
// same elements between polls: no flicker, and a click never lands on a replaced node.
// Text from the ledger (file names, error messages) only ever goes into textContent.
"use strict";

const POLL_MS = 1500;
const TOKEN_KEY = "ingestd-token";

const state = {
  kind: null,
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  dataset: null,
  timer: null,
  busy: false,
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) node.append(c);
  return node;
}

class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.token) headers.Authorization = "Bearer " + state.token;
  const resp = await fetch(path, Object.assign({}, options, { headers, cache: "no-store" }));
  if (!resp.ok) {
    let message = resp.statusText;
    try {
      message = (await resp.json()).error || message;
    } catch (_) { /* not JSON */ }
    throw new HttpError(resp.status, message || "HTTP " + resp.status);
  }
  return resp.json();
}

function ago(ts, now) {
  if (ts === null || ts === undefined) return "—";
  const s = Math.max(0, Math.round((now || Date.now() / 1000) - ts));
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  if (s < 86400) return Math.round(s / 3600) + " h ago";
  return Math.round(s / 86400) + " d ago";
}

function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

// Keep `container`'s children in the order of `items`, reusing nodes by key.
function reconcile(container, items, keyOf, create, update) {
  const existing = new Map();
  for (const child of Array.from(container.children)) existing.set(child.dataset.key, child);
  let previous = null;
  for (const item of items) {
    const key = keyOf(item);
    let node = existing.get(key);
    if (node) existing.delete(key);
    else {
      node = create(item);
      node.dataset.key = key;
    }
    update(node, item);
    const want = previous ? previous.nextSibling : container.firstChild;
    if (want !== node) container.insertBefore(node, want);
    previous = node;
  }
  for (const node of existing.values()) node.remove();
}

// --- thumbnails -----------------------------------------------------------------------------

function thumbBox() {
  return el("div", { class: "thumb" });
}

function setThumb(box, url, label) {
  if (box.dataset.url === (url || "")) return;
  box.dataset.url = url || "";
  box.replaceChildren();
  if (!url) {
    box.append(label || "no preview");
    return;
  }
  const img = el("img", { alt: label || "" });
  img.addEventListener("error", () => {
    box.replaceChildren(label || "no preview");
  });
  box.append(img);
  if (!state.token) {
    img.src = url;
    return;
  }
  // With a token the image must come through fetch, which can send the header.
  fetch(url, { headers: { Authorization: "Bearer " + state.token } })
    .then((r) => (r.ok ? r.blob() : Promise.reject(new Error(r.statusText))))
    .then((blob) => {
      if (box.dataset.url !== url) return;
      const objectUrl = URL.createObjectURL(blob);
      img.addEventListener("load", () => URL.revokeObjectURL(objectUrl), { once: true });
      img.src = objectUrl;
    })
    .catch(() => box.replaceChildren(label || "no preview"));
}

// --- the daemon -------------------------------------------------------------------------------

function watchCard(w) {
  const retry = el("button", { type: "button", text: "Retry failed", "data-action": "retry-watch" });
  retry.addEventListener("click", () => retryItems(w.name, null, retry));
  const num = (field, label) =>
    el("div", {}, el("span", { class: "n " + field, "data-field": field }), el("span", { class: "label", text: label }));
  return el(
    "div",
    { class: "card", "data-watch": w.name },
    el("div", { class: "title" },
      el("span", { class: "name", text: w.name }),
      el("span", { class: "dataset", "data-field": "dataset" })),
    el("div", { class: "flow" },
      num("synced", "synced"), num("pending", "pending"), num("failed", "failed"),
      num("rate", "per min")),
    el("div", { class: "bar" },
      el("span", { class: "synced" }), el("span", { class: "pending" }), el("span", { class: "failed" })),
    el("div", { class: "meta" },
      el("span", { "data-field": "activity" }), retry),
    el("div", { class: "problem", "data-field": "problem" })
  );
}

function updateWatchCard(card, w, act, now) {
  const f = (name) => card.querySelector(`[data-field="${name}"]`);
  setText(f("dataset"), "→ " + w.dataset);
  setText(f("synced"), String(w.synced));
  setText(f("pending"), String(w.pending));
  setText(f("failed"), String(w.failed));
  setText(f("rate"), String(act ? act.synced_last_minute : 0));
  const seen = act ? `${act.files_seen} files seen · ` : "";
  setText(f("activity"), seen + "last activity " + ago(act ? act.last_activity : null, now));
  const problem = w.problem || "";
  setText(f("problem"), problem);
  f("problem").hidden = !problem;
  const total = w.synced + w.pending + w.failed || 1;
  const bar = card.querySelector(".bar");
  for (const k of ["synced", "pending", "failed"]) {
    bar.querySelector("." + k).style.width = (100 * w[k]) / total + "%";
  }
  const button = card.querySelector('[data-action="retry-watch"]');
  if (!button.dataset.busy) button.disabled = w.failed === 0;
}

function failedRow(item) {
  const retry = el("button", { type: "button", text: "Retry", "data-action": "retry-item" });
  retry.addEventListener("click", () => retryItems(item.watch, item.source_id, retry));
  return el(
    "tr",
    { "data-item": item.source_id, "data-watch": item.watch },
    el("td", { class: "key" }),
    el("td", { text: item.watch }),
    el("td", { class: "reason" }),
    el("td", { class: "tries" }),
    el("td", {}, retry)
  );
}

function updateFailedRow(row, item) {
  const cells = row.children;
  setText(cells[0], item.key || item.source_id);
  setText(cells[2], item.last_error || "(no reason recorded)");
  setText(cells[3], String(item.attempts));
}

function tile(item) {
  return el(
    "div",
    { class: "tile", "data-item": item.source_id || item.key },
    thumbBox(),
    el("div", { class: "caption" },
      el("div", { class: "key" }),
      el("div", { class: "sub" }, el("span", { class: "left" }), el("span", { class: "right" })))
  );
}

function updateRecentTile(node, item, now) {
  setThumb(node.querySelector(".thumb"), item.thumbnail, item.kind || "item");
  setText(node.querySelector(".key"), item.key || item.source_id);
  const left = node.querySelector(".left");
  left.replaceChildren(el("span", { class: "badge " + item.status, text: item.status }), " " + item.watch);
  setText(node.querySelector(".right"), ago(item.updated_at, now));
  node.title = item.last_error || item.key;
}

async function retryItems(watch, item, button) {
  button.disabled = true;
  button.dataset.busy = "1";
  const label = button.textContent;
  try {
    const res = await api("api/retry", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ watch, item }),
    });
    button.textContent = res.retried ? `queued ${res.retried}` : "nothing to retry";
  } catch (e) {
    button.textContent = "failed: " + e.message;
  }
  setTimeout(() => {
    button.textContent = label;
    delete button.dataset.busy;
    button.disabled = false;
  }, 2500);
  refresh();
}

async function refreshDaemon() {
  const [status, activity, recent, failed] = await Promise.all([
    api("api/status"),
    api("api/activity"),
    api("api/items?limit=24"),
    api("api/items?status=failed&limit=100"),
  ]);
  const now = activity.now;
  const d = status.daemon || {};
  setText($("where"), `${status.config.path}${d.pid ? " · pid " + d.pid : ""}`);
  const rejected = status.config.rejected || [];
  $("banner").hidden = rejected.length === 0;
  setText($("banner"), rejected.length
    ? "The last edit of the config file was refused; the daemon runs the previous config:\n" +
      rejected.map((p) => `${p.field || "(file)"}: ${p.error}`).join("\n")
    : "");
  reconcile($("watches"), status.watches, (w) => w.name, watchCard,
    (card, w) => updateWatchCard(card, w, activity.watches[w.name], now));
  reconcile($("failed"), failed.items, (i) => i.watch + "\u0000" + i.source_id, failedRow, updateFailedRow);
  const failedTotal = status.watches.reduce((n, w) => n + w.failed, 0);
  setText($("failed-count"), failedTotal ? String(failedTotal) : "");
  $("failed-empty").hidden = failed.items.length > 0;
  reconcile($("recent"), recent.items, (i) => i.watch + "\u0000" + i.source_id, tile,
    (node, item) => updateRecentTile(node, item, now));
  $("recent-empty").hidden = recent.items.length > 0;
}

// --- ingestd serve ----------------------------------------------------------------------------

function updateServeTile(node, item) {
  const slot = item.slots[0] || {};
  setThumb(node.querySelector(".thumb"), item.thumbnail, slot.type || "item");
  setText(node.querySelector(".key"), item.key);
  setText(node.querySelector(".left"), item.slots.map((s) => s.type).join(", "));
  setText(node.querySelector(".right"), "v" + item.version);
  node.title = item.key;
}

async function refreshServe() {
  const { datasets } = await api("api/datasets");
  if (!state.dataset || !datasets.some((d) => d.name === state.dataset)) {
    state.dataset = datasets.length ? datasets[0].name : null;
  }
  $("datasets-empty").hidden = datasets.length > 0;
  reconcile($("datasets"), datasets, (d) => d.name,
    (d) => {
      const b = el("button", { type: "button", "data-dataset": d.name });
      b.addEventListener("click", () => {
        state.dataset = d.name;
        refresh();
      });
      return b;
    },
    (b, d) => {
      setText(b, `${d.name} (${d.items})`);
      b.classList.toggle("active", d.name === state.dataset);
    });
  $("items-section").hidden = !state.dataset;
  if (!state.dataset) return;
  const res = await api(`api/datasets/${encodeURIComponent(state.dataset)}/items?limit=60`);
  const count = (datasets.find((d) => d.name === state.dataset) || {}).items || 0;
  setText($("items-title"), `${state.dataset}: ${count} items` + (count > res.items.length ? `, first ${res.items.length} by key` : ""));
  reconcile($("items"), res.items, (i) => i.key, tile, updateServeTile);
}

// --- the loop ---------------------------------------------------------------------------------

function showToken() {
  const form = $("token-form");
  form.hidden = false;
  $("token").focus();
}

$("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.token = $("token").value.trim();
  sessionStorage.setItem(TOKEN_KEY, state.token);
  $("token-form").hidden = true;
  refresh();
});

async function refresh() {
  if (state.busy) return;
  state.busy = true;
  const live = $("live");
  try {
    if (state.kind === null) {
      const info = await api("api/info");
      state.kind = info.kind;
      for (const s of document.querySelectorAll("section[data-mode]")) {
        s.hidden = s.dataset.mode !== state.kind;
      }
      if (state.kind === "serve") setText($("where"), "ingestd serve");
    }
    await (state.kind === "serve" ? refreshServe() : refreshDaemon());
    live.classList.remove("down");
    setText(live, "live · " + new Date().toLocaleTimeString());
  } catch (e) {
    live.classList.add("down");
    if (e instanceof HttpError && e.status === 401) {
      setText(live, "needs a token");
      showToken();
    } else {
      setText(live, "disconnected: " + e.message);
    }
  } finally {
    state.busy = false;
  }
}

refresh();
state.timer = setInterval(refresh, POLL_MS);
