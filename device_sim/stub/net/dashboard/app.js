// The emulator dashboard: polls api/state and renders it; actions POST with the token in a
// header (the server refuses a POST without it). Data goes into the page as text only.
"use strict";

const TOKEN = location.pathname.split("/")[2] || "";
const POLL_MS = 1500;
let seen = null; // registrationId -> lastUpdated, to mark what changed since the last poll

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(child == null ? "" : String(child)));
  }
  return node;
}

function badge(text, kind) {
  return el("span", { class: "badge " + kind }, text);
}

function fill(tableId, rows, empty) {
  const body = document.querySelector("#" + tableId + " tbody");
  const columns = document.querySelectorAll("#" + tableId + " thead th").length;
  body.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { class: "empty", colspan: columns }, empty))]));
}

function setStatus(text, isError) {
  const node = document.getElementById("status");
  node.textContent = text;
  node.className = "status" + (isError ? " error" : "");
}

async function call(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: { "X-Dashboard-Token": TOKEN, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.error || "HTTP " + response.status);
  return data;
}

async function act(label, method, path, body) {
  const node = document.getElementById("action");
  try {
    await call(method, path, body);
    node.textContent = label;
    node.className = "action";
  } catch (err) {
    node.textContent = label + " failed: " + err.message;
    node.className = "action error";
  }
  refresh();
}

function renderCas(cas) {
  fill("cas", cas.map((ca) => el("tr", { "data-name": ca.name },
    el("td", {}, ca.name),
    el("td", {}, ca.verified ? badge("verified", "ok") : badge("unverified", "warn")),
    el("td", {}, ca.subject),
    el("td", {}, ca.expiry))), "no CA certificates");
}

function renderEnrollments(entries) {
  fill("enrollments", entries.map((entry) => {
    const next = !entry.enabled;
    const path = "api/enrollments/" + encodeURIComponent(entry.kind) + "/" + encodeURIComponent(entry.id) + "/enabled";
    return el("tr", { "data-id": entry.id },
      el("td", {}, entry.kind),
      el("td", {}, entry.id),
      el("td", { class: "state" }, entry.enabled ? badge("enabled", "ok") : badge("disabled", "bad")),
      el("td", {}, entry.attestation),
      el("td", {}, entry.allocation),
      el("td", {}, entry.hubs.join(", ") || "all"),
      el("td", {}, el("button", {
        onclick: () => act((next ? "enabled " : "disabled ") + entry.kind + " " + entry.id, "POST", path, { enabled: next }),
      }, next ? "Enable" : "Disable")));
  }), "no enrollments");
}

function renderRegistrations(records, total) {
  const previous = seen;
  seen = new Map(records.map((r) => [r.registrationId, r.lastUpdatedDateTimeUtc]));
  document.getElementById("registration-count").textContent =
    total > records.length ? "(newest " + records.length + " of " + total + ")" : "(" + total + ")";
  fill("registrations", records.map((r) => {
    const kind = r.status === "assigned" ? "ok" : r.status === "disabled" || r.status === "failed" ? "bad" : "warn";
    const fresh = previous !== null && previous.get(r.registrationId) !== r.lastUpdatedDateTimeUtc;
    return el("tr", { "data-id": r.registrationId, class: fresh ? "fresh" : "" },
      el("td", {}, r.registrationId),
      el("td", { title: r.errorMessage || "" }, badge(r.status, kind)),
      el("td", {}, r.assignedHub),
      el("td", {}, r.deviceId),
      el("td", {}, (r.lastUpdatedDateTimeUtc || "").replace("T", " ").slice(0, 19)),
      el("td", {}, el("button", {
        class: "danger",
        onclick: () => act("deleted " + r.registrationId, "POST",
          "api/registrations/" + encodeURIComponent(r.registrationId) + "/delete"),
      }, "Delete")));
  }), "no registrations yet");
}

function renderThroughput(buckets) {
  const max = Math.max(1, ...buckets.map((b) => b.count));
  document.getElementById("throughput").replaceChildren(...buckets.map((b) => {
    const bar = el("div", { class: "bar", title: b.start.slice(11, 19) + " UTC: " + b.count },
      b.count ? el("span", {}, b.count) : "");
    bar.style.height = Math.round((100 * b.count) / max) + "%"; // CSSOM, which the CSP allows
    return bar;
  }));
}

function renderFaults(faults) {
  const section = document.getElementById("faults-section");
  section.hidden = faults === null || faults === undefined;
  if (!section.hidden) document.getElementById("faults").textContent = JSON.stringify(faults, null, 2);
}

async function refresh() {
  try {
    const state = await call("GET", "api/state");
    document.getElementById("scope").textContent = "ID scope " + state.idScope;
    renderThroughput(state.throughput);
    renderCas(state.cas);
    renderEnrollments(state.enrollments);
    renderRegistrations(state.registrations, state.registrationCount);
    renderFaults(state.faults);
    setStatus("updated " + state.now.slice(11, 19) + " UTC", false);
  } catch (err) {
    setStatus("emulator not answering: " + err.message, true);
  }
}

refresh();
setInterval(refresh, POLL_MS);
