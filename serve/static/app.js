// The search page: no build step, no CDN. The query lives in the URL (?text=..|?id=..&modality=..,
// &target=, &k=) so a search can be shared; image uploads go to /search/image.
"use strict";
const $ = (id) => document.getElementById(id);
let info = null;

function showError(message) {
  const el = $("error");
  el.textContent = message;
  el.hidden = !message;
}

function render(answer, target) {
  $("meta").textContent = `${answer.results.length} results in ${answer.took_ms.toFixed(1)} ms · model ${answer.model} · ${answer.bits} bits`;
  const grid = $("results");
  grid.replaceChildren();
  for (const r of answer.results) {
    const card = document.createElement("div");
    card.className = "card result";
    card.dataset.id = r.id;
    card.title = `search for items like #${r.id}`;
    if (r.image_url) {
      const img = document.createElement("img");
      img.src = r.image_url;
      img.alt = r.caption || `item ${r.id}`;
      img.loading = "lazy";
      card.append(img);
    }
    const cap = document.createElement("div");
    cap.className = "cap";
    cap.textContent = r.caption || `#${r.id}`;
    const dist = document.createElement("div");
    dist.className = "dist";
    dist.textContent = `#${r.id} · distance ${r.distance}`;
    card.append(cap, dist);
    // a result is an item of the target modality: search for what is like it
    card.addEventListener("click", () => go({ id: String(r.id), modality: target, target: $("target").value, k: $("k").value }));
    grid.append(card);
  }
}

async function post(url, options, target) {
  showError("");
  const response = await fetch(url, options);
  let body = null;
  try { body = await response.json(); } catch (e) { body = { error: `HTTP ${response.status}` }; }
  if (!response.ok) {
    showError(body.error || `HTTP ${response.status}`);
    return;
  }
  render(body, target);
}

function runFromUrl() {
  const p = new URLSearchParams(location.search);
  // default target: the other modality (a text query finds images; an item, the other kind)
  const target = p.get("target") || (p.get("id") && p.get("modality") === "image" ? "text" : "image");
  if (p.get("text") || p.get("id")) $("target").value = target;
  if (p.get("k")) $("k").value = p.get("k");
  const k = Number($("k").value);
  if (p.get("text")) {
    $("text").value = p.get("text");
    return post("/search", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ text: p.get("text"), target, k }) }, target);
  }
  if (p.get("id")) {
    return post("/search", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ id: Number(p.get("id")), modality: p.get("modality") || "image", target, k }) }, target);
  }
}

function go(params) {
  const p = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== undefined && v !== ""));
  history.pushState(null, "", `?${p}`);
  runFromUrl();
}

function upload(file) {
  if (!file) return;
  const target = $("target").value;
  const form = new FormData();
  form.append("file", file);
  form.append("k", $("k").value);
  form.append("target", target);
  history.pushState(null, "", "?upload=1");
  post("/search/image", { method: "POST", body: form }, target);
}

$("query").addEventListener("submit", (e) => {
  e.preventDefault();
  go({ text: $("text").value, target: $("target").value, k: $("k").value });
});
$("file").addEventListener("change", (e) => upload(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); upload(e.dataTransfer.files[0]); });
window.addEventListener("popstate", runFromUrl);

fetch("/info").then((r) => r.json()).then((i) => {
  info = i;
  const sizes = Object.entries(i.indexes).map(([m, x]) => `${x.size} ${m}s`).join(", ");
  $("status").textContent = `model ${i.model} · ${i.bits} bits · ${sizes}`;
  $("k").max = i.max_k;
  runFromUrl();
}).catch(() => showError("the server did not answer /info"));
