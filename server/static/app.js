// Marble dashboard: submit a prompt and watch its masked positions resolve step by step, or
// follow every request on the server. Plain JS, no dependencies, no build step.
//
// Events (DESIGN.md "API contract") only update per-request state objects; drawing happens
// once per animation frame for the cards that changed, so many concurrent streams cannot
// flood the DOM. The number of cards is capped; finished cards are evicted first.
"use strict";

const MAX_CARDS = 24;
const PROMPT_CHARS = 2000; // a card shows a long prompt's end: the text its completion continues
const EVENT_NAMES = [
  "request.queued", "request.started", "step", "block.committed", "snapshot",
  "request.completed", "error",
];
const FINAL = new Set(["request.completed", "error"]);

const $ = (id) => document.getElementById(id);
// /v1 routes want `Authorization: Bearer` when the server runs with --api-key.
const authHeaders = () => {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
};
const cards = new Map(); // request_id -> Card
const dirty = new Set(); // Cards to redraw on the next frame
let frameRequested = false;
let controller = null; // AbortController of the running generate stream
let watchSource = null; // watch-all: an EventSource, or {close()} for the fetch fallback

// ------------------------------------------------------------------------------- SSE parse
// Minimal text/event-stream parser for fetch() bodies (EventSource cannot POST).
function sseParser(onEvent) {
  let buffer = "";
  let event = { name: "message", id: null, data: [] };
  return (chunk) => {
    buffer += chunk;
    const lines = buffer.split(/\r\n|\r|\n/);
    buffer = lines.pop(); // an incomplete last line waits for more bytes
    for (const line of lines) {
      if (line === "") {
        if (event.data.length) onEvent(event.name, event.data.join("\n"), event.id);
        event = { name: "message", id: null, data: [] };
      } else if (line.startsWith(":")) {
        // comment (keep-alive ping)
      } else {
        const i = line.indexOf(":");
        const field = i < 0 ? line : line.slice(0, i);
        let value = i < 0 ? "" : line.slice(i + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "event") event.name = value;
        else if (field === "data") event.data.push(value);
        else if (field === "id") event.id = value;
      }
    }
  };
}

// ------------------------------------------------------------------------------ card state
class Card {
  constructor(requestId, params) {
    this.id = requestId;
    this.params = params || {}; // what we asked for (own requests): block_length, max_tokens
    this.state = "queued";
    this.lastSeq = 0;
    this.step = 0;
    this.totalSteps = null;
    this.blockIndex = null;
    this.numBlocks = null;
    this.numMasked = null;
    this.forward = null; // the kind of forward the last step took: full, prefix_cached, dual_cached
    this.positions = null; // canvas positions that forward computed
    this.length = params && params.max_tokens ? params.max_tokens : 0;
    this.cells = []; // pos -> {text, confidence, step} | undefined (masked)
    this.committedCount = 0;
    this.fresh = new Set(); // positions committed by the latest step
    this.text = "";
    this.textIsFinal = false;
    this.prompt = null; // from request.queued (or what we sent); null: joined too late to see it
    if (params && typeof params.prompt === "string") this.setPrompt(params.prompt);
    this.updated = performance.now();
    this.el = null;
  }

  get finished() {
    return this.state === "completed" || this.state === "error";
  }

  // Returns false for a duplicate (already seen through the other stream).
  apply(name, data) {
    const seq = data.sequence_number;
    if (typeof seq === "number") {
      if (seq <= this.lastSeq) return false;
      this.lastSeq = seq;
    }
    this.updated = performance.now();
    switch (name) {
      case "request.queued":
        this.state = "queued";
        if (typeof data.prompt === "string") this.setPrompt(data.prompt);
        this.takeShape(data);
        break;
      case "request.started":
        this.state = "running";
        this.takeShape(data);
        break;
      case "step":
        this.state = "running";
        this.takeShape(data);
        this.fresh = new Set();
        for (const c of data.committed || []) this.commit(c, data.step);
        if (typeof data.accepted === "number") this.takeCanvas(data);
        else if (Array.isArray(data.changed)) this.takeCorrections(data);
        if (typeof data.step === "number") this.step = data.step;
        if (data.total_steps !== undefined) this.totalSteps = data.total_steps;
        if (typeof data.block_index === "number") this.blockIndex = data.block_index;
        if (typeof data.num_masked === "number") this.numMasked = data.num_masked;
        if (typeof data.forward === "string") this.forward = data.forward;
        if (typeof data.positions === "number") this.positions = data.positions;
        // Prompt positions its first step took from the prefix cache (block-causal models).
        if (typeof data.prompt_cached === "number") this.promptCached = data.prompt_cached;
        // A constrained row's proposals its grammar turned away this step.
        if (typeof data.grammar_rejected === "number") {
          this.grammarRejected = (this.grammarRejected || 0) + data.grammar_rejected;
        }
        if (typeof data.draft === "string" && !this.textIsFinal) this.text = data.draft;
        else if (typeof data.text === "string" && !this.textIsFinal) this.text = data.text;
        this.length = Math.max(this.length, this.committedCount + (this.numMasked || 0));
        break;
      case "block.committed":
        // data.text is that block's text alone; the card shows drafts and the final text.
        break;
      case "snapshot":
        this.takeSnapshot(data);
        break;
      case "request.completed":
        this.state = "completed";
        this.fresh = new Set();
        if (typeof data.text === "string") {
          this.text = data.text;
          this.textIsFinal = true;
        }
        this.finishReason = data.finish_reason || null;
        if (data.usage) this.usage = data.usage;
        break;
      case "error":
        this.state = "error";
        this.text = (data.error && data.error.message) || data.message || "error";
        this.textIsFinal = true;
        break;
      default:
        return false;
    }
    return true;
  }

  setPrompt(prompt) {
    this.prompt = prompt.length > PROMPT_CHARS ? `…${prompt.slice(-PROMPT_CHARS)}` : prompt;
  }

  takeShape(data) {
    const p = data.params || data.sampling_params || data;
    for (const key of ["block_length", "max_tokens", "gen_length", "steps"]) {
      if (typeof p[key] === "number" && this.params[key] === undefined) this.params[key] = p[key];
    }
    const len = data.gen_length || data.length || p.gen_length || p.max_tokens;
    if (typeof len === "number") this.length = Math.max(this.length, len);
    if (typeof data.num_blocks === "number") this.numBlocks = data.num_blocks;
  }

  // A uniform-state model (no mask): a canvas starts as noise and every step may change any
  // of its positions, accepted (kept, coloured by certainty), re-noised (dark again) or final.
  takeCanvas(data) {
    this.uniform = true;
    this.accepted = data.accepted;
    this.renoised = data.renoised;
    if (data.canvas && Array.isArray(data.canvas.texts)) {
      data.canvas.texts.forEach((text, i) => {
        this.cells[data.canvas.start + i] = { text, confidence: 0, step: data.step, op: "renoise" };
      });
      this.length = Math.max(this.length, data.canvas.start + data.canvas.texts.length);
    }
    for (const pos of data.kept || []) {
      const cell = this.cells[pos];
      if (cell && cell.op === "renoise") this.cells[pos] = { ...cell, op: "accept", confidence: 0.5 };
    }
    for (const c of data.changed || []) {
      if (typeof c.pos !== "number" || c.pos >= this.length) continue;
      const certainty = c.op === "renoise" ? 0 : Math.exp(-(c.entropy ?? 0));
      this.cells[c.pos] = { text: c.text ?? "", confidence: certainty, step: data.step, op: c.op };
      this.fresh.add(c.pos);
    }
    if (data.canvas_completed && this.params.block_length) {
      const end = Math.min(this.length, (data.block_index + 1) * this.params.block_length);
      this.committedCount = Math.max(this.committedCount, end);
      for (let pos = data.block_index * this.params.block_length; pos < end; pos++) {
        if (this.cells[pos]) this.cells[pos].op = "final";
      }
    }
  }

  // A masked model correcting itself: an edit replaces a filled position's token (the cell
  // keeps an edit outline), a remask turns it back into a mask.
  takeCorrections(data) {
    this.edits = (this.edits || 0) + data.changed.filter((c) => c.op === "edit").length;
    this.remasks = (this.remasks || 0) + data.changed.filter((c) => c.op === "remask").length;
    for (const c of data.changed) {
      if (typeof c.pos !== "number") continue;
      if (c.op === "remask") {
        if (this.cells[c.pos] !== undefined) this.committedCount -= 1;
        delete this.cells[c.pos];
      } else {
        this.cells[c.pos] = { text: c.text ?? "", confidence: c.confidence ?? 1, step: data.step, op: "edit" };
      }
      this.fresh.add(c.pos);
    }
  }

  commit(c, step) {
    if (typeof c.pos !== "number") return;
    if (this.cells[c.pos] === undefined) this.committedCount += 1;
    this.cells[c.pos] = { text: c.text ?? "", confidence: c.confidence ?? 1, step };
    this.fresh.add(c.pos);
    if (c.pos + 1 > this.length) this.length = c.pos + 1;
  }

  // Sent in place of a step this page missed (dropped for a slow reader): the whole canvas
  // as token ids, its draft and counters. Cells committed in the missed steps have no text or
  // confidence here; they stay as they are and the draft line shows the whole text.
  takeSnapshot(data) {
    this.takeShape(data);
    if (Array.isArray(data.tokens)) this.length = Math.max(this.length, data.tokens.length);
    this.fresh = new Set();
    if (typeof data.step === "number") this.step = Math.max(this.step, data.step);
    if (data.total_steps !== undefined) this.totalSteps = data.total_steps;
    if (typeof data.block_index === "number") this.blockIndex = data.block_index;
    if (typeof data.num_masked === "number") {
      this.numMasked = data.num_masked;
      // Committed positions we never saw still count for tokens per forward.
      this.committedCount = Math.max(this.committedCount, this.length - data.num_masked);
    }
    if (typeof data.draft === "string" && !this.textIsFinal) this.text = data.draft;
    if (!this.finished && this.step > 0) this.state = "running";
  }

  blockRange() {
    if (this.blockIndex === null) return null;
    let bl = this.params.block_length;
    if (!bl && this.numBlocks) bl = Math.ceil(this.length / this.numBlocks);
    if (!bl) return null;
    return [this.blockIndex * bl, Math.min(this.length, (this.blockIndex + 1) * bl)];
  }

  tokensPerForward() {
    return this.step > 0 ? this.committedCount / this.step : null;
  }
}

// ---------------------------------------------------------------------------------- events
function handleEvent(name, raw, params) {
  let data;
  try {
    data = JSON.parse(raw);
  } catch {
    return null;
  }
  const id = data.request_id;
  if (!id || !EVENT_NAMES.includes(name)) return null;
  const key = data.choice_index ? `${id}#${data.choice_index}` : id;
  let card = cards.get(key);
  if (!card) {
    if (FINAL.has(name) && !params) return null; // a stranger's end: nothing to show
    card = new Card(key, params ? { ...params } : null);
    delete card.params.prompt; // kept (shortened) in card.prompt
    cards.set(key, card);
    evictCards();
  } else if (params) {
    for (const [k, v] of Object.entries(params)) {
      if (k !== "prompt" && card.params[k] === undefined) card.params[k] = v;
    }
  }
  if (card.apply(name, data)) markDirty(card);
  return card;
}

function evictCards() {
  if (cards.size <= MAX_CARDS) return;
  // Oldest finished first, then oldest of all.
  const byAge = [...cards.values()].sort((a, b) => a.updated - b.updated);
  const victims = byAge.filter((c) => c.finished).concat(byAge.filter((c) => !c.finished));
  for (const card of victims) {
    if (cards.size <= MAX_CARDS) break;
    cards.delete(card.id);
    dirty.delete(card);
    if (card.el) card.el.remove();
  }
}

function markDirty(card) {
  dirty.add(card);
  if (!frameRequested) {
    frameRequested = true;
    requestAnimationFrame(renderFrame);
  }
}

// --------------------------------------------------------------------------------- drawing
const COLORS = {
  masked: "#2a2f3a",
  maskedText: "#596273",
  block: "#f2b134",
  fresh: "#ffffff",
  noise: "#6b3a4a", // a uniform-state position holding noise (re-noised this step or never kept)
  noiseText: "#e3b9c6",
  edit: "#c2185b", // outline of a position a later step replaced (token editing)
  text: "#0b0f14",
  mark: "rgba(11, 15, 20, 0.45)", // whitespace marks: visible, but clearly not text
};

function confidenceColor(conf) {
  const c = Math.max(0, Math.min(1, Number(conf) || 0));
  // Pale blue (uncertain) to saturated teal (certain).
  const light = 82 - 42 * c;
  return `hsl(${200 - 30 * c}, ${45 + 40 * c}%, ${light}%)`;
}

function cellColor(cell) {
  if (!cell) return COLORS.masked;
  return cell.op === "renoise" ? COLORS.noise : confidenceColor(cell.confidence);
}

function renderFrame() {
  frameRequested = false;
  const container = $("cards");
  for (const card of dirty) {
    if (!cards.has(card.id)) continue;
    if (!card.el) {
      card.el = $("card-template").content.firstElementChild.cloneNode(true);
      card.el.dataset.requestId = card.id;
      container.prepend(card.el);
    }
    drawCard(card);
  }
  dirty.clear();
}

function drawCard(card) {
  const el = card.el;
  el.dataset.state = card.state;
  el.dataset.step = String(card.step);
  el.querySelector(".rid").textContent = card.id;
  const state = el.querySelector(".state");
  state.textContent = card.finished && card.finishReason ? `${card.state} (${card.finishReason})` : card.state;
  state.className = `state pill ${card.state}`;
  el.querySelector(".step").textContent = String(card.step);
  el.querySelector(".total").textContent = card.totalSteps ? `/${card.totalSteps}` : "";
  el.querySelector(".block").textContent = card.blockIndex === null ? "–" : String(card.blockIndex);
  el.querySelector(".masked").textContent = card.numMasked === null ? "–" : String(card.numMasked);
  el.querySelector(".masked-label").textContent = card.uniform ? "not final" : "masked";
  const tpf = card.tokensPerForward();
  el.querySelector(".tpf").textContent = tpf === null ? "–" : tpf.toFixed(2);
  let fwd = card.forward === null ? "–" : `${card.forward.replace("_", " ")} (${card.positions} positions)`;
  if (card.uniform) fwd += ` · accepted ${card.accepted} / renoised ${card.renoised}`;
  else if (card.edits || card.remasks) fwd += ` · edits ${card.edits || 0} / remasks ${card.remasks || 0}`;
  if (card.grammarRejected !== undefined) fwd += ` · grammar rejected ${card.grammarRejected}`;
  if (card.promptCached) fwd += ` · prompt cached ${card.promptCached}`;
  el.querySelector(".fwd").textContent = fwd;
  const prompt = el.querySelector(".prompt");
  if (prompt.textContent !== (card.prompt ?? "")) prompt.textContent = card.prompt ?? "";
  prompt.hidden = card.prompt === null;
  const text = el.querySelector(".text");
  text.textContent = card.text;
  text.classList.toggle("final", card.textIsFinal);
  drawCanvas(card, el.querySelector("canvas"));
}

// Whitespace and control characters drawn as visible marks (in a fainter ink than text).
const MARKS = { " ": "·", "\n": "⏎", "\t": "⇥", "\r": "␍" };
function glyphs(text) {
  // -> [{ch, mark}] per code point; an empty token shows ∅.
  if (text === "") return [{ ch: "∅", mark: true }];
  return [...text].map((ch) => {
    if (MARKS[ch]) return { ch: MARKS[ch], mark: true };
    const code = ch.codePointAt(0);
    if (code < 0x20) return { ch: String.fromCodePoint(0x2400 + code), mark: true };
    return { ch, mark: false };
  });
}

const CELL = {
  font: "12px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace",
  h: 22, // cell height; the text's baseline sits at `baseline`, its descenders above `bar`
  baseline: 14,
  bar: 19, // the block underline: rows [bar, h), below every glyph (underscores included)
  gap: 3,
  pad: 3,
  minChars: 2,
  tiny: 12, // without text (long canvases): square cells
};

// Flow layout: each cell is as wide as its whole text (monospace: characters x one advance),
// cells wrap to the next row at the canvas edge. -> [{x, y, w, glyphs}]
function layoutCells(card, n, width, charW) {
  const cells = [];
  let x = 0;
  let y = 0;
  for (let pos = 0; pos < n; pos++) {
    const cell = card.cells[pos];
    const g = cell ? glyphs(cell.text) : [{ ch: "▒", mark: false }];
    const w = Math.min(width, Math.max(CELL.minChars, g.length) * charW + 2 * CELL.pad);
    if (x > 0 && x + w > width) {
      x = 0;
      y += CELL.h + CELL.gap;
    }
    cells.push({ x, y, w, glyphs: g });
    x += w + CELL.gap;
  }
  return { cells, height: y + CELL.h };
}

function sizeCanvas(canvas, cssWidth, cssHeight) {
  const dpr = window.devicePixelRatio || 1;
  if (canvas.width !== Math.round(cssWidth * dpr) || canvas.height !== Math.round(cssHeight * dpr)) {
    canvas.width = Math.round(cssWidth * dpr);
    canvas.height = Math.round(cssHeight * dpr);
    canvas.style.height = `${cssHeight}px`;
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, cssWidth, cssHeight);
  return ctx;
}

function drawCanvas(card, canvas) {
  const n = Math.max(card.length, 1);
  const cssWidth = canvas.clientWidth || 600;
  const block = card.finished ? null : card.blockRange();
  const inBlock = (pos) => block && pos >= block[0] && pos < block[1];
  if (n > 256) {
    // Too many positions to read: small squares, colour only.
    const size = CELL.tiny;
    const cols = Math.max(1, Math.floor((cssWidth + 2) / (size + 2)));
    const ctx = sizeCanvas(canvas, cssWidth, Math.ceil(n / cols) * (size + 2));
    for (let pos = 0; pos < n; pos++) {
      const x = (pos % cols) * (size + 2);
      const y = Math.floor(pos / cols) * (size + 2);
      const cell = card.cells[pos];
      ctx.fillStyle = cellColor(cell);
      ctx.fillRect(x, y, size, size);
      if (inBlock(pos)) {
        ctx.fillStyle = COLORS.block;
        ctx.fillRect(x, y + size - 3, size, 3);
      }
      if (cell && card.fresh.has(pos)) {
        ctx.strokeStyle = COLORS.fresh;
        ctx.strokeRect(x + 0.5, y + 0.5, size - 1, size - 1);
      }
    }
    return;
  }
  const measure = canvas.getContext("2d");
  measure.font = CELL.font;
  const charW = Math.ceil(measure.measureText("M").width);
  const layout = layoutCells(card, n, cssWidth, charW);
  const ctx = sizeCanvas(canvas, cssWidth, layout.height);
  ctx.font = CELL.font;
  ctx.textBaseline = "alphabetic";
  ctx.textAlign = "center";
  layout.cells.forEach(({ x, y, w, glyphs: g }, pos) => {
    const cell = card.cells[pos];
    ctx.fillStyle = cellColor(cell);
    ctx.fillRect(x, y, w, CELL.h);
    if (inBlock(pos)) {
      ctx.fillStyle = COLORS.block;
      ctx.fillRect(x, y + CELL.bar, w, CELL.h - CELL.bar);
    }
    if (cell && cell.op === "edit") {
      ctx.strokeStyle = COLORS.edit;
      ctx.lineWidth = 3;
      ctx.strokeRect(x + 1.5, y + 1.5, w - 3, CELL.h - 3);
    }
    if (cell && card.fresh.has(pos)) {
      ctx.strokeStyle = COLORS.fresh;
      ctx.lineWidth = 2;
      ctx.strokeRect(x + 1, y + 1, w - 2, CELL.h - 2);
    }
    // One glyph per character slot, centred in it; a glyph wider than the slot (⏎ in some
    // fonts) or a token wider than the whole row is squeezed, never cut.
    const slots = Math.max(CELL.minChars, g.length);
    const slotW = (w - 2 * CELL.pad) / slots;
    const left = x + CELL.pad + ((slots - g.length) * slotW) / 2;
    g.forEach(({ ch, mark }, i) => {
      const noise = cell && cell.op === "renoise";
      ctx.fillStyle = !cell ? COLORS.maskedText : noise ? COLORS.noiseText : mark ? COLORS.mark : COLORS.text;
      ctx.fillText(ch, left + (i + 0.5) * slotW, y + CELL.baseline, slotW);
    });
  });
}

// ---------------------------------------------------------------------------- own requests
// The form's fields, as SamplingParams names. Until the served model's defaults arrive (GET
// /v1/models) a blank field is left out and the server applies its default; once they have,
// the form holds them and every field is sent as shown (an empty nullable field as null).
const NUMBER_FIELDS = [
  "max_tokens",
  "steps",
  "block_length",
  "threshold",
  "verify_threshold",
  "temperature",
  "seed",
];
const NULLABLE = {
  steps: "one token/step",
  threshold: "off (fixed steps)",
  verify_threshold: "off",
  block_length: "one block",
  seed: "random",
};
const CHECK_FIELDS = ["token_healing", "ignore_eos"];
const SELECT_FIELDS = ["remasking", "cache"];
let served = null; // the served model's defaults, once loaded

function applyDefaults(defaults) {
  // A model's defaults list only the settings it reads: the others are greyed out, not sent.
  for (const name of [...NUMBER_FIELDS, ...SELECT_FIELDS, ...CHECK_FIELDS]) {
    $(name).disabled = !(name in defaults);
  }
  for (const name of NUMBER_FIELDS) {
    const v = defaults[name];
    $(name).value = v === null || v === undefined ? "" : String(v);
  }
  // What an empty nullable field means once the form is the served defaults.
  for (const [name, meaning] of Object.entries(NULLABLE)) $(name).placeholder = meaning;
  for (const name of SELECT_FIELDS) {
    if ([...$(name).options].some((o) => o.value === defaults[name])) $(name).value = defaults[name];
  }
  for (const name of CHECK_FIELDS) {
    $(name).indeterminate = false;
    $(name).checked = Boolean(defaults[name]);
  }
}

function readParams() {
  const body = { prompt: $("prompt").value };
  for (const name of NUMBER_FIELDS) {
    if ($(name).disabled) continue;
    const v = $(name).value.trim();
    if (v !== "") body[name] = Number(v);
    else if (served && name in NULLABLE) body[name] = null;
  }
  for (const name of SELECT_FIELDS) {
    if ($(name).value && !$(name).disabled) body[name] = $(name).value;
  }
  for (const name of CHECK_FIELDS) {
    if ($(name).disabled) continue;
    if (served || !$(name).indeterminate) body[name] = $(name).checked;
  }
  return body;
}

function showError(message) {
  const p = $("form-error");
  p.textContent = message || "";
  p.hidden = !message;
}

async function readStream(resp, onEvent, onId) {
  const decoder = new TextDecoder();
  const feed = sseParser((name, raw, id) => {
    if (onId && id !== null) onId(id);
    onEvent(name, raw);
  });
  const reader = resp.body.getReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    feed(decoder.decode(value, { stream: true }));
  }
}

async function errorMessage(resp) {
  try {
    const body = await resp.json();
    return (body.error && body.error.message) || JSON.stringify(body);
  } catch {
    return `${resp.status} ${resp.statusText}`;
  }
}

async function generate(event) {
  event.preventDefault();
  showError("");
  const body = readParams();
  controller = new AbortController();
  $("generate").disabled = true;
  $("stop").disabled = false;
  let card = null;
  try {
    const resp = await fetch("v1/diffusion/generate", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...authHeaders() },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!resp.ok) {
      showError(await errorMessage(resp));
      return;
    }
    await readStream(resp, (name, raw) => {
      const c = handleEvent(name, raw, body);
      if (c) card = c;
    });
    if (card && !card.finished) showError("the stream ended before the request completed");
  } catch (err) {
    if (err.name !== "AbortError") showError(`request failed: ${err.message}`);
    else if (card && !card.finished) {
      // Closing the stream aborts the request on the server; say so without waiting.
      card.state = "completed";
      card.finishReason = "abort";
      card.fresh = new Set();
      markDirty(card);
    }
  } finally {
    controller = null;
    $("generate").disabled = false;
    $("stop").disabled = true;
  }
}

function stop() {
  if (controller) controller.abort(); // the server aborts the request on disconnect
}

// ------------------------------------------------------------------------------- watch all
function setWatch(on) {
  if (watchSource) {
    watchSource.close();
    watchSource = null;
  }
  $("watch-status").textContent = "";
  if (!on) return;
  watchSource = Object.keys(authHeaders()).length ? watchWithFetch() : watchWithEventSource();
}

function watchWithEventSource() {
  const source = new EventSource("v1/diffusion/events");
  for (const name of EVENT_NAMES) {
    source.addEventListener(name, (e) => handleEvent(name, e.data, null));
  }
  source.onopen = () => {
    $("watch-status").textContent = "following every request";
  };
  source.onerror = () => {
    // EventSource reconnects by itself (with Last-Event-ID); just say so.
    $("watch-status").textContent = "reconnecting…";
  };
  return source;
}

// EventSource cannot send an Authorization header: with an API key, follow the same stream
// with fetch(), reconnecting with Last-Event-ID as EventSource would.
function watchWithFetch() {
  const abort = new AbortController();
  let lastId = null;
  (async () => {
    while (!abort.signal.aborted) {
      try {
        const headers = { Accept: "text/event-stream", ...authHeaders() };
        if (lastId !== null) headers["Last-Event-ID"] = lastId;
        const resp = await fetch("v1/diffusion/events", { headers, signal: abort.signal });
        if (!resp.ok) {
          $("watch-status").textContent = await errorMessage(resp);
        } else {
          $("watch-status").textContent = "following every request";
          await readStream(resp, (name, raw) => handleEvent(name, raw, null), (id) => {
            lastId = id;
          });
        }
      } catch (err) {
        if (err.name === "AbortError") return;
      }
      $("watch-status").textContent = "reconnecting…";
      await new Promise((resolve) => setTimeout(resolve, 2000));
    }
  })();
  return { close: () => abort.abort() };
}

// ---------------------------------------------------------------------------------- health
async function pollHealth() {
  const pill = $("server-status");
  try {
    const resp = await fetch("health", { cache: "no-store" });
    pill.textContent = resp.ok ? "ready" : `not ready (${resp.status})`;
    pill.className = `pill ${resp.ok ? "completed" : "queued"}`;
  } catch {
    pill.textContent = "unreachable";
    pill.className = "pill error";
  }
}

async function loadModel() {
  try {
    const resp = await fetch("v1/models", { headers: authHeaders() });
    if (!resp.ok) {
      if (!served) $("defaults-status").textContent = `model defaults: ${await errorMessage(resp)}`;
      return;
    }
    const body = await resp.json();
    const card = body.data && body.data[0];
    if (!card) return;
    $("model-name").textContent = card.id;
    // The first defaults to arrive fill the form; a later reload (new API key) keeps edits.
    if (card.defaults && !served) {
      served = card.defaults;
      applyDefaults(served);
      $("defaults-status").textContent = `The form starts from ${card.id}'s serving defaults.`;
      document.body.dataset.defaults = "loaded";
      $("reset-defaults").disabled = false;
    }
  } catch {
    // the health pill already says the server is unreachable
  }
}

window.addEventListener("resize", () => {
  for (const card of cards.values()) markDirty(card);
});
$("generate-form").addEventListener("submit", generate);
$("stop").addEventListener("click", stop);
$("reset-defaults").addEventListener("click", () => {
  if (served) applyDefaults(served);
});
for (const name of CHECK_FIELDS) $(name).indeterminate = true; // "server default" until loaded
$("watch-all").addEventListener("change", (e) => setWatch(e.target.checked));
$("api-key").addEventListener("change", () => {
  loadModel();
  if ($("watch-all").checked) setWatch(true);
});
if (new URLSearchParams(location.search).has("watch")) {
  $("watch-all").checked = true;
  setWatch(true);
}
pollHealth();
loadModel();
setInterval(pollHealth, 5000);
