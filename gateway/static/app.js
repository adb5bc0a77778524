// Crafterse Forge: the weapon forge page. Plain ES module, no framework, no build step.
// It is also the reference client for studios: every call below is the public API.

const KEY_STORAGE = "forge.apiKey";
const POLL_START_MS = 500;
const PREVIEW_EVERY = 2;      // a live preview every this many denoising steps
const POLL_MAX_MS = 3000;
const RECONNECT_MS = 250;     // first wait before a dropped job event stream is opened again
// Seeds go up to 2^63-1, past JavaScript's exact integers: they travel as BigInt here, and so
// does any integer of the API's documents past Number's exact range (the seed's maximum).
const SEED_FIELD = /"seed"\s*:\s*(-?\d+)/g;
// Square sizes the page offers, and tall/wide ones, where the model's contract allows them.
const SIZE_CANDIDATES = [[64, 64], [128, 128], [256, 256], [512, 512], [512, 768], [768, 512],
  [768, 768], [1024, 1024]];

const $ = (id) => document.getElementById(id);
const el = {
  keyPanel: $("key-panel"), keyForm: $("key-form"), keyInput: $("key-input"), keyError: $("key-error"),
  keyState: $("key-state"), keyHint: $("key-hint"), forgetKey: $("forget-key"), changeKey: $("change-key"),
  workspace: $("workspace"), builder: $("builder"), choices: $("choices"), text: $("f-text"),
  prompt: $("f-prompt"), promptMode: $("prompt-mode"), resetPrompt: $("reset-prompt"),
  seed: $("f-seed"), steps: $("f-steps"), guidance: $("f-guidance_scale"), size: $("f-size"),
  scheduler: $("f-scheduler"), format: $("f-format"), advanced: $("advanced"),
  forge: $("forge"), timer: $("retry-timer"), status: $("status"), problem: $("problem"),
  gallery: $("gallery"), galleryEmpty: $("gallery-empty"), galleryCount: $("gallery-count"),
  tinyNote: $("tiny-note"), tinyName: $("tiny-name"), cardTemplate: $("card-template"),
  progress: $("progress"), progressBar: $("progress-bar"), progressText: $("progress-text"),
  preview: $("preview"), cancel: $("cancel"), jobCardTemplate: $("job-card-template"),
  sketch: $("sketch"), dropZone: $("drop-zone"), sketchFile: $("f-init_image"), sketchSet: $("sketch-set"),
  sketchThumb: $("sketch-thumb"), sketchInfo: $("sketch-info"), removeSketch: $("remove-sketch"),
  strength: $("f-strength"), strengthValue: $("strength-value"),
  styleSection: $("style-section"), style: $("f-style"), styleWeight: $("f-style-weight"),
  styleWeightValue: $("style-weight-value"),
};

const state = {
  key: localStorage.getItem(KEY_STORAGE),
  weaponFields: [],      // names of the template's choice fields, in schema order
  templates: null,       // GET /v1/weapons/templates, or null if the gateway has none
  rendered: "",          // the prompt the template gives for the current choices
  negative: "",
  jobsApi: null,         // null: not tried yet; true/false: the gateway has /v1/jobs or not
  busy: false,
  retryTimer: null,
  cards: 0,
  seenIds: new Map(),    // asset id -> card number that first showed it
  seedMax: null,         // the seed's maximum, from the API's schema (BigInt)
  cancel: null,          // stops the image being streamed or the job followed, while there is one
  sketch: null,          // the input image of the next forge: {id, url, width, height, what}, or null
  uploads: 0,            // uploads started: only the latest one's answer sets the sketch
  defaultSize: "",       // the model's default size, as the size select's first option says it
  styleDefaults: { weapon: null, image: null }, // the style each request kind gets when it names none
  styleChosen: false,    // the user picked a style (None included): it no longer follows the defaults
};

// ---------- JSON with exact seeds ----------

function parseJson(text) {
  return JSON.parse(text.replace(SEED_FIELD, '"seed":"$1"'), (k, v, context) => {
    if (k === "seed" && typeof v === "string" && /^-?\d+$/.test(v)) return BigInt(v);
    if (typeof v === "number" && Number.isInteger(v) && !Number.isSafeInteger(v) && context?.source) {
      return BigInt(context.source);
    }
    return v;
  });
}

function toJson(value) {
  return JSON.stringify(value, (k, v) => (typeof v === "bigint" ? `#big:${v}` : v))
    .replace(/"#big:(-?\d+)"/g, "$1");
}

// ---------- API ----------

class ApiError extends Error {
  constructor(status, problem, retryAfter) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.title = problem.title || `HTTP ${status}`;
    this.detail = problem.detail || "";
    this.errors = Array.isArray(problem.errors) ? problem.errors : [];
    this.retryAfter = retryAfter;
  }
}

function retryAfterSeconds(header) {
  if (!header) return null;
  if (/^\d+$/.test(header.trim())) return Number(header);
  const at = Date.parse(header);
  return Number.isNaN(at) ? null : Math.max(1, Math.ceil((at - Date.now()) / 1000));
}

const NO_ANSWER = {
  title: "No answer from the gateway",
  detail: "The request did not reach the server. Check your connection, or that the gateway is running.",
};
const CUT = { title: "The stream was cut", detail: "The connection to the gateway closed while it streamed." };

// Worth asking again: no answer, or a gateway (or a proxy in front of it) not ready.
const transient = (err) => err instanceof ApiError && [0, 502, 503, 504].includes(err.status);

// A FormData body goes as multipart (the browser writes its Content-Type); any other as JSON.
async function send(path, { method = "GET", body, auth = true, accept = "application/json", headers: extra, signal } = {}) {
  const headers = { ...extra, Accept: accept };
  if (auth && state.key) headers.Authorization = `Bearer ${state.key}`;
  const json = body !== undefined && !(body instanceof FormData);
  if (json) headers["Content-Type"] = "application/json";
  try {
    return await fetch(path, { method, headers, body: json ? toJson(body) : body, signal });
  } catch (err) {
    if (signal?.aborted) throw err;
    throw new ApiError(0, NO_ANSWER);
  }
}

async function readJson(res) {
  const text = await res.text();
  let data = null;
  if (/json/.test(res.headers.get("content-type") || "") && text) {
    try { data = parseJson(text); } catch { data = null; }
  }
  if (!res.ok) {
    throw new ApiError(res.status, data || { title: `HTTP ${res.status}`, detail: text.slice(0, 300) },
      retryAfterSeconds(res.headers.get("Retry-After")));
  }
  return data;
}

async function api(path, options = {}) {
  const res = await send(path, options);
  return { data: await readJson(res), res };
}

// Server-sent events of a response, as { id, event, data } with the data parsed as JSON
// (id undefined for an event without one). A connection lost midway throws ApiError 0.
async function* serverEvents(res) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read().catch(() => { throw new ApiError(0, CUT); });
    if (done) return;
    buffer = (buffer + value).replace(/\r\n/g, "\n");
    for (let end = buffer.indexOf("\n\n"); end >= 0; end = buffer.indexOf("\n\n")) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      let id;
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
        else if (line.startsWith("id:")) id = line.slice(3).trim();
      }
      if (data.length) yield { id, event, data: parseJson(data.join("\n")) };
    }
  }
}

// ---------- schema-driven builder ----------

function deref(schema, node) {
  let n = node;
  while (n && n.$ref) n = n.$ref.split("/").slice(1).reduce((o, p) => o[p], schema);
  return n || {};
}

// The values a property allows: its enum, or its one value (a const: pydantic writes a
// one-value Literal so), looking through anyOf/allOf/oneOf; null if it names none.
function enumOf(schema, prop) {
  const p = deref(schema, prop);
  if (Array.isArray(p.enum)) return p.enum;
  if ("const" in p) return [p.const];
  for (const alt of [...(p.anyOf || []), ...(p.allOf || []), ...(p.oneOf || [])]) {
    const values = enumOf(schema, alt);
    if (values) return values;
  }
  return null;
}

const LABELS = {
  dpmpp_2m: "DPM++ 2M", euler_ancestral: "Euler ancestral", ddim: "DDIM", lcm: "LCM", pndm: "PNDM",
  png: "PNG", webp: "WebP",
};
const human = (v) => LABELS[v] || (v.charAt(0).toUpperCase() + v.slice(1)).replaceAll("_", " ");

function fillSelect(select, values, chosen) {
  select.replaceChildren(...values.map((v) => new Option(human(v), v, false, v === chosen)));
}

function buildBuilder(openapi) {
  const schemas = openapi.components.schemas;
  const weapon = schemas.WeaponRequest;
  const image = schemas.ImageRequest || { properties: {} };
  const props = weapon.properties;
  state.weaponFields = Object.keys(props).filter((n) => enumOf(openapi, props[n]) && !(n in image.properties));
  const nodes = [];
  for (const name of state.weaponFields) {
    const values = enumOf(openapi, props[name]);
    const id = `f-${name}`;
    const field = document.createElement("div");
    field.className = "field";
    const label = Object.assign(document.createElement("label"), { htmlFor: id, textContent: human(name) });
    const select = Object.assign(document.createElement("select"), { id, name });
    select.setAttribute("aria-describedby", `err-${name}`);
    fillSelect(select, values, props[name].default ?? values[0]);
    const error = Object.assign(document.createElement("p"), { className: "field-error", id: `err-${name}` });
    field.append(label, select, error);
    nodes.push(field);
  }
  el.choices.replaceChildren(el.choices.querySelector("legend"), ...nodes);

  const opt = (n) => deref(openapi, props[n] || image.properties[n] || {});
  fillSelect(el.scheduler, enumOf(openapi, props.scheduler) || ["dpmpp_2m"], opt("scheduler").default);
  fillSelect(el.format, enumOf(openapi, props.format) || ["png"], opt("format").default);
  const steps = opt("steps");
  Object.assign(el.steps, { min: steps.minimum ?? 1, max: steps.maximum ?? 150, value: steps.default ?? 25 });
  const guidance = opt("guidance_scale");
  Object.assign(el.guidance, { min: guidance.minimum ?? 0, max: guidance.maximum ?? 30, value: guidance.default ?? 7.5 });
  el.text.maxLength = opt("text").maxLength ?? 120;
  fillSizes(opt("width"), opt("height"));
  const seed = opt("seed");
  const bound = [seed, ...(seed.anyOf || [])].map((s) => deref(openapi, s).maximum).find((m) => m !== undefined);
  state.seedMax = bound === undefined ? null : BigInt(bound);
  buildStrength(openapi, props.strength);
  buildStyles(openapi, weapon, image);
}

// A slider set from a schema number (or anyOf number/null): its bounds, its step (multipleOf,
// else hundredths of the range) and its default, which the model states in the description
// ("default 0.75") where the schema's default is null (the option applies only with another).
function setSlider(input, openapi, prop) {
  const p = deref(openapi, prop);
  const number = [p, ...(p.anyOf || [])].map((s) => deref(openapi, s)).find((s) => s.type === "number") || {};
  const min = number.minimum ?? 0;
  const max = number.maximum ?? 1;
  const stated = /default (\d+(?:\.\d+)?)/.exec(p.description || "");
  const value = p.default ?? (stated ? Number(stated[1]) : (min + max) / 2);
  Object.assign(input, { min, max, step: number.multipleOf ?? (max - min) / 100 });
  input.value = String(value);
}

// The strength slider from the schema's `strength`. A gateway without image-to-image (no
// `strength`) gets no sketch section.
function buildStrength(openapi, prop) {
  el.sketch.hidden = !prop;
  if (!prop) return;
  setSlider(el.strength, openapi, prop);
  showStrength();
}

function showStrength() { el.strengthValue.textContent = Number(el.strength.value).toFixed(2); }

// The style picker: None, then the styles the model serves (the schema's `style` enum, which
// the gateway rebuilds as styles are published), and the `style_weight` slider. A gateway
// serving no style (`style` only null, or absent) gets no style section. Each request kind
// has its own default style: a weapon's is the templates' default_style where the model
// serves it, an image's none.
function buildStyles(openapi, weapon, image) {
  const names = enumOf(openapi, weapon.properties.style);
  el.styleSection.hidden = !names;
  state.styleDefaults = { weapon: null, image: null };
  state.styleChosen = false;
  if (!names) return;
  const served = (prop) => {
    const value = deref(openapi, prop).default;
    return names.includes(value) ? value : null;
  };
  state.styleDefaults = { weapon: served(weapon.properties.style), image: served(image.properties.style) };
  el.style.replaceChildren(new Option("None", ""), ...names.map((n) => new Option(n, n)));
  setSlider(el.styleWeight, openapi, weapon.properties.style_weight);
  showStyleDefault();
}

// The style a request of the kind the form makes now gets when it names none.
const styleDefault = () => state.styleDefaults[promptEdited() ? "image" : "weapon"];

// Until the user picks a style, the picker shows the default of the request the form makes
// now: a weapon's, or an edited prompt's (an image request).
function showStyleDefault() {
  if (!state.styleChosen) el.style.value = styleDefault() ?? "";
  showStyleWeight();
}

// The weight applies only with a style: the slider is off while the style is None.
function showStyleWeight() {
  el.styleWeight.disabled = !el.style.value;
  el.styleWeightValue.textContent = Number(el.styleWeight.value).toFixed(2);
}

// The style the request names: the chosen one with its weight. With None, nothing, unless
// the request's kind has a default style: an explicit null then makes it without one.
function styleOf() {
  if (el.styleSection.hidden) return {};
  if (el.style.value) return { style: el.style.value, style_weight: Number(el.styleWeight.value) };
  return styleDefault() === null ? {} : { style: null };
}

// The size choices the model's contract allows: the default first, then the candidates
// within the bounds and on the size multiple, as the OpenAPI schema states them.
function fillSizes(width, height) {
  const fits = (v, s) => v >= (s.minimum ?? 0) && v <= (s.maximum ?? Infinity) && v % (s.multipleOf ?? 1) === 0;
  const label = (w, h) => `${w} × ${h}${w > h ? " (wide)" : w < h ? " (tall)" : ""}`;
  const allowed = SIZE_CANDIDATES.filter(([w, h]) => fits(w, width) && fits(h, height)
    && !(w === width.default && h === height.default));
  state.defaultSize = `Model default (${width.default} × ${height.default})`;
  el.size.replaceChildren(
    new Option(state.sketch ? SKETCH_SIZE : state.defaultSize, "", true, true),
    ...allowed.map(([w, h]) => new Option(label(w, h), `${w}x${h}`)),
  );
}

// The same rendering as WeaponTemplates.render on the server (gateway/weapons.py).
function renderPrompt(t, choice, text) {
  const values = { text: text.trim() ? `, ${text.trim()}` : "" };
  for (const [name, phrases] of Object.entries(t.fields)) {
    values[name] = phrases[choice[name] ?? t.defaults[name]] ?? "";
  }
  const filled = t.prompt.replace(/\{\{|\}\}|\{(\w+)\}/g, (m, name) =>
    m === "{{" ? "{" : m === "}}" ? "}" : (values[name] ?? m));
  return filled.replace(/\s+/g, " ").trim();
}

function choices() {
  return Object.fromEntries(state.weaponFields.map((n) => [n, $(`f-${n}`).value]));
}

const promptEdited = () => state.templates !== null && el.prompt.value.trim() !== state.rendered;

function updatePrompt() {
  if (!state.templates) return;
  const wasEdited = promptEdited();
  state.rendered = renderPrompt(state.templates, choices(), el.text.value);
  if (!wasEdited) el.prompt.value = state.rendered;
  showPromptMode();
}

function showPromptMode() {
  const edited = promptEdited();
  el.promptMode.textContent = state.templates
    ? (edited ? "edited: drawn as written" : "from the studio template")
    : "written by the server";
  el.promptMode.classList.toggle("edited", edited);
  el.resetPrompt.hidden = !edited;
  if (!el.styleSection.hidden) showStyleDefault();
}

// ---------- requests ----------

function readNumber(input, errors) {
  const raw = input.value.trim();
  if (input.validity.badInput) {
    errors[input.name] = "Enter a number.";
    return undefined;
  }
  return raw === "" ? undefined : Number(raw);
}

// The request the form describes: {kind: "weapon"|"image", body}, or null with field errors shown.
function formRequest() {
  const errors = {};
  const body = {
    steps: readNumber(el.steps, errors),
    guidance_scale: readNumber(el.guidance, errors),
    scheduler: el.scheduler.value,
    format: el.format.value,
  };
  const seed = el.seed.value.trim();
  if (el.seed.validity.badInput || (seed !== "" && !/^\d+$/.test(seed))) {
    errors.seed = "A seed is a whole number from 0 to 2^63−1.";
  } else if (seed !== "") {
    body.seed = BigInt(seed);
  }
  if (el.size.value) {
    const [w, h] = el.size.value.split("x").map(Number);
    Object.assign(body, { width: w, height: h });
  }
  if (state.sketch) Object.assign(body, { init_image: state.sketch.id, strength: Number(el.strength.value) });
  Object.assign(body, styleOf());
  if (promptEdited()) {
    if (!el.prompt.value.trim()) errors.prompt = "Write a prompt, or go back to the template.";
    Object.assign(body, { prompt: el.prompt.value.trim(), negative_prompt: state.negative });
  } else {
    Object.assign(body, choices(), { text: el.text.value.trim() });
  }
  for (const k of Object.keys(body)) if (body[k] === undefined) delete body[k];
  if (Object.keys(errors).length) {
    showFieldErrors(errors);
    return null;
  }
  return { kind: "prompt" in body ? "image" : "weapon", body };
}

// ---------- errors ----------

function clearErrors() {
  for (const p of document.querySelectorAll(".field-error")) p.textContent = "";
  for (const i of document.querySelectorAll("[aria-invalid]")) i.removeAttribute("aria-invalid");
  el.problem.hidden = true;
  el.problem.replaceChildren();
}

const FIELD_ALIASES = {
  width: "size", height: "size", negative_prompt: "prompt", style_weight: "style-weight", weapons: null, images: null,
};

function showFieldErrors(errors) {
  let first = null;
  for (const [name, msg] of Object.entries(errors)) {
    const out = $(`err-${name}`);
    const input = $(`f-${name}`);
    if (!out || !input) continue;
    out.textContent = out.textContent ? `${out.textContent} ${msg}` : msg;
    input.setAttribute("aria-invalid", "true");
    if (input.closest("details")) input.closest("details").open = true;
    first ??= input;
  }
  first?.focus();
  return first !== null;
}

// 422 problem details: each error's loc names the field (["body", "steps"] or, in a job,
// ["body", "weapons", 0, "steps"]); the message goes beside that field.
function fieldErrorsOf(err) {
  const errors = {};
  for (const e of err.errors) {
    const names = (e.loc || []).filter((p) => typeof p === "string" && p !== "body");
    let name = names.at(-1);
    if (name in FIELD_ALIASES) name = FIELD_ALIASES[name];
    if (name && $(`f-${name}`)) errors[name] = errors[name] ? `${errors[name]} ${e.msg}` : `${e.msg}.`;
  }
  if (!err.errors.length && /prompt|token/i.test(err.detail)) errors.prompt = err.detail;
  return errors;
}

function showProblem(title, detail, extra) {
  const h = Object.assign(document.createElement("strong"), { textContent: title });
  const p = Object.assign(document.createElement("p"), { textContent: detail });
  el.problem.replaceChildren(h, p, ...(extra ? [extra] : []));
  el.problem.hidden = false;
}

function handleError(err) {
  setStatus("");
  if (err.status === 401) {
    showKeyPanel(`The API key was refused: ${err.detail || err.title}. Enter a valid key.`);
  } else if (err.status === 403) {
    showProblem("This key may not forge", `${err.detail} Ask for a key with the “generate” scope.`);
  } else if (err.status === 422 || err.status === 400) {
    const shown = showFieldErrors(fieldErrorsOf(err));
    showProblem(shown ? "Some settings need a fix" : err.title, shown ? "See the messages beside the fields." : err.detail);
  } else if (err.status === 429) {
    showProblem("Rate limit reached", `${err.detail || "Too many requests for this key."}`);
    startCountdown(err.retryAfter ?? 10, "You can forge again");
  } else if (err.status === 503) {
    showProblem("The forge is unavailable right now",
      `The image service cannot take requests at the moment${err.detail ? ` (${err.detail})` : ""}. It is not your request.`);
    startCountdown(err.retryAfter ?? 10, "Try again");
  } else {
    showProblem(err.title, err.detail || "Something went wrong.");
  }
}

function startCountdown(seconds, done) {
  clearInterval(state.retryTimer);
  const until = Date.now() + seconds * 1000;
  setBusy(true);
  el.timer.hidden = false;
  const tick = () => {
    const left = Math.ceil((until - Date.now()) / 1000);
    if (left <= 0) {
      clearInterval(state.retryTimer);
      state.retryTimer = null;
      el.timer.hidden = true;
      el.timer.textContent = "";
      setBusy(false);
      setStatus(`${done} now.`);
      return;
    }
    el.timer.textContent = `${done} in ${left} s`;
    el.forge.textContent = `Wait ${left} s`;
  };
  tick();
  state.retryTimer = setInterval(tick, 250);
}

// ---------- input image (image-to-image) ----------

// With an input image, the first size option sends no width and height: the server then
// keeps the input image's aspect ratio. A size the user picks is sent, and the image is
// fitted to it.
const SKETCH_SIZE = "Input image's shape";

// The input image of the next forges (an upload's or a forged image's asset), or none.
function setSketch(sketch) {
  state.sketch = sketch;
  el.sketchSet.hidden = !sketch;
  el.strength.disabled = !sketch;
  el.size.options[0].text = sketch ? SKETCH_SIZE : state.defaultSize;
  el.sketchFile.value = "";
  if (!sketch) {
    el.sketchThumb.removeAttribute("src");
    el.sketchInfo.textContent = "";
    return;
  }
  el.sketchThumb.src = sketch.url;
  el.sketchThumb.alt = `Input image: ${sketch.what}`;
  el.sketchInfo.textContent = `${sketch.what}, ${sketch.width} × ${sketch.height}`;
}

// Store a dropped or chosen file (POST /v1/uploads): the server reads its type from its
// bytes, fits it to an allowed size and gives its key; a refused file's problem is shown.
async function uploadSketch(file) {
  const upload = (state.uploads += 1);
  clearErrors();
  setStatus(`Uploading ${file.name || "the image"}…`);
  el.dropZone.setAttribute("aria-busy", "true");
  const form = new FormData();
  form.append("file", file, file.name || "sketch");
  try {
    const { data } = await api("/v1/uploads", { method: "POST", body: form });
    if (upload !== state.uploads) return;
    setSketch({ id: data.id, url: data.asset_url, width: data.width, height: data.height, what: "your sketch" });
    setStatus("Sketch set: the next forge starts from it.");
  } catch (err) {
    if (upload !== state.uploads) return;
    setStatus("");
    if (!(err instanceof ApiError)) showProblem("Unexpected error", String(err));
    else if ([400, 413, 415, 422].includes(err.status)) showProblem(`The image was refused: ${err.title}`, err.detail);
    else handleError(err);
  } finally {
    if (upload === state.uploads) el.dropZone.removeAttribute("aria-busy");
  }
}

// Files dragged over the drop zone: it says it takes them, and takes the first one dropped.
const carriesFiles = (e) => e.dataTransfer && [...e.dataTransfer.types].includes("Files");
el.dropZone.addEventListener("dragover", (e) => {
  if (!carriesFiles(e)) return;
  e.preventDefault();
  e.dataTransfer.dropEffect = "copy";
  el.dropZone.classList.add("dragging");
});
el.dropZone.addEventListener("dragleave", (e) => {
  if (!el.dropZone.contains(e.relatedTarget)) el.dropZone.classList.remove("dragging");
});
el.dropZone.addEventListener("drop", (e) => {
  if (!carriesFiles(e)) return;
  e.preventDefault();
  el.dropZone.classList.remove("dragging");
  const file = e.dataTransfer.files[0];
  if (file) uploadSketch(file);
});
// A file dropped beside the zone is refused there, not opened by the browser in the page's place.
window.addEventListener("dragover", (e) => {
  if (!carriesFiles(e) || el.dropZone.contains(e.target)) return;
  e.preventDefault();
  e.dataTransfer.dropEffect = "none";
});
window.addEventListener("drop", (e) => { if (carriesFiles(e) && !el.dropZone.contains(e.target)) e.preventDefault(); });
el.sketchFile.addEventListener("change", () => {
  const file = el.sketchFile.files[0];
  if (file) uploadSketch(file);
});
el.removeSketch.addEventListener("click", () => {
  state.uploads += 1; // an upload still under way no longer sets it
  setSketch(null);
  setStatus("Input image removed: the next forge starts from noise.");
  el.sketchFile.focus();
});
el.strength.addEventListener("input", showStrength);
el.style.addEventListener("change", () => {
  state.styleChosen = true;
  showStyleWeight();
});
el.styleWeight.addEventListener("input", showStyleWeight);

// ---------- generation ----------

function setStatus(text) { el.status.textContent = text; }

function setBusy(busy) {
  state.busy = busy;
  const blocked = busy || state.retryTimer !== null;
  el.forge.disabled = blocked;
  el.forge.setAttribute("aria-disabled", String(blocked));
  if (!busy && state.retryTimer === null) el.forge.textContent = "Forge";
  for (const b of el.gallery.querySelectorAll(".again, .variations")) b.disabled = blocked;
}

const JOB_PATHS = { weapon: ["/v1/weapons/jobs", "weapons"], image: ["/v1/jobs", "images"] };
const SYNC_PATHS = { weapon: "/v1/weapons", image: "/v1/images" };
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function showProgress({ step, total_steps: total, image }) {
  el.progress.hidden = false;
  el.progressBar.max = total;
  el.progressBar.value = step;
  el.progressText.textContent = `Step ${step} of ${total}`;
  if (image) {
    el.preview.src = image;
    el.preview.hidden = false;
  }
}

// What Cancel stops now (a function), or null: the button shows only while there is one.
function setCancel(cancel) {
  state.cancel = cancel;
  el.cancel.hidden = !cancel;
  el.cancel.disabled = !cancel;
}

function hideProgress() {
  el.progress.hidden = true;
  el.preview.hidden = true;
  el.preview.removeAttribute("src");
  el.progressBar.value = 0;
  el.progressText.textContent = "";
}

// One image streamed: progress and previews as it is made, then its card. Cancel stops the
// model's work (the gateway cancels it when the stream closes). "done" or "cancelled".
async function streamImage(kind, body, label) {
  const controller = new AbortController();
  setCancel(() => controller.abort());
  setStatus(`${label}: forging…`);
  showProgress({ step: 0, total_steps: body.steps ?? 1 });
  try {
    const path = `${SYNC_PATHS[kind]}?preview_every=${PREVIEW_EVERY}`;
    const res = await send(path, { method: "POST", body, accept: "text/event-stream", signal: controller.signal });
    if (!res.ok || !/event-stream/.test(res.headers.get("content-type") || "")) {
      await readJson(res);
      throw new ApiError(res.status, { title: "Not a stream", detail: "The gateway did not stream this image." });
    }
    for await (const { event, data } of serverEvents(res)) {
      if (event === "progress" || event === "preview") showProgress(data);
      else if (event === "error") throw new ApiError(data.status, data, null);
      else if (event === "result") {
        addCard(data, kind, body);
        return "done";
      }
    }
    throw new ApiError(0, { title: "The stream ended early", detail: "The gateway closed it before the image." });
  } catch (err) {
    if (controller.signal.aborted) return "cancelled";
    throw err;
  } finally {
    setCancel(null);
    hideProgress();
  }
}

// Forge `bodies` (one request kind): one image streamed with live progress, several as one
// async job; without the jobs API, one by one.
async function forge(kind, bodies, label) {
  if (state.busy || state.retryTimer) return;
  clearErrors();
  setBusy(true);
  const before = state.cards;
  const done = () => {
    const added = state.cards - before;
    return `${label}: done, ${added} image${added === 1 ? "" : "s"} added to the gallery.`;
  };
  try {
    if (bodies.length === 1) {
      const outcome = await streamImage(kind, bodies[0], label);
      setStatus(outcome === "cancelled" ? `${label}: cancelled.` : done());
      return;
    }
    if (state.jobsApi !== false) {
      const [path, field] = JOB_PATHS[kind];
      try {
        const { data, res } = await api(path, { method: "POST", body: { [field]: bodies } });
        state.jobsApi = true;
        await followJob(res.headers.get("Location") || `/v1/jobs/${data.id}`, data, kind, bodies, label, done);
        return;
      } catch (err) {
        if (!(err instanceof ApiError && (err.status === 404 || err.status === 405) && state.jobsApi === null)) throw err;
        state.jobsApi = false; // an older gateway: sync generation below
      }
    }
    for (const [i, body] of bodies.entries()) {
      setStatus(`${label}: generating image ${i + 1} of ${bodies.length}…`);
      const { data } = await api(SYNC_PATHS[kind], { method: "POST", body });
      addCard(data, kind, body);
    }
    setStatus(done());
  } catch (err) {
    if (err instanceof ApiError) handleError(err);
    else showProblem("Unexpected error", String(err));
  } finally {
    setBusy(false);
  }
}

// One poll; a gateway that blinks (restart, 503, network) is asked again with backoff.
async function poll(location) {
  for (let attempt = 1; ; attempt += 1) {
    try {
      return (await api(location)).data;
    } catch (err) {
      if (!transient(err) || attempt >= 6) throw err;
      setStatus(`The gateway did not answer; asking again (try ${attempt + 1})…`);
      await sleep(Math.min(POLL_MAX_MS, 500 * 2 ** attempt));
    }
  }
}

const JOB_ENDS = new Set(["succeeded", "failed", "cancelled"]);
const ITEM_WORDS = { queued: "Queued", running: "Running", succeeded: "Done", cancelled: "Cancelled" };

// Follow a job to its end, its items' cards filling in as they run, Cancel cancelling it:
// through its event stream, or by polling where the gateway has none.
async function followJob(location, job, kind, bodies, label, doneMessage) {
  const view = jobView(job, kind, bodies, label);
  setCancel(() => cancelJob(location));
  try {
    job = (await watchJob(location, view)) ?? (await pollJob(location, view, job));
  } finally {
    setCancel(null);
  }
  showJob(view, job);
  const failed = job.items.filter((i) => i.status === "failed");
  if (job.status === "cancelled") {
    const made = job.items.filter((i) => i.status === "succeeded").length;
    setStatus(`${label}: cancelled, ${made} of ${job.items.length} images made.`);
  } else if (job.status === "failed" || failed.length) {
    const why = job.error || failed.map((i) => `image ${i.index + 1}: ${i.error}`).join("; ");
    setStatus(`${label}: job failed.`);
    showProblem("The job failed", why || "The server gave no reason.");
  } else {
    setStatus(doneMessage());
  }
}

// The job's events until the last one, `status` (the job as it ended), which is returned;
// a dropped stream is opened again with Last-Event-ID, so it goes on after the last event
// seen. Null where the gateway has no event stream for it (404, 405).
async function watchJob(location, view) {
  let lastId = null;
  for (let attempt = 1; ; attempt += 1) {
    try {
      const headers = lastId === null ? {} : { "Last-Event-ID": lastId };
      const res = await send(`${location}/events`, { accept: "text/event-stream", headers });
      if (res.status === 404 || res.status === 405) return null;
      if (!res.ok) await readJson(res);
      for await (const { id, event, data } of serverEvents(res)) {
        lastId = id ?? lastId;
        attempt = 1;
        if (event === "status") return data;
        showJobEvent(view, event, data);
      }
      throw new ApiError(0, CUT);
    } catch (err) {
      if (!transient(err) || attempt >= 6) throw err;
    }
    await sleep(Math.min(POLL_MAX_MS, RECONNECT_MS * 2 ** (attempt - 1)));
  }
}

async function pollJob(location, view, job) {
  let delay = POLL_START_MS;
  for (;;) {
    showJob(view, job);
    if (JOB_ENDS.has(job.status)) return job;
    await sleep(delay);
    delay = Math.min(POLL_MAX_MS, Math.round(delay * 1.5));
    job = await poll(location);
  }
}

// Cancel the job: its queued items are never made, its running ones stop, its finished
// ones keep their images. The job's stream (or next poll) then shows it ending cancelled;
// a job that ended first (409) simply ends as it did.
async function cancelJob(location) {
  try {
    await api(location, { method: "DELETE" });
  } catch (err) {
    if (err instanceof ApiError && err.status === 409) return;
    el.cancel.disabled = false;
    showProblem("The job could not be cancelled", err.message);
  }
}

// ---------- job cards ----------

// A card per item of the job, on top of the gallery, each showing its item's state, step and
// latest preview until its image's card takes its place.
function jobView(job, kind, bodies, label) {
  const view = { kind, bodies, label, items: new Map() };
  for (const item of job.items) {
    const node = el.jobCardTemplate.content.firstElementChild.cloneNode(true);
    const body = bodies[item.index] ?? bodies[0];
    const which = `Image ${item.index + 1} of ${job.items.length}`;
    node.dataset.jobId = job.id;
    node.dataset.index = String(item.index);
    node.querySelector(".title").textContent = cardTitle(kind, body);
    node.querySelector(".which").textContent = body.seed === undefined ? which : `${which}, seed ${body.seed}`;
    if (body.width) node.querySelector(".job-frame").style.aspectRatio = `${body.width} / ${body.height}`;
    node.querySelector(".job-preview").alt = `Preview of ${which.toLowerCase()}`;
    const bar = node.querySelector("progress");
    bar.max = body.steps ?? 1;
    bar.setAttribute("aria-label", `${which}: denoising steps done`);
    el.gallery.prepend(node);
    view.items.set(item.index, { node, status: null, done: false });
  }
  el.galleryEmpty.hidden = true;
  showJob(view, job);
  return view;
}

function showJobEvent(view, event, data) {
  if (event === "item") {
    showItem(view, data);
    showJobCount(view);
  } else if (event === "progress" || event === "preview") {
    showStep(view, data);
  }
}

function showJob(view, job) {
  for (const item of job.items) showItem(view, item);
  showJobCount(view);
}

function showJobCount(view) {
  const ended = [...view.items.values()].filter((i) => JOB_ENDS.has(i.status)).length;
  setStatus(`${view.label}: ${ended} of ${view.items.size} done…`);
}

// An item's state; a succeeded one's card replaces its job card.
function showItem(view, item) {
  const shown = view.items.get(item.index);
  if (!shown || shown.done) return;
  shown.status = item.status;
  shown.node.dataset.status = item.status;
  if (item.status === "succeeded" && item.result) {
    addCard(item.result, view.kind, view.bodies[item.index] ?? view.bodies[0], shown.node);
    shown.done = true;
    return;
  }
  shown.node.querySelector(".state").textContent = item.status === "failed"
    ? `Failed: ${item.error || "the server gave no reason"}`
    : ITEM_WORDS[item.status] ?? item.status;
  if (item.progress) showStep(view, { index: item.index, ...item.progress });
}

// A running item's step, and its preview where the event has one.
function showStep(view, { index, step, total_steps: total, image }) {
  const shown = view.items.get(index);
  if (!shown || shown.done || JOB_ENDS.has(shown.status)) return;
  const bar = shown.node.querySelector("progress");
  bar.max = total;
  bar.value = step;
  shown.node.querySelector(".step").textContent = `Step ${step} of ${total}`;
  if (image) {
    const preview = shown.node.querySelector(".job-preview");
    preview.src = image;
    preview.hidden = false;
  }
}

// ---------- gallery ----------

function cardTitle(kind, body) {
  return kind === "weapon"
    ? state.weaponFields.map((f) => body[f]).filter((v) => v && v !== "none").map(human).join(" · ")
    : "Custom prompt";
}

// The image's card, on top of the gallery or in the place of `replacing` (its job card).
function addCard(result, kind, body, replacing = null) {
  state.cards += 1;
  const n = state.cards;
  const node = el.cardTemplate.content.firstElementChild.cloneNode(true);
  node.id = `card-${n}`;
  node.dataset.assetId = result.id;
  node.dataset.seed = String(result.seed);
  const img = node.querySelector("img");
  img.src = result.asset_url;
  img.width = result.width;
  img.height = result.height;
  img.alt = `Forged image ${n}: ${result.prompt}`;
  node.querySelector(".image-link").href = result.asset_url;
  node.querySelector(".prompt").textContent = result.prompt;
  node.querySelector(".title").textContent = cardTitle(kind, body);
  const meta = [
    ["Seed", String(result.seed)],
    ["Size", `${result.width} × ${result.height}`],
    ["Steps", body.steps ?? "default"],
    ["Guidance", body.guidance_scale ?? "default"],
    ["Scheduler", human(body.scheduler || "dpmpp_2m")],
    ["Model", `${result.model.name} ${result.model.version}`.trim()],
    ["Time", result.cached ? "from cache" : `${(result.timings.total_ms / 1000).toFixed(2)} s`],
  ];
  if (result.init_image) {
    const from = state.seenIds.get(result.init_image);
    meta.push(["From", from === undefined ? "a sketch" : `image ${from}`], ["Strength", +result.strength.toFixed(3)]);
    node.dataset.initImage = result.init_image;
  }
  if (result.style) meta.push(["Style", result.style], ["Style weight", +result.style_weight.toFixed(3)]);
  node.querySelector(".meta").replaceChildren(...meta.flatMap(([k, v]) => [
    Object.assign(document.createElement("dt"), { textContent: k }),
    Object.assign(document.createElement("dd"), { textContent: String(v) }),
  ]));
  const download = node.querySelector(".download");
  download.href = result.asset_url;
  download.download = `forge-${result.seed}.${result.format}`;
  download.setAttribute("aria-label", `Download image ${n} (${result.format.toUpperCase()})`);
  const again = node.querySelector(".again");
  again.setAttribute("aria-label", `Again with seed ${result.seed} (image ${n})`);
  again.addEventListener("click", () =>
    forge(kind, [{ ...body, seed: BigInt(result.seed) }], `Again with seed ${result.seed}`));
  const variations = node.querySelector(".variations");
  variations.setAttribute("aria-label", `Variations of image ${n}: the next three seeds`);
  variations.addEventListener("click", () => {
    const seed = BigInt(result.seed);
    const seeds = [1n, 2n, 3n].map((d) => (state.seedMax === null || seed + d <= state.seedMax ? seed + d : seed - d));
    forge(kind, seeds.map((s) => ({ ...body, seed: s })), `Variations of image ${n}`);
  });
  const refine = node.querySelector(".refine");
  refine.setAttribute("aria-label", `Refine image ${n}: the next forge starts from it`);
  refine.addEventListener("click", () => {
    setSketch({ id: result.id, url: result.asset_url, width: result.width, height: result.height, what: `image ${n}` });
    clearErrors();
    setStatus(`Image ${n} is the input image: change the weapon or details, then forge.`);
    el.strength.focus();
  });
  const first = state.seenIds.get(result.id);
  if (first !== undefined) {
    const same = node.querySelector(".same");
    same.textContent = `Identical to image ${first}: same seed and parameters, same asset.`;
    same.hidden = false;
  } else {
    state.seenIds.set(result.id, n);
  }
  if (/tiny/i.test(result.model.name)) {
    el.tinyName.textContent = result.model.name;
    el.tinyNote.hidden = false;
  }
  el.galleryEmpty.hidden = true;
  if (replacing) replacing.replaceWith(node);
  else el.gallery.prepend(node);
  el.galleryCount.textContent = `${state.cards} image${state.cards === 1 ? "" : "s"}`;
  setBusy(state.busy);
}

// ---------- key ----------

function showKeyPanel(message = "") {
  el.keyPanel.hidden = false;
  el.keyError.textContent = message;
  if (message) el.keyInput.setAttribute("aria-invalid", "true");
  else el.keyInput.removeAttribute("aria-invalid");
  el.keyInput.focus();
}

function showKeyState() {
  el.keyState.hidden = !state.key;
  if (state.key) el.keyHint.textContent = `…${state.key.slice(-4)}`;
}

async function start() {
  showKeyState();
  if (!state.key) {
    el.workspace.hidden = true;
    showKeyPanel();
    return;
  }
  setStatus("Loading the forge…");
  try {
    const [{ data: openapi }, templates] = await Promise.all([
      api("/openapi.json", { auth: false }),
      api("/v1/weapons/templates").then((r) => r.data).catch((err) => {
        if (err instanceof ApiError && err.status === 404) return null; // gateway without it
        throw err;
      }),
    ]);
    buildBuilder(openapi);
    state.templates = templates;
    state.negative = templates?.negative_prompt ?? "";
    el.prompt.readOnly = !templates;
    if (!templates) el.prompt.value = "The server writes the prompt from the weapon (no preview).";
    updatePrompt();
    el.keyPanel.hidden = true;
    el.workspace.hidden = false;
    setStatus("");
  } catch (err) {
    setStatus("");
    if (err instanceof ApiError && err.status === 401) {
      el.workspace.hidden = true;
      showKeyPanel(`The API key was refused: ${err.detail || err.title}. Enter a valid key.`);
    } else {
      el.workspace.hidden = false;
      if (err instanceof ApiError) handleError(err);
      else showProblem("The page could not start", String(err));
    }
  }
}

el.keyForm.addEventListener("submit", (e) => {
  e.preventDefault();
  const key = el.keyInput.value.trim();
  if (!key) {
    showKeyPanel("Enter an API key.");
    return;
  }
  state.key = key;
  localStorage.setItem(KEY_STORAGE, key);
  el.keyInput.value = "";
  start();
});

el.forgetKey.addEventListener("click", () => {
  localStorage.removeItem(KEY_STORAGE);
  state.key = null;
  showKeyState();
  el.workspace.hidden = true;
  showKeyPanel("The key is forgotten: this browser no longer holds it.");
  el.keyInput.removeAttribute("aria-invalid");
});

el.changeKey.addEventListener("click", () => showKeyPanel());
el.cancel.addEventListener("click", () => {
  el.cancel.disabled = true;
  state.cancel?.();
});

el.builder.addEventListener("change", (e) => { if (e.target.closest("#choices")) updatePrompt(); });
el.text.addEventListener("input", updatePrompt);
el.prompt.addEventListener("input", showPromptMode);
el.resetPrompt.addEventListener("click", () => {
  el.prompt.value = state.rendered;
  showPromptMode();
  el.prompt.focus();
});
// Editing a field clears its error (the selects are built later: delegate).
el.builder.addEventListener("input", (e) => {
  const input = e.target;
  if (input.getAttribute?.("aria-invalid")) {
    input.removeAttribute("aria-invalid");
    const out = $(`err-${input.name}`);
    if (out) out.textContent = "";
  }
});
el.builder.addEventListener("submit", (e) => {
  e.preventDefault();
  clearErrors();
  const request = formRequest();
  if (request) forge(request.kind, [request.body], "Forge");
});

start();
