// The upload page: plain browser JavaScript against the public API (/v1/jobs), nothing else.
// The API key travels as the X-API-Key header, so the event stream, the overlay and the downloads
// are fetched with fetch() (EventSource, <video src> and <a href> cannot send a header).
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "stemseg-api-key";
const state = { job: null, tracks: [], selected: null, objectUrls: [] };

class ApiError extends Error {
  constructor(problem) {
    super(problem.detail || problem.title);
    this.problem = problem;
  }
}

function authHeaders() {
  const key = sessionStorage.getItem(KEY);
  return key ? { "X-API-Key": key } : {};
}

function sleep(ms) { return new Promise((resolve) => setTimeout(resolve, ms)); }

// A problem+json body as the API sent it, or the status line when the answer is something else.
function problemFrom(status, statusText, text) {
  try {
    const body = JSON.parse(text);
    if (body && body.title) return body;
  } catch (e) { /* not JSON */ }
  return { title: `${status} ${statusText || ""}`.trim(), detail: text ? text.slice(0, 300) : "", status };
}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  } catch (e) {
    throw new ApiError({ title: "Network error", detail: "the server could not be reached" });
  }
  if (!response.ok) throw new ApiError(problemFrom(response.status, response.statusText, await response.text()));
  return response;
}

function showError(error) {
  const p = error instanceof ApiError ? error.problem : { title: "Error", detail: String(error) };
  const lines = [p.title + (p.detail ? `: ${p.detail}` : "")];
  for (const e of p.errors || []) lines.push(`${(e.loc || []).join(".")}: ${e.msg}`);
  $("error").textContent = lines.join("\n");
  $("error").hidden = false;
}

function clearError() { $("error").hidden = true; $("error").textContent = ""; }

function setProgress(id, fraction, text) {
  $(id).value = Math.max(0, Math.min(1, fraction));
  $(id.replace("progress", "text")).textContent = text;
}

// --- API key --------------------------------------------------------------------------------
function initKey() {
  $("api-key").value = sessionStorage.getItem(KEY) || "";
  $("key-state").textContent = sessionStorage.getItem(KEY) ? "key in use" : "no key";
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (key) sessionStorage.setItem(KEY, key); else sessionStorage.removeItem(KEY);
    $("key-state").textContent = key ? "key in use" : "no key";
    clearError();
    refreshJobs();
  });
}

// --- choosing a file ------------------------------------------------------------------------
function chosenFile() { return $("file").files[0] || null; }

function initFilePicker() {
  const drop = $("drop");
  const update = () => {
    const file = chosenFile();
    $("file-name").textContent = file ? `${file.name} (${(file.size / 1048576).toFixed(1)} MiB)` : "no file chosen";
    $("upload-button").disabled = !file;
  };
  $("file").addEventListener("change", update);
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    if (event.dataTransfer.files.length) {
      $("file").files = event.dataTransfer.files;
      update();
    }
  });
  $("upload-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const file = chosenFile();
    if (file) submit(file);
  });
}

// --- upload, with progress (XMLHttpRequest: fetch() reports no upload progress) ---------------
function upload(file, formats) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", `/v1/jobs?formats=${encodeURIComponent(formats.join(","))}`);
    for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) {
        setProgress("upload-progress", event.loaded / event.total,
          `${(event.loaded / 1048576).toFixed(1)} of ${(event.total / 1048576).toFixed(1)} MiB`);
      }
    });
    xhr.addEventListener("load", () => {
      if (xhr.status === 202) resolve(JSON.parse(xhr.responseText));
      else reject(new ApiError(problemFrom(xhr.status, xhr.statusText, xhr.responseText)));
    });
    xhr.addEventListener("error", () => reject(new ApiError({ title: "Network error",
      detail: "the upload did not reach the server" })));
    const form = new FormData();
    form.append("file", file, file.name);
    xhr.send(form);
  });
}

async function submit(file) {
  clearError();
  const formats = [...document.querySelectorAll("input[name=format]:checked")].map((box) => box.value);
  $("upload-button").disabled = true;
  setProgress("upload-progress", 0, "starting");
  setProgress("process-progress", 0, "");
  try {
    const job = await upload(file, formats);
    setProgress("upload-progress", 1, "uploaded");
    await showJob(job);
    refreshJobs();
    await follow(job);
  } catch (e) {
    showError(e);
  } finally {
    $("upload-button").disabled = !chosenFile();
  }
}

// --- following a job: server-sent events read from a fetch() stream, resumed with Last-Event-ID
function parseEvent(block) {
  const event = { id: null, type: "message", data: "" };
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "id") event.id = value;
    else if (field === "event") event.type = value;
    else if (field === "data") event.data += (event.data ? "\n" : "") + value;
  }
  return event;
}

async function follow(job) {
  const total = job.progress.frames_total || job.video.num_frames || 1;
  let lastId = null;
  let framesDone = job.progress.frames_done || 0;
  setProgress("process-progress", framesDone / total, `${framesDone} of ${total} frames`);
  for (let attempt = 0; attempt < 30; attempt++) {
    let ended = false;
    try {
      const response = await api(job.links.events, { headers: lastId ? { "Last-Event-ID": lastId } : {} });
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      while (!ended) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
        let cut;
        while (!ended && (cut = buffer.indexOf("\n\n")) >= 0) {
          const event = parseEvent(buffer.slice(0, cut));
          buffer = buffer.slice(cut + 2);
          if (event.id) lastId = event.id;
          const data = event.data ? JSON.parse(event.data) : {};
          if (event.type === "frame") {
            framesDone = Math.max(framesDone, data.frame + 1);
            setProgress("process-progress", framesDone / total, `${framesDone} of ${total} frames`);
          } else if (event.type === "status") {
            $("job-status").textContent = data.status;
          } else if (event.type === "end") {
            ended = true;
          }
        }
      }
    } catch (e) {
      if (e instanceof ApiError && e.problem.status && e.problem.status !== 503) throw e;
    }
    if (ended) break;
    await sleep(1000); // dropped: reconnect from the last event seen
  }
  const final = await (await api(job.links.self)).json();
  if (final.status === "succeeded") setProgress("process-progress", 1, `${total} of ${total} frames`);
  await showJob(final);
  refreshJobs();
}

// --- a job's results ------------------------------------------------------------------------
function revokeUrls() {
  for (const url of state.objectUrls) URL.revokeObjectURL(url);
  state.objectUrls = [];
}

async function showJob(job) {
  state.job = job;
  $("job").hidden = false;
  $("job-id").textContent = job.id;
  $("job-status").textContent = job.status;
  $("job-warning").hidden = !job.warning;
  $("job-warning").textContent = job.warning ? `Note: ${job.warning}` : "";
  if (job.status === "failed") showError(new ApiError({ title: "The job failed", detail: job.error || "" }));
  if (job.status !== "succeeded") {
    renderTracks([]);
    $("downloads").replaceChildren();
    return;
  }
  revokeUrls();
  const formats = job.options.formats || [];
  renderDownloads(job, formats);
  if (formats.includes("ytvis")) {
    const result = await (await api(job.links.result)).json();
    renderTracks(result.tracks);
  } else {
    renderTracks([], "this job was not asked for the ytvis output, which lists the tracks");
  }
  const video = $("overlay");
  if (formats.includes("overlay")) {
    const blob = await (await api(job.links.overlay)).blob();
    const url = URL.createObjectURL(blob);
    state.objectUrls.push(url);
    video.src = url;
    video.hidden = false;
  } else {
    video.removeAttribute("src");
    video.hidden = true;
  }
}

function framesOf(track) {
  const present = [];
  track.segmentations.forEach((rle, i) => { if (rle) present.push(i); });
  return present.length ? [present[0], present[present.length - 1]] : [null, null];
}

function renderTracks(tracks, emptyText) {
  state.tracks = tracks;
  state.selected = null;
  const body = $("tracks").tBodies[0];
  body.replaceChildren();
  if (!tracks.length) {
    const row = body.insertRow();
    const cell = row.insertCell();
    cell.colSpan = 6;
    cell.textContent = emptyText || "no tracks";
    drawHighlight();
    return;
  }
  tracks.forEach((track, index) => {
    const [first, last] = framesOf(track);
    const row = body.insertRow();
    row.dataset.index = index;
    row.setAttribute("aria-selected", "false");
    for (const text of [track.id, track.category || track.category_id, track.score.toFixed(3), first, last]) {
      row.insertCell().textContent = text === null ? "-" : String(text);
    }
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = "Show";
    button.setAttribute("aria-pressed", "false");
    button.setAttribute("aria-label", `show track ${track.id} in the player`);
    button.addEventListener("click", () => selectTrack(index));
    row.insertCell().append(button);
    row.addEventListener("click", (event) => { if (event.target.tagName !== "BUTTON") selectTrack(index); });
  });
  drawHighlight();
}

function selectTrack(index) {
  state.selected = state.selected === index ? null : index;
  for (const row of $("tracks").tBodies[0].rows) {
    const on = Number(row.dataset.index) === state.selected;
    row.setAttribute("aria-selected", String(on));
    const button = row.querySelector("button");
    if (button) button.setAttribute("aria-pressed", String(on));
  }
  const video = $("overlay");
  const fps = (state.job && state.job.video.fps) || 25;
  if (state.selected !== null && video.src) {
    const [first] = framesOf(state.tracks[state.selected]);
    if (first !== null) video.currentTime = (first + 0.5) / fps;
  }
  drawHighlight();
}

function currentFrame() {
  const video = $("overlay");
  const job = state.job;
  if (!job) return 0;
  const fps = job.video.fps || 25;
  return Math.min(job.video.num_frames - 1, Math.max(0, Math.floor(video.currentTime * fps + 1e-3)));
}

// The selected track's box on a canvas over the overlay video, at the frame being shown.
function drawHighlight() {
  const canvas = $("highlight");
  const video = $("overlay");
  const job = state.job;
  const width = (job && job.video.width) || video.videoWidth || 1;
  const height = (job && job.video.height) || video.videoHeight || 1;
  if (canvas.width !== width || canvas.height !== height) {
    canvas.width = width;
    canvas.height = height;
  }
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (state.selected === null) return;
  const track = state.tracks[state.selected];
  const box = track && track.boxes && track.boxes[currentFrame()];
  if (!box) return;
  const line = Math.max(2, Math.round(width / 200));
  ctx.lineWidth = line;
  ctx.strokeStyle = "#ffd400";
  ctx.strokeRect(box[0] - line, box[1] - line, box[2] + 2 * line, box[3] + 2 * line);
}

function initPlayer() {
  const video = $("overlay");
  const onFrame = () => {
    drawHighlight();
    if (video.requestVideoFrameCallback) video.requestVideoFrameCallback(onFrame);
  };
  if (video.requestVideoFrameCallback) video.requestVideoFrameCallback(onFrame);
  for (const name of ["timeupdate", "seeked", "loadedmetadata"]) video.addEventListener(name, drawHighlight);
}

// --- downloads: fetched with the key, then saved under the file's own name ------------------
const DOWNLOADS = {
  ytvis: ["results.json", (job) => `${job.links.self}/files/results.json`],
  davis: ["davis.zip (DAVIS PNGs)", (job) => `${job.links.result}?format=davis`],
  mots: ["mots.txt", (job) => `${job.links.self}/files/mots.txt`],
  overlay: ["overlay.mp4", (job) => `${job.links.self}/files/overlay.mp4`],
};

function renderDownloads(job, formats) {
  const list = $("downloads");
  list.replaceChildren();
  for (const format of formats) {
    if (!DOWNLOADS[format]) continue;
    const [label, url] = DOWNLOADS[format];
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = `Download ${label}`;
    button.dataset.format = format;
    button.addEventListener("click", () => download(url(job), label.split(" ")[0]));
    item.append(button);
    list.append(item);
  }
}

async function download(url, name) {
  clearError();
  try {
    const blob = await (await api(url)).blob();
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = name;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  } catch (e) {
    showError(e);
  }
}

// --- this key's jobs ------------------------------------------------------------------------
async function refreshJobs() {
  const body = $("jobs").tBodies[0];
  try {
    const list = await (await api("/v1/jobs?limit=50")).json();
    body.replaceChildren();
    if (!list.items.length) {
      const cell = body.insertRow().insertCell();
      cell.colSpan = 6;
      cell.textContent = "no jobs yet";
    }
    for (const job of list.items) {
      const row = body.insertRow();
      row.dataset.id = job.id;
      const created = new Date(job.created_at * 1000).toLocaleString();
      for (const text of [job.id.slice(0, 8), job.video.filename || "-", job.status, job.tracks ?? "-", created]) {
        row.insertCell().textContent = String(text);
      }
      const actions = row.insertCell();
      const open = document.createElement("button");
      open.type = "button";
      open.textContent = "Open";
      open.setAttribute("aria-label", `open job ${job.id.slice(0, 8)}`);
      open.addEventListener("click", () => openJob(job.id));
      const remove = document.createElement("button");
      remove.type = "button";
      remove.textContent = "Delete";
      remove.setAttribute("aria-label", `delete job ${job.id.slice(0, 8)}`);
      remove.addEventListener("click", () => deleteJob(job.id));
      actions.append(open, " ", remove);
    }
  } catch (e) {
    body.replaceChildren();
    showError(e);
  }
}

async function openJob(id) {
  clearError();
  try {
    const job = await (await api(`/v1/jobs/${id}`)).json();
    await showJob(job);
    if (job.status === "queued" || job.status === "running") await follow(job);
  } catch (e) {
    showError(e);
  }
}

async function deleteJob(id) {
  clearError();
  try {
    await api(`/v1/jobs/${id}`, { method: "DELETE" });
    if (state.job && state.job.id === id) {
      $("job").hidden = true;
      state.job = null;
      revokeUrls();
    }
  } catch (e) {
    showError(e);
  }
  refreshJobs();
}

$("refresh-jobs").addEventListener("click", () => { clearError(); refreshJobs(); });
initKey();
initFilePicker();
initPlayer();
refreshJobs();
