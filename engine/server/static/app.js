// The page of `engine serve`: pick or upload an image, drag a box, describe it, see the hits.
// Plain browser JavaScript, no framework and nothing fetched from outside this server.
"use strict";

const $ = (id) => document.getElementById(id);
const MAX_CANVAS = 480;
const state = {
  source: null, // {kind: "indexed", id} | {kind: "upload", file} | {kind: "region", regionId}
  image: null, // the HTMLImageElement on the canvas
  box: null, // [x1, y1, x2, y2] in image pixels
  drag: null,
  scale: 1,
  text: null, // the description of the hits shown (null: none)
  via: "attention", // how to explain them: as the search read the text
};
const blobs = new Map(); // image id -> object URL

$("token").value = localStorage.getItem("engine-token") || "";
$("token").addEventListener("change", () => localStorage.setItem("engine-token", $("token").value.trim()));

/** fetch() on this server with the bearer token; a failed answer throws its one-line error. */
async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const token = $("token").value.trim();
  if (token) headers.set("Authorization", `Bearer ${token}`);
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error || message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

/** An object URL of the indexed image `id` (fetched once: <img> cannot send the token itself). */
async function imageUrl(id) {
  if (!blobs.has(id)) blobs.set(id, URL.createObjectURL(await (await api(`/api/images/${id}`)).blob()));
  return blobs.get(id);
}

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser cannot show this image"));
    img.src = url;
  });
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "muted";
}

// -- choosing the query image --------------------------------------------------------------------
async function showGallery(offset = 0) {
  const gallery = $("gallery");
  gallery.hidden = false;
  if (offset === 0) gallery.replaceChildren();
  try {
    const { images } = await (await api(`/api/images?offset=${offset}&limit=24`)).json();
    for (const entry of images) {
      const thumb = document.createElement("img");
      thumb.alt = entry.path.split("/").pop();
      thumb.title = entry.path;
      thumb.dataset.imageId = entry.id;
      thumb.addEventListener("click", () => pickIndexed(entry.id, thumb));
      gallery.append(thumb);
      imageUrl(entry.id).then((url) => { thumb.src = url; }).catch(() => {});
    }
    gallery.querySelector("button")?.remove();
    if (images.length === 24) {
      const more = document.createElement("button");
      more.type = "button";
      more.textContent = "More images";
      more.addEventListener("click", () => showGallery(offset + 24));
      gallery.append(more);
    }
    if (offset === 0 && images.length === 0) setStatus("The index holds no images yet.");
  } catch (error) {
    setStatus(error.message, true);
  }
}

async function pickIndexed(id, thumb) {
  document.querySelectorAll(".thumbs img.selected").forEach((el) => el.classList.remove("selected"));
  thumb?.classList.add("selected");
  await setQueryImage({ kind: "indexed", id }, await imageUrl(id));
}

async function setQueryImage(source, url, box = null) {
  try {
    state.image = await loadImage(url);
  } catch (error) {
    setStatus(error.message, true);
    return;
  }
  state.source = source;
  state.box = box;
  const canvas = $("canvas");
  state.scale = Math.min(3, MAX_CANVAS / Math.max(state.image.naturalWidth, state.image.naturalHeight));
  canvas.width = Math.round(state.image.naturalWidth * state.scale);
  canvas.height = Math.round(state.image.naturalHeight * state.scale);
  canvas.hidden = false;
  $("hint").hidden = true;
  $("search").disabled = false;
  $("exclude-self").checked = source.kind === "region";
  draw();
}

$("browse").addEventListener("click", () => showGallery(0));
$("upload").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (file) setQueryImage({ kind: "upload", file }, URL.createObjectURL(file));
});

// -- drawing the box ------------------------------------------------------------------------------
function draw() {
  const canvas = $("canvas");
  const ctx = canvas.getContext("2d");
  ctx.drawImage(state.image, 0, 0, canvas.width, canvas.height);
  const readout = $("box-readout");
  if (state.box) {
    const [x1, y1, x2, y2] = state.box.map((v) => v * state.scale);
    ctx.lineWidth = 3;
    ctx.strokeStyle = "#1fbf4f";
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
    readout.textContent = `region ${state.box.join(",")}` + (state.source.kind === "region" ? " (the indexed region)" : "");
  } else {
    readout.textContent = state.source?.kind === "region" ? "" : "No box: the whole image is the query. Drag on the image to draw one.";
  }
}

function imagePoint(event) {
  const rect = $("canvas").getBoundingClientRect();
  const sx = state.image.naturalWidth / rect.width;
  const sy = state.image.naturalHeight / rect.height;
  const x = Math.min(Math.max((event.clientX - rect.left) * sx, 0), state.image.naturalWidth);
  const y = Math.min(Math.max((event.clientY - rect.top) * sy, 0), state.image.naturalHeight);
  return [x, y];
}

$("canvas").addEventListener("pointerdown", (event) => {
  if (!state.image) return;
  if (state.source.kind === "region") return; // an indexed region's box is fixed: pick an image to draw
  state.drag = imagePoint(event);
  $("canvas").setPointerCapture(event.pointerId);
});
$("canvas").addEventListener("pointermove", (event) => {
  if (!state.drag) return;
  const [x, y] = imagePoint(event);
  const [ax, ay] = state.drag;
  state.box = [Math.min(ax, x), Math.min(ay, y), Math.max(ax, x), Math.max(ay, y)].map(Math.round);
  draw();
});
$("canvas").addEventListener("pointerup", () => {
  state.drag = null;
  if (state.box && (state.box[2] - state.box[0] < 2 || state.box[3] - state.box[1] < 2)) state.box = null;
  draw();
});
$("clear-box").addEventListener("click", () => {
  if (state.source?.kind === "region") return;
  state.box = null;
  if (state.image) draw();
});

// -- searching ------------------------------------------------------------------------------------
/** k and the filters of the form, as the API names them (empty ones left out). */
function filters() {
  const out = { k: Number($("k").value) || 10, max_per_image: Number($("per-image").value) || 0 };
  const glob = $("path-glob").value.trim();
  if (glob) out.path_glob = glob;
  if ($("min-score").value !== "") out.min_score = Number($("min-score").value);
  return out;
}

function options() {
  const out = { ...filters(), exclude_self: $("exclude-self").checked };
  const text = $("text").value.trim();
  if (text) out.text = text;
  return out;
}

async function search(body, label) {
  setStatus(`Searching ${label}…`);
  $("hits").replaceChildren();
  const start = performance.now();
  try {
    const request = body instanceof FormData ? { method: "POST", body } : { method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json" } };
    const { hits } = await (await api("/api/search", request)).json();
    const ms = Math.round(performance.now() - start);
    setStatus(hits.length ? `${hits.length} hits for ${label} (${ms} ms)` : `No hits for ${label}.`);
    state.text = (body instanceof FormData ? body.get("text") : body.text) || null;
    state.via = hits.some((hit) => "concept" in (hit.scores || {})) ? "vocabulary" : "attention"; // as `engine query --explain`
    hits.forEach((hit, i) => $("hits").append(hitCard(hit, i + 1)));
    showExplanations();
  } catch (error) {
    setStatus(error.message, true);
  }
}

$("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const source = state.source;
  if (!source) return;
  const opts = options();
  if (source.kind === "region") return search({ region_id: source.regionId, ...opts }, `more like region ${source.regionId}`);
  if (source.kind === "upload") {
    const form = new FormData();
    form.append("image", source.file);
    if (state.box) form.append("region", state.box.join(","));
    for (const [key, value] of Object.entries(opts)) form.append(key, String(value));
    return search(form, state.box ? "the box on the uploaded image" : "the uploaded image");
  }
  return search({ image: source.id, ...(state.box ? { region: state.box } : {}), ...opts }, state.box ? "the box" : "the whole image");
});

$("text-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("text-only").value.trim();
  if (!text) return;
  search({ text, ...filters() }, `“${text}”`);
});

// -- the hits ---------------------------------------------------------------------------------------
function hitCard(hit, rank) {
  const card = document.createElement("figure");
  card.className = "hit";
  card.dataset.regionId = hit.region_id;
  card.title = "Click: more like this region";
  const canvas = document.createElement("canvas");
  const caption = document.createElement("figcaption");
  const parts = Object.entries(hit.scores || {}).map(([k, v]) => `${k} ${v.toFixed(3)}`).join(" · ");
  caption.innerHTML = `<div><span class="rank">#${rank}</span> <span class="score">${hit.score.toFixed(4)}</span> <span class="muted">region ${hit.region_id}</span></div><div class="parts"></div><div class="path"></div>`;
  caption.querySelector(".parts").textContent = parts;
  caption.querySelector(".path").textContent = hit.image.split("/").pop();
  caption.querySelector(".path").title = hit.image;
  card.append(canvas, caption);
  drawHit(canvas, hit).catch((error) => { caption.querySelector(".path").textContent = `${hit.image} (${error.message})`; });
  card.addEventListener("click", () => moreLikeThis(hit));
  return card;
}

async function drawHit(canvas, hit) {
  const region = await (await api(`/api/regions/${hit.region_id}`)).json();
  const img = await loadImage(await imageUrl(region.image_id));
  const scale = Math.min(3, 320 / Math.max(img.naturalWidth, img.naturalHeight));
  canvas.width = Math.round(img.naturalWidth * scale);
  canvas.height = Math.round(img.naturalHeight * scale);
  const ctx = canvas.getContext("2d");
  ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
  const [x1, y1, x2, y2] = hit.box.map((v) => v * scale);
  ctx.lineWidth = 3;
  ctx.strokeStyle = "#e0321f";
  ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
  canvas.dataset.drawn = "1";
}

/** With the toggle on and a description searched, each hit's explanation map under its picture. */
function showExplanations() {
  const on = $("explain").checked && state.text;
  for (const card of document.querySelectorAll(".hit")) {
    let picture = card.querySelector("img.explain");
    if (!on) {
      if (picture) picture.hidden = true;
      continue;
    }
    if (!picture) {
      picture = document.createElement("img");
      picture.className = "explain";
      picture.alt = `where “${state.text}” is in this image`;
      card.insertBefore(picture, card.querySelector("figcaption"));
      const query = new URLSearchParams({ text: state.text, via: state.via });
      api(`/api/regions/${card.dataset.regionId}/explain?${query}`)
        .then((response) => response.blob())
        .then((blob) => { picture.src = URL.createObjectURL(blob); picture.dataset.loaded = "1"; })
        .catch((error) => { picture.replaceWith(Object.assign(document.createElement("p"), { className: "error", textContent: error.message })); });
    }
    picture.hidden = false;
  }
  if ($("explain").checked && !state.text && document.querySelector(".hit")) setStatus("Explanation maps need a description: type one and search again.");
}
$("explain").addEventListener("change", showExplanations);

async function moreLikeThis(hit) {
  try {
    const region = await (await api(`/api/regions/${hit.region_id}`)).json();
    await setQueryImage({ kind: "region", regionId: hit.region_id }, await imageUrl(region.image_id), region.box);
    window.scrollTo({ top: 0, behavior: "smooth" });
    $("search-form").requestSubmit();
  } catch (error) {
    setStatus(error.message, true);
  }
}
