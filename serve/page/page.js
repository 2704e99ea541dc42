"use strict";
// AdaptBIR page: send one photo as a job, follow it over Server-Sent Events
// (polling if the stream breaks), then show the result with a before/after slider.

const $ = (id) => document.getElementById(id);
const ACTIVE = new Set(["queued", "running"]);
const TERMINAL = new Set(["done", "failed", "cancelled", "expired"]);
const STAGES = { musiq: "Measuring quality (MUSIQ)", encode: "Encoding", decode: "Decoding" };
const STATE_NAMES = {
  uploading: "Uploading", queued: "Queued", running: "Running", done: "Done",
  failed: "Failed", cancelled: "Cancelled", expired: "Expired",
};

let maxBytes = null;  // from /info; checked before uploading
let job = null;       // {id, statusUrl, eventsUrl, resultUrl, state, source, timer, over}
let upload = null;    // AbortController of the upload in flight
let generation = 0;   // bumps on every new photo, so late answers for an older one are ignored
let photoUrl = null;  // object URL of the current input photo

// ---------- small helpers ----------

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = false;
}

function clearError() {
  $("error").textContent = "";
  $("error").hidden = true;
}

function setState(state, text) {
  document.body.dataset.state = state;
  $("state").textContent = text ?? STATE_NAMES[state] ?? state;
}

function megabytes(bytes) {
  return Number((bytes / 1048576).toFixed(1));
}

function duration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  if (h) return `${h} h ${m} min`;
  return m ? `${m} min ${r} s` : `${r} s`;
}

// The service answers errors with one line of plain text; keep only that line.
async function errorText(res) {
  if (res.status === 503) {
    const wait = res.headers.get("Retry-After");
    if (wait) return `The service is busy; try again in ${wait} s.`;
  }
  let body = "";
  try { body = (await res.text()).trim().split("\n")[0]; } catch (_) { /* no body */ }
  return body || `The service answered with status ${res.status}.`;
}

// ---------- service information ----------

async function loadInfo() {
  try {
    const res = await fetch("/info", { cache: "no-store" });
    if (!res.ok) throw new Error(await errorText(res));
    const info = await res.json();
    const parts = [info.engine_id, info.backend, info.precision].filter((x) => x != null && x !== "");
    $("engine").textContent = parts.length ? `Engine ${parts.join(" · ")}` : "Engine details unknown";
    const limits = info.limits || {};
    if (info.default_steps != null) $("steps").placeholder = String(info.default_steps);
    const maxSteps = limits.max_steps ?? info.max_steps;
    if (maxSteps != null) $("steps").max = String(maxSteps);
    if (limits.max_bytes) {
      maxBytes = limits.max_bytes;
      $("limit").textContent = `Up to ${megabytes(maxBytes)} MB`;
    }
  } catch (err) {
    $("engine").textContent = "Engine details unavailable";
    showError(`Could not read the service information: ${err.message}`);
  }
}

// ---------- starting a job ----------

function jobUrl() {
  const q = new URLSearchParams();
  const steps = $("steps").value.trim();
  const seed = $("seed").value.trim();
  if (steps) q.set("steps", steps);
  if (seed) q.set("seed", seed);
  q.set("format", $("format").value);
  return `/jobs?${q}`;
}

// Stop following a job: close the stream (else EventSource reconnects) and any poll.
function stopWatching(j) {
  if (!j) return;
  if (j.source) { j.source.close(); j.source = null; }
  if (j.timer) { clearTimeout(j.timer); j.timer = null; }
}

async function deleteJob(j) {
  const res = await fetch(`/jobs/${encodeURIComponent(j.id)}`, { method: "DELETE" });
  if (!res.ok) throw new Error(await errorText(res));
  return res.json();
}

// Drop whatever the previous photo started, so only one job runs at a time.
async function dropPrevious() {
  if (upload) { upload.abort(); upload = null; }
  const old = job;
  job = null;
  if (!old) return;
  stopWatching(old);
  old.over = true;
  if (ACTIVE.has(old.state)) {
    try { await deleteJob(old); } catch (_) { /* it may have just finished; nothing to undo */ }
  }
}

function resetView(file) {
  if (photoUrl) URL.revokeObjectURL(photoUrl);
  photoUrl = URL.createObjectURL(file);
  $("preview").src = photoUrl;
  $("before").src = photoUrl;
  $("preview-box").hidden = false;
  $("compare").hidden = true;
  $("result").removeAttribute("src");
  $("download").removeAttribute("href");
  $("gate").hidden = true;
  for (const id of ["score", "class", "k", "w", "seed-used"]) $(id).textContent = "—";
  $("progress").value = 0;
  $("progress").classList.remove("stopped");
  $("stage").textContent = "";
  $("eta").textContent = "";
  $("job").hidden = false;
}

async function start(file) {
  const mine = ++generation;
  clearError();
  if (file.type && !file.type.startsWith("image/")) {
    showError(`This file is not a photo (its type is ${file.type}).`);
    return;
  }
  if (!$("steps").checkValidity()) {
    const max = $("steps").max;
    showError(`Steps must be a whole number from 1${max ? ` to ${max}` : " up"}.`);
    return;
  }
  if (maxBytes && file.size > maxBytes) {
    showError(`This photo is ${megabytes(file.size)} MB; the service accepts at most ${megabytes(maxBytes)} MB.`);
    return;
  }
  await dropPrevious();
  if (mine !== generation) return;

  resetView(file);
  setState("uploading", "Uploading…");
  $("cancel").disabled = false;
  const ctrl = new AbortController();
  upload = ctrl;
  let res, st;
  try {
    res = await fetch(jobUrl(), {
      method: "POST",
      body: file,
      headers: { "Content-Type": "application/octet-stream" },
      signal: ctrl.signal,
    });
    if (res.ok) st = await res.json();
  } catch (err) {
    if (mine !== generation || err.name === "AbortError") return;
    failUpload(`Could not send the photo: ${err.message}`);
    return;
  }
  if (upload === ctrl) upload = null;
  if (!res.ok) {
    const text = await errorText(res);
    if (mine === generation) failUpload(text);
    return;
  }
  const id = String(st.id);
  const j = {
    id,
    statusUrl: st.status_url || `/jobs/${encodeURIComponent(id)}`,
    eventsUrl: st.events_url || `/jobs/${encodeURIComponent(id)}/events`,
    resultUrl: st.result_url || `/jobs/${encodeURIComponent(id)}/result`,
    state: st.state, source: null, timer: null, over: false, pollFailed: false,
  };
  if (mine !== generation) {  // a newer photo came while this one uploaded
    deleteJob(j).catch(() => {});
    return;
  }
  job = j;
  render(j, st);
  if (!j.over) watch(j);
}

function failUpload(text) {
  upload = null;
  setState("idle", "Not started");
  $("cancel").disabled = true;
  $("progress").classList.add("stopped");
  showError(text);
}

// ---------- following a job ----------

function watch(j) {
  const source = new EventSource(j.eventsUrl);
  j.source = source;
  source.onmessage = (e) => {
    let st;
    try { st = JSON.parse(e.data); } catch (_) { return; }  // skip a malformed message
    render(j, st);
  };
  // The stream broke before the end: follow the job by polling instead, quietly.
  source.onerror = () => {
    if (j.over) return;
    source.close();
    j.source = null;
    poll(j);
  };
}

function poll(j) {
  j.timer = setTimeout(async () => {
    j.timer = null;
    if (j.over || j !== job) return;
    let keepGoing = true;
    try {
      const res = await fetch(j.statusUrl, { cache: "no-store" });
      if (res.ok) {
        if (j.pollFailed) { clearError(); j.pollFailed = false; }
        render(j, await res.json());
      } else {
        j.pollFailed = true;
        showError(`Lost track of the job: ${await errorText(res)}`);
        keepGoing = res.status >= 500 || res.status === 408;  // a 4xx will not get better
      }
    } catch (err) {
      j.pollFailed = true;
      showError(`Lost contact with the service (${err.message}); still trying.`);
    }
    if (keepGoing && !j.over && j === job) poll(j);
  }, 1000);
}

// ---------- showing a job's status ----------

function render(j, st) {
  if (j !== job || j.over) return;
  j.state = st.state;
  setState(st.state, stateText(st));
  $("cancel").disabled = !ACTIVE.has(st.state);
  showProgress(st);
  showGate(st);
  if (TERMINAL.has(st.state)) finish(j, st);
}

function stateText(st) {
  if (st.state === "queued" && st.position != null) {
    return `Queued — ${st.position} ${st.position === 1 ? "job" : "jobs"} ahead`;
  }
  if (st.state === "done" && st.elapsed_s != null) return `Done — in ${duration(st.elapsed_s)}`;
  return STATE_NAMES[st.state] || String(st.state);
}

function stageText(st) {
  if (st.state === "queued") return "Waiting for the service to be free";
  if (st.stage === "sample") return `Sampling step ${st.step ?? 0} of ${st.steps ?? "?"}`;
  return STAGES[st.stage] || "Starting";
}

function showProgress(st) {
  if (st.state === "done") {
    $("progress").value = 1;
    $("stage").textContent = "Finished";
    $("eta").textContent = "";
    return;
  }
  if (!ACTIVE.has(st.state)) return;  // failed etc.: leave the bar where it stopped
  // Only sampling has a real step count; before it the bar stays at 0.
  $("progress").value = st.steps > 0 ? Math.min(1, (st.step || 0) / st.steps) : 0;
  $("stage").textContent = stageText(st);
  const parts = [];
  if (st.elapsed_s != null) parts.push(`${duration(st.elapsed_s)} elapsed`);
  if (st.eta_s != null) parts.push(`about ${duration(st.eta_s)} left`);
  $("eta").textContent = parts.join(" · ");
}

function showGate(st) {
  if (st.seed != null) $("seed-used").textContent = String(st.seed);
  if (st.score == null && st.class == null && st.k == null && st.w == null) return;
  if (st.score != null) {
    const source = st.score_source ? ` (${st.score_source})` : "";
    $("score").textContent = `${Number(st.score).toFixed(2)}${source}`;
  }
  if (st.class != null) $("class").textContent = String(st.class);
  if (st.k != null) $("k").textContent = Number(st.k).toFixed(3);
  if (st.w != null) $("w").textContent = Number(st.w).toFixed(3);
  $("gate").hidden = false;
}

function finish(j, st) {
  j.over = true;
  stopWatching(j);
  if (st.state === "done") {
    showResult(j, st);
    return;
  }
  $("progress").classList.add("stopped");
  $("eta").textContent = "";
  if (st.state === "cancelled") {
    $("stage").textContent = st.error || "Stopped on request.";
    return;
  }
  $("stage").textContent = "Stopped.";
  const fallback = st.state === "expired"
    ? "The job expired before its result was collected."
    : "The restoration failed.";
  showError(st.error || fallback);
}

function showResult(j, st) {
  const ext = st.format || $("format").value;
  $("result").src = j.resultUrl;
  $("download").href = j.resultUrl;
  $("download").download = `restored-${j.id.slice(0, 8)}.${ext}`;
  $("slider").value = 50;
  applySlider();
  $("preview-box").hidden = true;
  $("compare").hidden = false;
}

// Left of the divider shows the input, right of it the result.
function applySlider() {
  const pos = Number($("slider").value);
  $("result").style.clipPath = `inset(0 0 0 ${pos}%)`;
  $("frame").style.setProperty("--pos", `${pos}%`);
}

// ---------- user actions ----------

async function cancel() {
  $("cancel").disabled = true;
  if (upload) {  // still sending the photo: just stop sending
    generation++;
    upload.abort();
    upload = null;
    setState("cancelled");
    $("stage").textContent = "Upload stopped.";
    $("progress").classList.add("stopped");
    return;
  }
  const j = job;
  if (!j || !ACTIVE.has(j.state)) return;
  try {
    render(j, await deleteJob(j));
  } catch (err) {
    showError(`Could not cancel the job: ${err.message}`);
    $("cancel").disabled = j.over || j !== job;
  }
}

function pick(files) {
  const file = files && files[0];
  if (file) start(file);
}

function setUp() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => {
    pick(e.target.files);
    e.target.value = "";  // so choosing the same photo again starts a new job
  });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    pick(e.dataTransfer && e.dataTransfer.files);
  });
  // A photo dropped beside the zone must not make the browser navigate away.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());

  $("cancel").addEventListener("click", cancel);
  $("slider").addEventListener("input", applySlider);
  $("result").addEventListener("error", () => {
    if ($("result").getAttribute("src")) showError("The restored photo could not be loaded; it may have expired.");
  });
  $("preview").addEventListener("error", () => { $("preview-box").hidden = true; });
  loadInfo();
}

setUp();
