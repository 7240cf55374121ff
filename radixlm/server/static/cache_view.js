// The live radix-tree page: polls GET /cache with the API key and draws the tree as an icicle
// (width by tokens, one row per tree level), with counters over time beside it.
"use strict";
(function () {
  const POLL_MS = 1000;
  const HISTORY = 120;
  const ROW = 26;
  const NS = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);
  const fragKey = new URLSearchParams(location.hash.slice(1)).get("key");
  let key = fragKey || sessionStorage.getItem("radixlm-key") || "";
  const history = [];
  let lastEvicted = null;
  let lastTime = null;
  let latest = null;

  $("key").value = key;
  $("keyform").addEventListener("submit", (e) => {
    e.preventDefault();
    key = $("key").value;
    sessionStorage.setItem("radixlm-key", key);
    poll();
  });
  $("colour").addEventListener("change", () => latest && draw(latest));

  function el(name, attrs, parent) {
    const node = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (parent) parent.appendChild(node);
    return node;
  }

  function hue(s) {
    let h = 0;
    for (const c of s) h = (h * 31 + c.charCodeAt(0)) >>> 0;
    return h % 360;
  }

  function colour(n, clock) {
    const mode = $("colour").value;
    if (mode === "tenant") return n.tenant === null ? "#9aa5b1" : `hsl(${hue(n.tenant)},60%,60%)`;
    if (mode === "tier") return n.tier === "pool" ? "#5a9bd4" : "#d4a05a";
    const age = Math.max(0, clock - n.last_access);
    const fresh = Math.exp(-age / 50);  // recent accesses warm, old ones cool
    return `hsl(${Math.round(220 - 200 * fresh)},70%,${Math.round(70 - 15 * fresh)}%)`;
  }

  function layout(data) {
    const byId = new Map();
    for (const n of data.nodes) byId.set(n.id, { ...n, kids: [], total: n.tokens + n.more_tokens });
    const roots = [];
    for (const n of byId.values()) {
      const p = byId.get(n.parent);
      if (p) p.kids.push(n);
      else roots.push(n);
    }
    const sum = (n) => {
      for (const k of n.kids) n.total += sum(k);
      return n.total;
    };
    let total = 0;
    for (const r of roots) total += sum(r);
    return { roots, total };
  }

  function draw(data) {
    latest = data;
    const svg = $("tree");
    svg.replaceChildren();
    const defs = el("defs", {}, svg);
    const hatch = el("pattern", { id: "hatch", width: 6, height: 6, patternUnits: "userSpaceOnUse" }, defs);
    el("rect", { width: 6, height: 6, fill: "#e4e4e4" }, hatch);
    el("path", { d: "M0,6 L6,0", stroke: "#bbb" }, hatch);
    const width = svg.clientWidth || 800;
    const { roots, total } = layout(data);
    let levels = 0;
    const place = (n, x, w, level) => {
      levels = Math.max(levels, level + 1);
      const own = (w * n.tokens) / n.total;
      const rect = el("rect", {
        x: x, y: level * ROW, width: Math.max(w, 0.5), height: ROW - 2,
        fill: colour(n, data.clock), class: n.pinned ? "node pinned" : "node",
        "data-id": n.id, "data-tokens": n.tokens, "data-depth": n.depth,
        "data-tenant": n.tenant === null ? "" : n.tenant, "data-text": n.text,
      }, svg);
      rect.addEventListener("mousemove", (e) => tip(e, n));
      rect.addEventListener("mouseleave", () => ($("tip").hidden = true));
      if (w > 40) {
        const label = el("text", { x: x + 4, y: level * ROW + 16 }, svg);
        label.textContent = n.text.replace(/\s+/g, " ").slice(0, Math.floor(w / 7));
      }
      let cx = x;  // children from the left edge; the node's own share stays at the right
      for (const k of n.kids.sort((a, b) => b.total - a.total)) {
        const kw = (w * k.total) / n.total;
        place(k, cx, kw, level + 1);
        cx += kw;
      }
      if (n.more_tokens > 0) {
        const mw = (w * n.more_tokens) / n.total;
        const more = el("rect", { x: cx, y: (level + 1) * ROW, width: mw, height: ROW - 2, class: "more" }, svg);
        more.addEventListener("mousemove", (e) => tipText(e, `${n.more_nodes} more nodes, ${n.more_tokens} tokens`));
        more.addEventListener("mouseleave", () => ($("tip").hidden = true));
        levels = Math.max(levels, level + 2);
      }
    };
    let x = 0;
    for (const r of roots.sort((a, b) => b.total - a.total)) {
      const w = (width * r.total) / total;
      place(r, x, w, 0);
      x += w;
    }
    svg.style.height = Math.max(120, levels * ROW + 4) + "px";
    $("summary").textContent =
      `${data.visible_nodes} nodes, ${data.visible_tokens} tokens` +
      (data.tenant === null ? " (whole tree)" : ` (tenant ${data.tenant} and public prefixes)`) +
      (data.nodes.length < data.visible_nodes ? `; ${data.nodes.length} largest shown` : "");
    legend(data);
    $("pins").textContent = data.pins.length
      ? "pins: " + data.pins.map((p) => `${p.pin_id} (${p.tenant || "-"}, ${p.tokens} tokens, ${Math.round(p.expires_in_s)} s)`).join("; ")
      : "no pins";
  }

  function legend(data) {
    const box = $("legend");
    box.replaceChildren();
    const mode = $("colour").value;
    const items = mode === "tenant"
      ? [...new Set(data.nodes.map((n) => n.tenant))].map((t) => [t === null ? "shared" : t, colour({ tenant: t }, 0)])
      : mode === "tier" ? [["pool", "#5a9bd4"], ["disk", "#d4a05a"]]
      : [["just used", colour({ last_access: 1 }, 1)], ["long ago", colour({ last_access: 0 }, 400)]];
    for (const [name, c] of items) {
      const span = document.createElement("span");
      const sw = document.createElement("i");
      sw.style.background = c;
      span.append(sw, name);
      box.append(span);
    }
  }

  function tipText(e, text) {
    const t = $("tip");
    t.textContent = text;
    t.hidden = false;
    t.style.left = Math.min(e.clientX + 12, innerWidth - 440) + "px";
    t.style.top = e.clientY + 12 + "px";
  }

  function tip(e, n) {
    tipText(e,
      `${JSON.stringify(n.text)}\n` +
      `tokens ${n.tokens} (depth ${n.depth}), hits ${n.hits}, locks ${n.lock_ref}` +
      `${n.pinned ? ", pinned" : ""}\ntier ${n.tier}, tenant ${n.tenant === null ? "shared" : n.tenant}`);
  }

  function chart(id, values, max) {
    const svg = $(id);
    svg.replaceChildren();
    const w = svg.clientWidth || 280, h = svg.clientHeight || 60;
    const top = max ?? Math.max(1e-9, ...values);
    const pts = values.map((v, i) => `${(i / (HISTORY - 1)) * w},${h - 2 - (v / top) * (h - 4)}`);
    el("polyline", { points: pts.join(" ") }, svg);
  }

  function record(stats) {
    const now = performance.now() / 1000;
    const rate = lastEvicted === null ? 0 : (stats.evicted_tokens - lastEvicted) / Math.max(now - lastTime, 1e-3);
    lastEvicted = stats.evicted_tokens;
    lastTime = now;
    const pool = 1 - stats.free_slots / stats.pool_slots;
    history.push({ hit: stats.cache_hit_rate, evict: rate, pool });
    if (history.length > HISTORY) history.shift();
    chart("c-hit", history.map((s) => s.hit), 1);
    chart("c-evict", history.map((s) => s.evict));
    chart("c-pool", history.map((s) => s.pool), 1);
    $("v-hit").textContent = (100 * stats.cache_hit_rate).toFixed(1) + "%";
    $("v-evict").textContent = rate.toFixed(0);
    $("v-pool").textContent = (100 * pool).toFixed(1) + "%";
  }

  async function poll() {
    try {
      const r = await fetch("/cache?max_nodes=400", { headers: key ? { Authorization: "Bearer " + key } : {} });
      const data = await r.json();
      if (!r.ok) throw new Error(data.error ? data.error.message : r.statusText);
      draw(data);
      if (data.stats) record(data.stats);
      $("side").querySelectorAll("figure").forEach((f) => (f.hidden = !data.stats));
      $("status").textContent = "live, updated " + new Date().toLocaleTimeString();
      $("status").className = "";
    } catch (err) {
      $("status").textContent = String(err.message || err);
      $("status").className = "error";
    }
  }

  poll();
  setInterval(poll, POLL_MS);
})();
