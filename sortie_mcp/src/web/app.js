// Sortie's web view (SPEC §16). The server draws the DAG (SVG); this script lists campaigns,
// swaps the drawing in, redraws when server-sent events say the campaign changed, and shows
// a step's details on click. The token travels in an HttpOnly cookie set by /?token=….
"use strict";

const state = { campaign: null, nodes: new Map(), selected: null, reload: null, listReload: null };

// The token came in the address; the cookie holds it now, so take it out of the address bar.
if (location.search.includes("token=")) {
  history.replaceState(null, "", location.pathname + location.hash);
}

function el(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes || {})) {
    if (key === "class") node.className = value; else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

async function getJson(url) {
  const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
  return body;
}

function counts(stepCounts) {
  return ["running", "pending", "waiting_input", "done", "failed", "skipped"]
    .filter((s) => stepCounts && stepCounts[s])
    .map((s) => `${stepCounts[s]} ${s}`).join(" · ") || "no steps";
}

async function loadCampaigns() {
  const nav = document.getElementById("campaigns");
  try {
    const answer = await getJson("/api/campaigns");
    nav.replaceChildren();
    if (answer.campaigns.length === 0) nav.append(el("p", { class: "muted" }, "No campaigns yet."));
    for (const c of answer.campaigns) {
      const link = el("a", { href: `#campaign=${c.id}`, "data-id": c.id },
        el("span", { class: "name" }, c.name),
        el("span", { class: "meta" }, `${c.status} · ${c.open_steps} open · ${c.priority}`));
      if (c.id === state.campaign) link.classList.add("selected");
      nav.append(link);
    }
    if (!state.campaign && answer.campaigns.length > 0 && !location.hash) {
      location.hash = `campaign=${answer.campaigns[0].id}`;
    }
  } catch (e) {
    nav.replaceChildren(el("p", { class: "muted" }, `Cannot list campaigns: ${e.message}`));
  }
}

async function loadCampaign() {
  const id = state.campaign;
  if (!id) return;
  try {
    const answer = await getJson(`/api/campaigns/${id}`);
    if (id !== state.campaign) return;
    const c = answer.graph.campaign;
    document.getElementById("summary").replaceChildren(
      el("h2", {}, `${c.name} `, el("span", { class: "muted" }, `(${c.status})`)),
      el("div", { class: "goal" }, c.goal),
      el("div", {}, counts(answer.graph.step_counts)));
    state.nodes = new Map(answer.graph.nodes.map((n) => [String(n.id), n]));
    const dag = document.getElementById("dag");
    dag.innerHTML = answer.svg;
    dag.dataset.campaign = id;
    for (const g of dag.querySelectorAll("g.step")) {
      g.addEventListener("click", () => showStep(g.dataset.id));
      if (g.dataset.id === state.selected) g.classList.add("selected");
    }
    if (state.selected && state.nodes.has(state.selected)) showStep(state.selected, true);
  } catch (e) {
    document.getElementById("summary").replaceChildren(el("p", { class: "muted" }, `Cannot load the campaign: ${e.message}`));
  }
}

function field(list, name, value) {
  if (value === undefined || value === null || value === "") return;
  list.append(el("dt", {}, name), el("dd", {}, String(value)));
}

async function showStep(id, keepOutput) {
  const node = state.nodes.get(String(id));
  if (!node) return;
  state.selected = String(id);
  for (const g of document.querySelectorAll("#dag g.step")) g.classList.toggle("selected", g.dataset.id === state.selected);
  const panel = document.getElementById("details");
  panel.hidden = false;
  document.getElementById("details-title").textContent = `#${node.id} ${node.action}`;
  const list = document.getElementById("details-fields");
  list.replaceChildren();
  const status = el("span", { class: `status chip s-${node.status}` }, node.status);
  list.append(el("dt", {}, "status"), el("dd", {}, status));
  field(list, "type", node.step_type);
  field(list, "agent", node.agent);
  field(list, "attempts", node.step_type === "atomic" ? `${node.tries ?? node.attempts} (${node.attempts} failed; at most ${node.max_attempts})` : null);
  field(list, "duration", node.duration_ms != null ? `${(node.duration_ms / 1000).toFixed(1)} s` : null);
  field(list, "claimed by", node.claim_owner);
  field(list, "lease until", node.lease_expires_at);
  field(list, "inside", node.parent_id && !node.spawned_by ? `#${node.parent_id}` : null);
  field(list, "spawned by", node.spawned_by ? `#${node.spawned_by}` : null);
  field(list, "continues", node.continuation_of ? `#${node.continuation_of}` : null);
  field(list, "continued by", node.continued_by ? `#${node.continued_by}` : null);
  field(list, "skipped because", node.skip_cause);
  field(list, "question", node.question);
  field(list, "error", node.error);
  field(list, "started", node.started_at);
  field(list, "finished", node.completed_at);
  const output = document.getElementById("details-output");
  if (!keepOutput) output.textContent = "…";
  try {
    const answer = await getJson(`/api/steps/${node.id}/output`);
    output.textContent = answer.content || "(no output yet)";
    if (answer.next_offset != null) output.textContent += `\n… ${answer.total_chars - answer.returned_chars} more characters`;
  } catch (e) {
    output.textContent = `Cannot read the output: ${e.message}`;
  }
}

function fromHash() {
  const match = /campaign=([0-9a-f-]{36})/.exec(location.hash);
  const id = match ? match[1] : null;
  if (id !== state.campaign) {
    state.campaign = id;
    state.selected = null;
    document.getElementById("details").hidden = true;
    for (const a of document.querySelectorAll("nav a")) a.classList.toggle("selected", a.dataset.id === id);
    loadCampaign();
  }
}

function soon(which, run, delay) {
  if (state[which]) return;
  state[which] = setTimeout(() => { state[which] = null; run(); }, delay);
}

function listen() {
  const live = document.getElementById("live");
  const source = new EventSource("/api/events");
  source.addEventListener("ready", () => { live.textContent = "live"; live.className = "live on"; });
  source.onmessage = (message) => {
    const event = JSON.parse(message.data);
    if (event.campaign_id && event.campaign_id === state.campaign) soon("reload", loadCampaign, 150);
    soon("listReload", loadCampaigns, 1000);
  };
  source.onerror = () => { live.textContent = "reconnecting…"; live.className = "live off"; };
}

document.getElementById("close").addEventListener("click", () => {
  document.getElementById("details").hidden = true;
  state.selected = null;
  for (const g of document.querySelectorAll("#dag g.step")) g.classList.remove("selected");
});
window.addEventListener("hashchange", fromHash);
fromHash();
loadCampaigns();
listen();
