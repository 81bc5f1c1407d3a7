// The girandole playground: plain JavaScript against the server's own API (same origin).
// Chat goes to /v1/chat/completions, raw text ("Use chat template" unchecked) to
// /v1/completions; both stream (SSE) and ask for perf metrics and logprobs for the token view.
// With MCP servers named, chat goes to /v1/responses instead: the server lists their tools and
// runs the model's calls itself; the page shows the calls and their results.
// A chat message may carry images for a vision model (images.js): image_url parts.
// The Embeddings and Rerank tabs post to /v1/embeddings and /v1/rerank (one JSON answer each).
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "girandole.apiKey";
const EXPORT_FORMAT = "girandole-playground/2"; // /2: the conversation as a tree of versions
const EXPORT_V1 = "girandole-playground/1"; // a list of messages: still imported

// Number fields of the parameters panel, in the order the request lists them.
const NUMBER_FIELDS = [
  "max_tokens", "temperature", "top_p", "top_k", "min_p", "typical_p", "presence_penalty",
  "frequency_penalty", "repetition_penalty", "mirostat_target", "mirostat_lr", "seed", "n",
];
const INT_FIELDS = new Set(["max_tokens", "top_k", "seed", "n", "top_logprobs"]);
// What the server applies to an omitted field when the model's generation config says nothing
// (girandole/api/serving/params.py); replaced by the fireworks-sampling-options header's values.
const FALLBACKS = {
  temperature: 1, top_p: 1, top_k: 0, min_p: 0, typical_p: 1, presence_penalty: 0,
  frequency_penalty: 0, repetition_penalty: 1,
};
// Arguments the openai SDK's chat.completions.create() names; anything else travels in
// extra_body.
const CHAT_ARGS = new Set([
  "model", "messages", "max_tokens", "temperature", "top_p", "n", "seed", "stop",
  "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs",
  "response_format", "user", "reasoning_effort",
]);
// Those its completions.create() names: no top_logprobs or response_format (a TypeError there).
const COMPLETIONS_ARGS = new Set([
  "model", "prompt", "max_tokens", "temperature", "top_p", "n", "seed", "stop",
  "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "echo", "user", "suffix",
]);
// Arguments the openai SDK's embeddings.create() names (normalize travels in extra_body).
const EMBEDDINGS_ARGS = new Set(["model", "input", "dimensions", "encoding_format", "user"]);
const SHOWN_VALUES = 8; // the first values of each vector the Embeddings tab shows

const state = {
  tab: "generate", // the header's mode: generate (chat and raw), embeddings or rerank
  models: [], // /v1/models entries
  // The conversation as a tree: a node's `children` are the versions of the next turn and
  // `active` the one shown; the root is no message (its children: the first turn's versions).
  // The page shows one branch: from the root, each node's active child (branch()).
  // A message: {role, choices: [{content, reasoning, tokens, finish_reason}], sel, stats,
  // children, active}.
  tree: { children: [], active: 0 },
  raw: null, // raw mode's last completion, same shape as an assistant message
  controller: null, // AbortController of the running request
  applied: {}, // fireworks-sampling-options of the last response
};

// ---------------------------------------------------------------- API calls

class ApiError extends Error {
  constructor(status, message) {
    super(status ? `${status}: ${message}` : message);
    this.status = status;
  }
}

function apiKey() {
  return localStorage.getItem(KEY_STORE) || "";
}

async function errorMessage(res) {
  const text = await res.text();
  try {
    return JSON.parse(text).error.message || text;
  } catch {
    return text || res.statusText;
  }
}

// fetch with the stored key; a 401 asks for a key and tries again.
async function apiFetch(path, { body, signal } = {}) {
  for (;;) {
    const headers = {};
    if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let res;
    try {
      res = await fetch(path, {
        method: body === undefined ? "GET" : "POST",
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal,
      });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      // the browser's own words ("Failed to fetch") say neither what failed nor what to do
      throw new ApiError(0, `Could not reach the server at ${location.origin} (${err.message}): is it running?`);
    }
    if (res.status === 401) {
      const message = await errorMessage(res);
      if (await askKey(message)) continue;
      throw new ApiError(401, message);
    }
    if (!res.ok) throw new ApiError(res.status, await errorMessage(res));
    return res;
  }
}

// POST a streaming request; `onEvent` gets each JSON payload of the SSE stream.
async function streamRequest(path, body, signal, onEvent) {
  const res = await apiFetch(path, { body, signal });
  showApplied(res.headers.get("fireworks-sampling-options"));
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(0, `The connection to the server was lost before the answer ended (${err.message})`);
    }
    const { value, done } = chunk;
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const payload = JSON.parse(data);
        if (payload.error) throw new ApiError(0, payload.error.message);
        onEvent(payload);
      }
    }
  }
}

// ---------------------------------------------------------------- the API key

let keyWaiters = []; // requests waiting for the dialog's answer, to retry or give up

function askKey(reason) {
  const dialog = $("key-dialog");
  $("key-reason").textContent = reason
    ? `The server answered 401: ${reason.replace(/\.$/, "")}. Enter an API key.`
    : "The key sent as Authorization: Bearer … to this server.";
  $("key-input").value = apiKey();
  if (!dialog.open) dialog.showModal();
  $("key-input").focus();
  return new Promise((resolve) => { keyWaiters.push(resolve); });
}

function keyDialogClosed() {
  const choice = $("key-dialog").returnValue;
  if (choice === "save" && $("key-input").value.trim()) {
    localStorage.setItem(KEY_STORE, $("key-input").value.trim());
  } else if (choice === "forget") {
    localStorage.removeItem(KEY_STORE);
  }
  const waiters = keyWaiters;
  keyWaiters = [];
  for (const resolve of waiters) resolve(choice === "save" && Boolean(apiKey()));
  // asked from the button (no request waiting to retry): list the models the new key sees
  if (!waiters.length && (choice === "save" || choice === "forget")) loadModels();
}

// ---------------------------------------------------------------- models

async function loadModels() {
  try {
    const res = await apiFetch("/v1/models");
    state.models = (await res.json()).data;
  } catch (err) {
    showError(`Could not list models: ${err.message}`);
    return;
  }
  const select = $("model");
  const previous = select.value;
  select.replaceChildren(...state.models.map((m) => {
    const option = document.createElement("option");
    option.value = m.id;
    const [base, deployment] = m.id.split("#");
    option.textContent = deployment ? `${base} on ${deployment.split("/").pop()}` : m.id;
    return option;
  }));
  if (state.models.some((m) => m.id === previous)) select.value = previous;
  modelChanged();
  hideError();
}

// No model listed (the list was refused: a wrong key given, the dialog cancelled) and a request
// would go with model "" (404, "Model not found", though the key now given is right): the list
// is asked for first (a 401 asks for the key again). False: still none (the error says why).
async function ensureModels() {
  if ($("model").options.length) return true;
  await loadModels();
  return $("model").options.length > 0;
}

function currentModel() {
  return state.models.find((m) => m.id === $("model").value);
}

function modelChanged() {
  const model = currentModel();
  const chat = !model || model.supports_chat !== false;
  $("use-chat").disabled = !chat;
  if (!chat) $("use-chat").checked = false;
  imageControlsChanged();
  modeChanged();
}

function chatMode() {
  return $("use-chat").checked;
}

function modeChanged() {
  const generate = state.tab === "generate";
  $("chat-pane").hidden = !generate || !chatMode();
  $("raw-pane").hidden = !generate || chatMode();
  const max = $("p-max_tokens");
  max.placeholder = chatMode() ? max.dataset.defaultChat : max.dataset.defaultRaw;
}

// The header's tabs: Generate (chat and raw completions, the parameters panel), Embeddings,
// Rerank. Export, Import and Clear belong to the conversation: shown with Generate only.
function setTab(tab) {
  state.tab = tab;
  const generate = tab === "generate";
  for (const b of document.querySelectorAll(".modes button")) {
    b.classList.toggle("active", b.dataset.tab === tab);
    b.setAttribute("aria-selected", String(b.dataset.tab === tab));
  }
  document.body.dataset.tab = tab;
  $("embed-pane").hidden = tab !== "embeddings";
  $("rerank-pane").hidden = tab !== "rerank";
  for (const el of [$("params"), $("use-chat-box"), $("export"), $("import").parentElement, $("clear")]) {
    el.hidden = !generate;
  }
  hidePopup();
  hideError();
  modeChanged();
}

// ---------------------------------------------------------------- parameters

function showDefaults() {
  for (const [name, value] of Object.entries(FALLBACKS)) {
    $(`p-${name}`).placeholder = String(state.applied[name] ?? value);
  }
}

// The fireworks-sampling-options header: the values the server ran with. For the fields this
// request left out, they are the model's defaults: show them as placeholders.
function showApplied(header) {
  if (!header) return;
  let applied;
  try {
    applied = JSON.parse(header);
  } catch {
    return;
  }
  for (const name of Object.keys(FALLBACKS)) {
    if ($(`p-${name}`).value === "" && name in applied) state.applied[name] = applied[name];
  }
  showDefaults();
  $("applied").textContent = `Last request ran with: ${JSON.stringify(applied)}`;
}

// A number box whose text is no number ("1e", "-") reads as "" in the DOM: it is an error, not
// an empty field left out of the request.
function checkNumberBox(input, name) {
  if (input.validity && input.validity.badInput) throw new Error(`${name} is not a number`);
}

function readNumber(name) {
  const input = $(`p-${name}`);
  checkNumberBox(input, name);
  if (input.value.trim() === "") return undefined;
  const value = Number(input.value);
  if (!Number.isFinite(value) || (INT_FIELDS.has(name) && !Number.isInteger(value))) {
    throw new Error(`${name} must be ${INT_FIELDS.has(name) ? "an integer" : "a number"}`);
  }
  return value;
}

function readJSON(id, name) {
  const text = $(id).value.trim();
  if (!text) return undefined;
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new Error(`${name} is not valid JSON: ${err.message}`);
  }
}

// The sampling fields of the panel, as the request sends them (empty fields left out).
function samplingFields() {
  const out = {};
  for (const name of NUMBER_FIELDS) {
    const value = readNumber(name);
    if (value !== undefined) out[name] = value;
  }
  const stop = $("p-stop").value.split("\n").filter((s) => s !== "");
  if (stop.length) out.stop = stop.length === 1 ? stop[0] : stop;
  const bias = readJSON("p-logit_bias", "logit_bias");
  if (bias !== undefined) out.logit_bias = bias;
  if ($("p-logprobs").checked) {
    out.logprobs = true;
    const top = readNumber("top_logprobs");
    if (top !== undefined) out.top_logprobs = top;
  }
  if ($("p-ignore_eos").checked) out.ignore_eos = true;
  const format = $("p-format").value;
  if (format === "json_object") {
    const schema = readJSON("p-schema", "JSON schema");
    out.response_format = schema === undefined ? { type: "json_object" }
      : { type: "json_object", schema };
  } else if (format === "json_schema") {
    const schema = readJSON("p-schema", "JSON schema");
    if (schema === undefined) throw new Error("JSON schema: write a schema in the box");
    out.response_format = { type: "json_schema", json_schema: { name: "schema", schema } };
  } else if (format === "grammar") {
    const grammar = $("p-schema").value;
    if (!grammar.trim()) throw new Error("GBNF grammar: write a grammar in the box");
    out.response_format = { type: "grammar", grammar };
  }
  return out;
}

function formatChanged() {
  const format = $("p-format").value;
  $("schema-box").hidden = format === "text";
  $("schema-label").textContent = format === "grammar" ? "GBNF grammar (start rule root)"
    : format === "json_object" ? "JSON schema (optional)" : "JSON schema";
}

// ---------------------------------------------------------------- requests

// The messages of the branch shown, up to index `upTo`. An assistant turn's reasoning goes back
// as its reasoning_content (chat takes it on input; the template decides what it shows).
function chatMessages(upTo = Infinity) {
  const out = [];
  const system = $("system").value;
  if (system.trim()) out.push({ role: "system", content: system });
  for (const m of branch().slice(0, upTo)) {
    const message = { role: m.role, content: messageContent(text(m), m.images) };
    const reasoning = m.choices[m.sel].reasoning;
    if (m.role === "assistant" && reasoning) message.reasoning_content = reasoning;
    out.push(message);
  }
  return out;
}

// The reasoning_effort of the panel, for chat requests (completions have no reasoning).
function reasoningFields() {
  const effort = $("p-reasoning_effort").value;
  return effort ? { reasoning_effort: effort } : {};
}

// The request the page would send now: the conversation (plus the composer's text), or the raw
// prompt. `extra` holds what only the page needs (streaming, token ids, perf metrics).
function currentRequest({ extra = false } = {}) {
  const body = { model: $("model").value };
  if (mcpMode()) {
    const messages = chatMessages();
    const pending = $("input").value;
    if (pending.trim() || pendingImages.length) {
      messages.push({ role: "user", content: messageContent(pending, pendingImages) });
    }
    return responsesBody(messages);
  }
  if (chatMode()) {
    body.messages = chatMessages();
    const pending = $("input").value;
    if (pending.trim() || pendingImages.length) {
      body.messages.push({ role: "user", content: messageContent(pending, pendingImages) });
    }
  } else {
    body.prompt = $("raw-prompt").value;
  }
  Object.assign(body, samplingFields(), chatMode() ? reasoningFields() : {});
  if (extra) Object.assign(body, pageFields(chatMode()));
  return body;
}

// Raw mode asks for the prompt's token ids (the token view continues from exact ids); chat has
// no use for them.
function pageFields(chat) {
  const fields = { stream: true, perf_metrics_in_response: true };
  if (!chat) fields.return_token_ids = true;
  return fields;
}

// ---------------------------------------------------------------- MCP tools (Responses)

// The MCP servers of the panel as Responses tools: a line is a URL, or a label and a URL.
function mcpTools() {
  const tools = [];
  for (const line of $("p-mcp").value.split("\n")) {
    const words = line.trim().split(/\s+/).filter(Boolean);
    if (!words.length) continue;
    const url = words[words.length - 1];
    if (words.length > 2 || !/^https?:\/\/./.test(url)) {
      throw new Error(`MCP servers: "${line.trim()}" is not a URL, or a label and a URL`);
    }
    const tool = { type: "mcp", server_url: url };
    if (words.length === 2) tool.server_label = words[0];
    tools.push(tool);
  }
  return tools;
}

function mcpMode() {
  return chatMode() && $("p-mcp").value.trim() !== "";
}

// The conversation as a Responses request: the system prompt is its instructions; of the
// panel's fields, those Responses has (max_tokens is its max_output_tokens).
function responsesBody(messages) {
  const fields = samplingFields();
  const body = { model: $("model").value };
  const system = messages.filter((m) => m.role === "system").map((m) => m.content).join("\n\n");
  if (system) body.instructions = system;
  // reasoning_content is chat's: a Responses input message has none; chat's image parts are
  // Responses' input_image (which the server refuses with a 400 saying so)
  body.input = messages.filter((m) => m.role !== "system")
    .map(({ role, content }) => ({ role, content: responsesContent(content) }));
  body.tools = mcpTools();
  if ($("p-mcp-choice").value !== "auto") body.tool_choice = $("p-mcp-choice").value;
  if (fields.max_tokens !== undefined) body.max_output_tokens = fields.max_tokens;
  for (const name of ["temperature", "top_p"]) {
    if (fields[name] !== undefined) body[name] = fields[name];
  }
  const effort = reasoningFields().reasoning_effort;
  if (effort) body.reasoning = { effort };
  return body;
}

function responsesContent(content) {
  if (typeof content === "string") return content;
  return content.map((p) => (p.type === "text" ? { type: "input_text", text: p.text }
    : { type: "input_image", image_url: p.image_url.url }));
}

// One event of a Responses stream into assistant message `m`: its text, its MCP tool lists and
// calls (`m.tools`), and at the end its usage and status.
function readEvent(event, m, seen) {
  const choice = m.choices[0];
  const item = event.item;
  if (event.type === "error") throw new ApiError(0, event.message);
  if (event.type === "response.output_text.delta") {
    seen.token();
    choice.content += event.delta;
  } else if (event.type === "response.reasoning_text.delta") {
    seen.token();
    choice.reasoning = (choice.reasoning || "") + event.delta;
  } else if (event.type === "response.output_item.added" && item.type === "mcp_call") {
    m.tools.push({ ...item });
  } else if (event.type === "response.output_item.done" && item.type.startsWith("mcp_")) {
    const at = m.tools.findIndex((t) => t.id === item.id);
    if (at >= 0) m.tools[at] = { ...item };
    else m.tools.push({ ...item });
  } else if (event.type === "response.completed") {
    const usage = event.response.usage;
    seen.usage = { prompt_tokens: usage.input_tokens, completion_tokens: usage.output_tokens,
                   prompt_tokens_details: usage.input_tokens_details };
    choice.finish_reason = event.response.status === "incomplete" ? "length" : "stop";
  }
}

function text(m) {
  return m.choices[m.sel].content;
}

function newChoice(content = "") {
  return { content, reasoning: "", tokens: null, finish_reason: null };
}

// `images`: a user message's ({url, name} each), kept with it (edits, export, regenerate).
function newMessage(role, content = "", images = undefined) {
  const m = { role, choices: [newChoice(content)], sel: 0, stats: null, children: [], active: 0 };
  if (images && images.length) m.images = images;
  return m;
}

// ---------------------------------------------------------------- the conversation tree

// The branch shown: from the root, each node's active child.
function branch() {
  const out = [];
  for (let node = state.tree; node.children.length;) {
    node = node.children[Math.min(node.active, node.children.length - 1)];
    out.push(node);
  }
  return out;
}

// The node whose children are the versions of the branch's message `i` (the root for the first).
function parentAt(i) {
  return i === 0 ? state.tree : branch()[i - 1];
}

// `m` as a new version after `parent`, and the one shown.
function addVersion(parent, m) {
  parent.children.push(m);
  parent.active = parent.children.length - 1;
  return m;
}

// Take version `m` (one without children) away from `parent`, showing version `active` again.
function removeVersion(parent, m, active) {
  const at = parent.children.indexOf(m);
  if (at >= 0) parent.children.splice(at, 1);
  parent.active = Math.max(0, Math.min(active, parent.children.length - 1));
}

// Delete the branch's message `i` (that version and everything after it); the previous version,
// if any, is shown instead.
function deleteAt(i) {
  const parent = parentAt(i);
  const at = parent.children.indexOf(branch()[i]);
  parent.children.splice(at, 1);
  parent.active = Math.max(0, at - 1);
}

// One chunk of a completions or chat stream into assistant message `m`.
function readChunk(chunk, m, seen) {
  if (chunk.usage) seen.usage = chunk.usage;
  if (chunk.perf_metrics) seen.perf = chunk.perf_metrics;
  for (const c of chunk.choices || []) {
    while (m.choices.length <= c.index) m.choices.push(newChoice());
    const choice = m.choices[c.index];
    const piece = c.delta ? c.delta.content : c.text;
    if (piece) {
      seen.token();
      choice.content += piece;
    }
    const thought = c.delta && c.delta.reasoning_content;
    if (thought) {
      seen.token();
      choice.reasoning = (choice.reasoning || "") + thought;
    }
    // the first request's prompt only: a continuation's prompt also holds generated tokens
    if (c.prompt_token_ids && !choice.prompt_ids) choice.prompt_ids = c.prompt_token_ids;
    const entries = c.logprobs && c.logprobs.content;
    if (entries) choice.tokens = (choice.tokens || []).concat(entries);
    if (c.finish_reason) choice.finish_reason = c.finish_reason;
  }
}

// Whether nothing of answer `m` came: no text, reasoning, tokens or tool calls.
function isEmpty(m) {
  return !(m.tools && m.tools.length) && m.choices.every(
    (c) => !c.content && !c.reasoning && !(c.tokens && c.tokens.length));
}

// Stream one request into assistant message `m` (its choices grow as events arrive; `read`
// takes one event: readChunk, or readEvent for /v1/responses). A request that fails before any
// of the answer came calls `drop` (the caller takes the empty message away: sent again, the
// conversation would carry it as an empty assistant turn); the error stays shown. Returns false
// then, else true.
async function run(path, body, m, { drop, read = readChunk } = {}) {
  hideError();
  const controller = new AbortController();
  state.controller = controller;
  m.streaming = true; // its thinking block stays open until the answer starts
  setBusy(true);
  render(); // every message's buttons disabled while the stream runs
  const started = performance.now();
  const seen = { usage: null, perf: null, firstToken: null };
  seen.token = () => { if (seen.firstToken === null) seen.firstToken = performance.now(); };
  let redraw = 0;
  // each frame redraws the answer being streamed only: the rest of the page stays as it is
  // (a reader's selection in it, to copy, survives)
  const schedule = () => {
    if (!redraw) redraw = requestAnimationFrame(() => { redraw = 0; renderStreaming(m); });
  };
  try {
    await streamRequest(path, body, controller.signal, (event) => {
      read(event, m, seen);
      schedule();
    });
    // every choice ends with a finish reason: a stream cut short (a server stopped) has none
    if (!m.choices.every((c) => c.finish_reason)) {
      throw new ApiError(0, "The server closed the stream before the answer ended");
    }
  } catch (err) {
    if (err.name === "AbortError") {
      for (const choice of m.choices) choice.finish_reason = choice.finish_reason || "stopped";
    } else {
      m.error = err.message;
      for (const choice of m.choices) choice.finish_reason = choice.finish_reason || "error";
      showError(err.message);
    }
  } finally {
    if (redraw) cancelAnimationFrame(redraw);
    state.controller = null;
    delete m.streaming;
    setBusy(false);
  }
  m.stats = stats(seen.usage, seen.perf, started, seen.firstToken, m);
  const dropped = Boolean(m.error && isEmpty(m) && drop);
  if (dropped) drop();
  render();
  return !dropped;
}

// Per-message figures: the server's perf metrics when the stream finished, else the page's own.
function stats(usage, perf, started, firstToken, m) {
  const out = { finish: m.choices.map((c) => c.finish_reason || "?").join(", ") };
  if (perf) {
    out.ttft = perf["server-time-to-first-token"];
    out.prompt = perf["prompt-tokens"];
    out.cached = perf["cached-prompt-tokens"];
  } else if (firstToken !== null) {
    out.ttft = (firstToken - started) / 1000;
  }
  const elapsed = (performance.now() - started) / 1000;
  if (usage) {
    out.prompt = usage.prompt_tokens;
    out.cached = (usage.prompt_tokens_details || {}).cached_tokens ?? out.cached;
    out.completion = usage.completion_tokens;
    const reasoning = (usage.completion_tokens_details || {}).reasoning_tokens;
    if (reasoning) out.reasoning = reasoning;
  } else if (m.choices.every((c) => c.tokens)) {
    // stopped: no usage came; the logprob entries count the tokens received
    out.completion = m.choices.reduce((sum, c) => sum + c.tokens.length, 0);
  }
  // tokens after each choice's first, over the time from the first token to the last
  const generating = perf ? perf["generation-duration"] : elapsed - (out.ttft || 0);
  const after = (out.completion ?? 0) - m.choices.length;
  if (after > 0 && generating > 0) out.tps = after / generating;
  return out;
}

function statsText(s) {
  const parts = [];
  if (s.ttft !== undefined) parts.push(`TTFT ${(s.ttft * 1000).toFixed(0)} ms`);
  if (s.tps !== undefined) parts.push(`${s.tps.toFixed(1)} tok/s`);
  if (s.prompt !== undefined) parts.push(`prompt ${s.prompt} tokens (${s.cached ?? 0} cached)`);
  if (s.completion !== undefined) {
    parts.push(`completion ${s.completion} tokens${s.reasoning ? ` (${s.reasoning} reasoning)` : ""}`);
  }
  parts.push(`finish: ${s.finish}`);
  return parts.join(" · ");
}

function withFields(body, chat) {
  try {
    return Object.assign(body, samplingFields(), chat ? reasoningFields() : {}, pageFields(chat));
  } catch (err) {
    showError(err.message);
    return null;
  }
}

async function sendChat() {
  if (state.controller) return;
  if (!$("model").options.length && (!await ensureModels() || state.controller)) return;
  const pending = $("input").value;
  let sent = null;
  if (pending.trim() || pendingImages.length) {
    const shown = branch();
    const parent = shown.length ? shown[shown.length - 1] : state.tree;
    const images = pendingImages.splice(0);
    sent = { parent, active: parent.active, images,
             m: addVersion(parent, newMessage("user", pending, images)) };
    $("input").value = "";
    renderPendingImages();
  }
  const length = branch().length;
  if (!length) return;
  if (await replyAt(length) || !sent) return;
  // refused before any answer came: the message goes back to the composer, as it was before
  // Send (kept in the conversation, a message typed next would follow it as a second user turn,
  // which chat templates such as Gemma's refuse)
  removeVersion(sent.parent, sent.m, sent.active);
  if (!$("input").value) $("input").value = pending;
  if (!pendingImages.length) pendingImages.push(...sent.images);
  renderPendingImages();
  render();
}

// Generate the assistant turn at index `at` of the branch shown: a new version there (the
// versions already there, and what follows them, are kept).
// Whether an answer stays: false when the request was refused before any of it came.
async function replyAt(at) {
  if (mcpMode()) return replyWithTools(at);
  const body = withFields({ model: $("model").value, messages: chatMessages(at) }, true);
  if (!body) return false;
  const parent = parentAt(at);
  const shown = parent.active;
  const m = addVersion(parent, newMessage("assistant"));
  render();
  return run("/v1/chat/completions", body, m, { drop: () => removeVersion(parent, m, shown) });
}

// A user message edited and sent again: the edit as a new version of it, then its answer.
async function resendAt(i, content) {
  if (state.controller) return;
  addVersion(parentAt(i), newMessage("user", content, branch()[i].images));
  await replyAt(i + 1);
}

// MCP mode: the answer from /v1/responses, with the tool calls the server ran on the way.
async function replyWithTools(at) {
  let body;
  try {
    body = { ...responsesBody(chatMessages(at)), stream: true };
  } catch (err) {
    showError(err.message);
    return false;
  }
  const m = newMessage("assistant");
  m.tools = [];
  const parent = parentAt(at);
  const shown = parent.active;
  addVersion(parent, m);
  render();
  return run("/v1/responses", body, m,
    { read: readEvent, drop: () => removeVersion(parent, m, shown) });
}

async function sendRaw() {
  if (state.controller) return;
  if (!$("model").options.length && (!await ensureModels() || state.controller)) return;
  const body = withFields({ model: $("model").value, prompt: $("raw-prompt").value }, false);
  if (!body) return;
  const m = newMessage("assistant");
  state.raw = m;
  render();
  await run("/v1/completions", body, m, { drop: () => { if (state.raw === m) state.raw = null; } });
}

// Token view: take token `t` of choice `choice` of message `m`, replace it with `alt` and let
// the model go on from there. Raw mode sends the exact token ids (prompt + kept tokens + alt) as
// a raw completion; chat mode sends the kept text as the assistant turn to continue.
async function continueFrom(m, alt, t) {
  if (state.controller) return;
  const choice = m.choices[m.sel];
  const chosen = { ...alt, top_logprobs: choice.tokens[t].top_logprobs };
  const kept = choice.tokens.slice(0, t).concat([chosen]);
  const raw = m === state.raw;
  const fields = withFields({ model: $("model").value }, !raw);
  if (!fields) return;
  fields.n = 1;
  const keptText = tokensText(kept);
  let path;
  let target = m; // raw mode's completion is replaced; a chat answer gets a new version
  if (raw) {
    path = "/v1/completions";
    fields.prompt = (choice.prompt_ids || []).concat(kept.map((e) => e.token_id));
  } else {
    path = "/v1/chat/completions";
    const at = branch().indexOf(m);
    fields.messages = chatMessages(at);
    // the tokens as generated, thinking block included: the server goes on from them
    fields.messages.push({ role: "assistant", content: keptText });
    target = addVersion(parentAt(at), newMessage("assistant"));
  }
  const { reasoning, content } = raw ? { reasoning: "", content: keptText } : splitThinking(keptText);
  target.choices = [{ ...newChoice(content), reasoning, tokens: kept, prompt_ids: choice.prompt_ids }];
  target.sel = 0;
  hidePopup();
  render();
  await run(path, fields, target);
}

// Generated text split as the server splits it: a leading <think> block is the reasoning (it
// may still be open), the rest, leading newlines dropped, the content.
function splitThinking(generated) {
  const open = generated.match(/^<think>\n?/);
  if (!open) return { reasoning: "", content: generated };
  const rest = generated.slice(open[0].length);
  const end = rest.indexOf("</think>");
  if (end < 0) return { reasoning: rest, content: "" };
  return { reasoning: rest.slice(0, end).replace(/\n+$/, ""),
           content: rest.slice(end + "</think>".length).replace(/^\n+/, "") };
}

function tokensText(entries) {
  const bytes = entries.flatMap((e) => e.bytes || Array.from(new TextEncoder().encode(e.token)));
  return new TextDecoder().decode(new Uint8Array(bytes));
}

function stop() {
  if (state.controller) state.controller.abort();
}

function setBusy(busy) {
  const had = document.activeElement;
  for (const id of ["send", "raw-send"]) $(id).disabled = busy;
  for (const id of ["stop", "raw-stop"]) $(id).hidden = !busy;
  document.body.classList.toggle("busy", busy);
  // the button pressed is disabled or hidden now, and the focus with it would fall to the page's
  // top: chat gives it to the message box (the next message can be typed), raw mode to the
  // button that takes the pressed one's place
  if (had === $("send") || had === $("stop")) $("input").focus();
  else if (had === $("raw-send") && busy) $("raw-stop").focus();
  else if (had === $("raw-stop") && !busy) $("raw-send").focus();
}

// ---------------------------------------------------------------- embeddings and rerank

// The lines of a textarea, blank ones left out.
function textLines(id) {
  return $(id).value.split("\n").filter((line) => line.trim() !== "");
}

function readInt(id, name) {
  checkNumberBox($(id), name);
  const text = $(id).value.trim();
  if (text === "") return undefined;
  const value = Number(text);
  if (!Number.isInteger(value)) throw new Error(`${name} must be an integer`);
  return value;
}

function embeddingsBody() {
  const body = { model: $("model").value, input: textLines("embed-input") };
  if ($("embed-normalize").checked) body.normalize = true;
  const dimensions = readInt("embed-dimensions", "dimensions");
  if (dimensions !== undefined) body.dimensions = dimensions;
  return body;
}

function rerankBody() {
  const body = { model: $("model").value, query: $("rerank-query").value,
                 documents: textLines("rerank-documents") };
  const topN = readInt("rerank-top_n", "top_n");
  if (topN !== undefined) body.top_n = topN;
  body.return_documents = true;
  return body;
}

// POST one non-streaming request of the Embeddings or Rerank tab; `show` draws the answer.
async function sendOnce(path, makeBody, buttonId, outputId, show) {
  if (!$("model").options.length && !await ensureModels()) return;
  let body;
  try {
    body = makeBody();
  } catch (err) {
    showError(err.message);
    return;
  }
  hideError();
  // the button is disabled while the request runs, and the focus falls off it: it gets it back
  const pressed = document.activeElement === $(buttonId);
  $(buttonId).disabled = true;
  const started = performance.now();
  try {
    const res = await apiFetch(path, { body });
    const answer = await res.json();
    show(answer, body, performance.now() - started);
    $(outputId).hidden = false;
  } catch (err) {
    $(outputId).hidden = true; // no stale answer under the error
    showError(err.message);
  } finally {
    $(buttonId).disabled = false;
    const now = document.activeElement;
    if (pressed && (!now || now === document.body)) $(buttonId).focus();
  }
}

function usageText(usage, ms) {
  const parts = [];
  if (usage) parts.push(`prompt_tokens ${usage.prompt_tokens}`, `total_tokens ${usage.total_tokens}`);
  parts.push(`${ms.toFixed(0)} ms`);
  return parts.join(" · ");
}

function cell(tag, text, className) {
  const el = document.createElement(tag);
  el.textContent = text;
  if (className) el.className = className;
  return el;
}

function l2norm(v) {
  return Math.sqrt(v.reduce((sum, x) => sum + x * x, 0));
}

function cosine(a, b) {
  const dot = a.reduce((sum, x, i) => sum + x * b[i], 0);
  const norms = l2norm(a) * l2norm(b);
  return norms > 0 ? dot / norms : 0;
}

// Cosine 1 is the accent colour, 0 white, -1 blue.
function similarityShade(value) {
  const alpha = Math.min(1, Math.abs(value)) * 0.6;
  return value >= 0 ? `rgba(194, 65, 12, ${alpha})` : `rgba(37, 99, 235, ${alpha})`;
}

function showEmbeddings(answer, body) {
  const data = [...answer.data].sort((a, b) => a.index - b.index);
  const vectors = data.map((d) => d.embedding);
  const rows = data.map((d) => {
    const v = d.embedding;
    const first = v.slice(0, SHOWN_VALUES).map((x) => x.toFixed(4)).join(" ");
    const tr = document.createElement("tr");
    tr.append(
      cell("td", String(d.index), "index"),
      cell("td", body.input[d.index] ?? "", "input-text"),
      cell("td", String(v.length), "dims"),
      cell("td", l2norm(v).toFixed(4), "norm"),
      cell("td", v.length > SHOWN_VALUES ? `${first} …` : first, "values"),
    );
    return tr;
  });
  $("embed-vectors").tBodies[0].replaceChildren(...rows);
  const head = document.createElement("tr");
  head.append(cell("th", ""), ...data.map((d) => {
    const th = cell("th", `#${d.index}`);
    th.title = body.input[d.index] ?? "";
    return th;
  }));
  const thead = document.createElement("thead");
  thead.append(head);
  const tbody = document.createElement("tbody");
  data.forEach((d, i) => {
    const tr = document.createElement("tr");
    const th = cell("th", `#${d.index}`);
    th.title = body.input[d.index] ?? "";
    tr.append(th, ...vectors.map((w, j) => {
      const value = cosine(vectors[i], w);
      const td = cell("td", value.toFixed(3), "sim");
      td.style.background = similarityShade(value);
      td.title = `cos(#${d.index}, #${data[j].index}) = ${value}`;
      return td;
    }));
    tbody.append(tr);
  });
  $("embed-matrix").replaceChildren(thead, tbody);
}

function showRanking(answer) {
  $("rerank-list").replaceChildren(...answer.data.map((d, rank) => {
    const li = document.createElement("li");
    li.className = "ranked";
    const bar = document.createElement("span");
    bar.className = "score-bar";
    const fill = document.createElement("span");
    fill.style.width = `${(Math.max(0, Math.min(1, d.relevance_score)) * 100).toFixed(1)}%`;
    bar.append(fill);
    bar.title = String(d.relevance_score);
    li.append(
      cell("span", String(rank + 1), "rank"),
      cell("span", `#${d.index}`, "doc-index"),
      cell("span", d.relevance_score.toFixed(4), "score"),
      bar,
      cell("span", d.document ?? "", "doc"),
    );
    return li;
  }));
}

function sendEmbeddings() {
  return sendOnce("/v1/embeddings", embeddingsBody, "embed-send", "embed-output", (answer, body, ms) => {
    showEmbeddings(answer, body);
    $("embed-usage").textContent = usageText(answer.usage, ms);
  });
}

function sendRerank() {
  return sendOnce("/v1/rerank", rerankBody, "rerank-send", "rerank-output", (answer, body, ms) => {
    showRanking(answer);
    $("rerank-usage").textContent = usageText(answer.usage, ms);
  });
}

// ---------------------------------------------------------------- rendering

// A stream keeps the answer's end in view while the reader is there; one who scrolled up to
// read stays where they are (until they scroll back down).
function atEnd(el) {
  return !el || el.getBoundingClientRect().bottom <= window.innerHeight + 40;
}

function render() {
  const list = chatMode() ? $("messages") : $("raw-output");
  const follow = atEnd(list.lastElementChild);
  rememberFocus();
  $("messages").replaceChildren(...branch().map((m, i) => renderMessage(m, i)));
  $("raw-output").replaceChildren(...(state.raw ? [renderMessage(state.raw, -1)] : []));
  $("raw-append").disabled = !state.raw || Boolean(state.controller);
  restoreFocus();
  if (state.controller && follow) list.lastElementChild?.scrollIntoView({ block: "end" });
}

// A redraw replaces every message's buttons: the one that had the focus (a keyboard user's
// place: ‹ › of versions or choices, Tokens, Regenerate…) is found again in the new ones by its
// list, its message's place there and its title, and gets the focus back (once enabled: a
// request running disables them all). Else the focus would fall to the page's top.
let refocus = null;

function rememberFocus() {
  const el = document.activeElement;
  const li = el && el.tagName === "BUTTON" ? el.closest("li.msg") : null;
  if (!li) return;
  const list = li.parentElement;
  refocus = { list: list.id, index: Array.from(list.children).indexOf(li), title: el.title };
}

function restoreFocus() {
  if (!refocus) return;
  const now = document.activeElement;
  if (now && now !== document.body && now.isConnected) {
    refocus = null; // the reader went elsewhere meanwhile
    return;
  }
  const list = $(refocus.list);
  let li = list.children[refocus.index];
  if (!li && list.id === "messages") {
    // its message deleted: the last one left takes the focus (Delete again goes on deleting
    // from the end), or the message box when none is left
    li = list.lastElementChild;
    if (!li) {
      $("input").focus();
      refocus = null;
      return;
    }
  }
  const buttons = li ? Array.from(li.querySelectorAll("button")) : [];
  const other = { "Previous version": "Next version", "Next version": "Previous version",
                  "Previous choice": "Next choice", "Next choice": "Previous choice" }[refocus.title];
  // the same button; else (the last version reached, an editor closed) the nearest one left
  const target = [refocus.title, other, "Edit this message"]
    .map((title) => buttons.find((b) => b.title === title && !b.disabled)).find(Boolean);
  if (target) {
    target.focus();
    refocus = null;
  } else if (!state.controller) {
    refocus = null;
  }
}

// Redraw message `m` alone (the one being streamed), following its end as render() does.
function renderStreaming(m) {
  const list = m === state.raw ? $("raw-output") : $("messages");
  const li = Array.from(list.children).find((el) => el.message === m);
  if (!li) {
    render();
    return;
  }
  const follow = atEnd(li);
  const fresh = renderMessage(m, m === state.raw ? -1 : branch().indexOf(m));
  li.replaceWith(fresh);
  if (follow && fresh === list.lastElementChild) fresh.scrollIntoView({ block: "end" });
}

function button(label, title, action) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.title = title;
  b.className = `act-${label.toLowerCase()}`;
  b.addEventListener("click", action);
  b.disabled = Boolean(state.controller);
  return b;
}

function renderMessage(m, i) {
  const li = document.createElement("li");
  li.className = `msg ${m.role}`;
  li.message = m; // renderStreaming finds it
  const head = document.createElement("div");
  head.className = "head";
  const role = document.createElement("span");
  role.className = "role";
  role.textContent = i < 0 ? "completion" : m.role;
  head.append(role);
  if (i >= 0 && parentAt(i).children.length > 1) head.append(versionSwitcher(parentAt(i)));
  if (m.choices.length > 1) head.append(choiceSwitcher(m));
  const actions = document.createElement("span");
  actions.className = "msg-actions";
  const choice = m.choices[m.sel];
  if (choice.tokens && choice.tokens.length) {
    actions.append(button(m.showTokens ? "Text" : "Tokens", "Show the answer as tokens coloured by probability",
      () => { m.showTokens = !m.showTokens; render(); }));
  }
  if (i >= 0) {
    actions.append(
      button("Edit", "Edit this message", () => {
        m.editing = true;
        render();
        // the caret in the editor, at the end: typing edits at once
        const area = $("messages").children[i]?.querySelector(".editor textarea");
        if (area) {
          area.focus();
          area.setSelectionRange(area.value.length, area.value.length);
        }
      }),
      button("Regenerate", m.role === "assistant" ? "Generate this answer again" : "Answer this message again",
        () => replyAt(m.role === "assistant" ? i : i + 1)),
      button("Delete", "Delete this version of the message and what follows it",
        () => { deleteAt(i); render(); }),
    );
  }
  head.append(actions);
  li.append(head);
  if (m.tools && m.tools.length) li.append(toolsView(m));
  // the token view shows every generated token, the thinking block's included
  if (choice.reasoning && !m.showTokens) li.append(thinkingView(m, choice));
  if (m.images && m.images.length) li.append(messageImages(m));
  li.append(m.editing ? editor(m, i) : m.showTokens ? tokenView(m) : textView(m));
  if (m.stats) {
    const s = document.createElement("div");
    s.className = "stats";
    s.textContent = statsText(m.stats);
    li.append(s);
  }
  return li;
}

// The MCP tool lists and calls of an answer, each folded: its result (or error) inside.
function toolsView(m) {
  const box = document.createElement("div");
  box.className = "tools";
  for (const t of m.tools) {
    const details = document.createElement("details");
    const summary = document.createElement("summary");
    const body = document.createElement("pre");
    if (t.type === "mcp_list_tools") {
      summary.textContent = `${t.server_label}: ${t.tools.length} tools`;
      body.textContent = t.tools.map((x) => `${x.name}: ${x.description || ""}`).join("\n");
    } else {
      const status = t.status === "in_progress" ? "running…" : t.status;
      summary.textContent = `${t.server_label}.${t.name}(${t.arguments}) · ${status}`;
      body.textContent = t.error ? JSON.stringify(t.error, null, 2) : t.output ?? "";
      if (t.status === "failed") details.classList.add("failed");
    }
    details.className = `tool ${details.className}`.trim();
    details.append(summary, body);
    box.append(details);
  }
  return box;
}

// An answer's reasoning, folded under "Thinking": open while the model thinks, folded once the
// answer starts, unless the reader opened or closed it (render() redraws it from scratch).
function thinkingView(m, choice) {
  const details = document.createElement("details");
  details.className = "thinking";
  const thinking = Boolean(m.streaming) && !choice.content;
  details.open = choice.showThinking ?? thinking;
  const summary = document.createElement("summary");
  summary.textContent = thinking ? "Thinking…" : "Thinking";
  // read before the click toggles it: the state the reader asks for
  summary.addEventListener("click", () => { choice.showThinking = !details.open; });
  const body = document.createElement("div");
  body.className = "reasoning";
  body.textContent = choice.reasoning;
  details.append(summary, body);
  return details;
}

function textView(m) {
  const div = document.createElement("div");
  div.className = "text";
  div.textContent = text(m);
  if (m.role === "assistant" && state.controller && !text(m)) div.classList.add("waiting");
  return div;
}

// Save changes this version in place (what follows it stays); a user message's Send keeps it
// and adds the edit as a new version, answered anew.
function editor(m, i) {
  const box = document.createElement("div");
  box.className = "editor";
  const area = document.createElement("textarea");
  area.value = text(m);
  area.rows = Math.min(12, Math.max(2, area.value.split("\n").length));
  const save = button("Save", "Change this version in place", () => {
    const choice = m.choices[m.sel];
    choice.content = area.value;
    choice.tokens = null; // the edited text no longer matches the model's tokens
    m.editing = false;
    m.showTokens = false;
    render();
  });
  const cancel = button("Cancel", "Drop the edit", () => { m.editing = false; render(); });
  if (m.role === "user" && i >= 0) {
    const send = button("Send", "Send the edit as a new version of this message", () => {
      m.editing = false;
      resendAt(i, area.value);
    });
    send.classList.add("primary");
    box.append(area, send, save, cancel);
  } else {
    box.append(area, save, cancel);
  }
  return box;
}

// `‹ k/n ›` over the versions of a turn (the children of `parent`): each shows its own branch.
function versionSwitcher(parent) {
  const span = document.createElement("span");
  span.className = "versions";
  const n = parent.children.length;
  const k = Math.min(parent.active, n - 1);
  const label = document.createElement("span");
  label.className = "version-label";
  label.textContent = `${k + 1}/${n}`;
  label.title = "Version of this message";
  const prev = button("‹", "Previous version", () => { parent.active = k - 1; render(); });
  const next = button("›", "Next version", () => { parent.active = k + 1; render(); });
  prev.className = "act-prev-version";
  next.className = "act-next-version";
  prev.disabled ||= k === 0;
  next.disabled ||= k === n - 1;
  span.append(prev, label, next);
  return span;
}

function choiceSwitcher(m) {
  const span = document.createElement("span");
  span.className = "choices";
  const label = document.createElement("span");
  label.textContent = `choice ${m.sel + 1}/${m.choices.length}`;
  span.append(
    button("‹", "Previous choice", () => { m.sel = (m.sel + m.choices.length - 1) % m.choices.length; render(); }),
    label,
    button("›", "Next choice", () => { m.sel = (m.sel + 1) % m.choices.length; render(); }),
  );
  return span;
}

// Probability 0 is red, 1 green.
function colour(logprob) {
  const p = Math.exp(logprob);
  return `hsl(${Math.round(p * 120)}, 75%, 82%)`;
}

function tokenView(m) {
  const div = document.createElement("div");
  div.className = "text tokens";
  m.choices[m.sel].tokens.forEach((entry, t) => {
    const span = document.createElement("span");
    span.className = "tok";
    // a newline is drawn as a mark (an empty element: the text stays the token's), else a
    // newline token is a sliver one can neither see nor click
    entry.token.split("\n").forEach((part, k) => {
      if (k) {
        const mark = document.createElement("i");
        mark.className = "nl";
        span.append(mark, "\n");
      }
      if (part) span.append(part);
    });
    span.style.background = colour(entry.logprob);
    span.title = `${entry.token_id}: p=${Math.exp(entry.logprob).toFixed(3)}`;
    // the keyboard: Tab reaches the first token, the arrows move along, Enter opens it
    span.tabIndex = t === 0 ? 0 : -1;
    span.setAttribute("role", "button");
    span.addEventListener("click", (event) => {
      event.stopPropagation();
      showPopup(span, m, entry, t);
    });
    span.addEventListener("keydown", (event) => {
      const step = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1 }[event.key];
      if (step) {
        const next = div.children[t + step];
        if (next) {
          span.tabIndex = -1;
          next.tabIndex = 0;
          next.focus();
        }
      } else if (event.key === "Enter" || event.key === " ") {
        showPopup(span, m, entry, t);
        $("token-popup").querySelector("button")?.focus();
      } else {
        return;
      }
      event.preventDefault();
    });
    div.append(span);
  });
  return div;
}

function showPopup(anchor, m, entry, t) {
  const popup = $("token-popup");
  const rows = [
    `<div class="pick"><b>${escapeHTML(JSON.stringify(entry.token))}</b> id ${entry.token_id}</div>`,
    `<div>logprob ${entry.logprob.toFixed(4)} · p ${(Math.exp(entry.logprob) * 100).toFixed(2)}%</div>`,
  ];
  if (entry.sampling_logprob !== undefined && entry.sampling_logprob !== null) {
    rows.push(`<div>after sampling filters: logprob ${entry.sampling_logprob.toFixed(4)}</div>`);
  }
  popup.innerHTML = `${rows.join("")}<div class="alts-title">Top alternatives (choose one to continue from it)</div>`;
  const list = document.createElement("ol");
  list.className = "alts";
  for (const alt of entry.top_logprobs || []) {
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button";
    b.className = "alt";
    b.dataset.token = alt.token;
    b.textContent = `${JSON.stringify(alt.token)}  ${(Math.exp(alt.logprob) * 100).toFixed(2)}%`;
    b.style.background = colour(alt.logprob);
    b.disabled = Boolean(state.controller);
    b.addEventListener("click", () => continueFrom(m, alt, t));
    li.append(b);
    list.append(li);
  }
  popup.append(list);
  const box = anchor.getBoundingClientRect();
  popup.style.left = `${Math.min(box.left + window.scrollX, window.innerWidth - 320)}px`;
  popup.style.top = `${box.bottom + window.scrollY + 4}px`;
  popup.hidden = false;
  popupAnchor = anchor;
}

let popupAnchor = null; // the token whose popup is open: Escape gives it the focus back

function hidePopup() {
  $("token-popup").hidden = true;
}

function escapeHTML(s) {
  return s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  // it stands under the panes: below the window's bottom when the conversation is long, where
  // a request refused would seem to do nothing. Scrolled just into view.
  $("error").scrollIntoView({ block: "nearest" });
}

function hideError() {
  $("error").hidden = true;
}

// ---------------------------------------------------------------- view code

function pyLiteral(value, indent = "") {
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "number") return String(value);
  if (typeof value === "string") return JSON.stringify(value);
  const inner = `${indent}    `;
  if (Array.isArray(value)) {
    if (!value.length) return "[]";
    return `[\n${value.map((v) => inner + pyLiteral(v, inner)).join(",\n")},\n${indent}]`;
  }
  const entries = Object.entries(value);
  if (!entries.length) return "{}";
  return `{\n${entries.map(([k, v]) => `${inner}${JSON.stringify(k)}: ${pyLiteral(v, inner)}`).join(",\n")},\n${indent}}`;
}

function shellQuote(s) {
  return `'${s.replace(/'/g, "'\\''")}'`;
}

function pythonCall(call, args) {
  return `${call}(\n${Object.entries(args).map(([k, v]) => `    ${k}=${pyLiteral(v, "    ")},`).join("\n")}\n)`;
}

// A plain HTTP request from Python (httpx, which the openai SDK installs): for /v1/rerank,
// which no SDK here has a method for.
function pythonHTTP(body, path, key) {
  const args = { url: `${location.origin}/inference${path}` };
  if (key) args.headers = { Authorization: `Bearer ${key}` };
  args.json = body;
  args.timeout = 60;
  return [
    "import httpx",
    "",
    `response = ${pythonCall("httpx.post", args)}`,
    "response.raise_for_status()",
    'for d in response.json()["data"]:',
    '    print(d["index"], d["relevance_score"], d.get("document"))',
  ].join("\n");
}

const SNIPPETS = {
  curl(body, path, key) {
    const lines = [`curl ${location.origin}/inference${path}`];
    if (key) lines.push(`-H ${shellQuote(`Authorization: Bearer ${key}`)}`);
    lines.push("-H 'Content-Type: application/json'");
    lines.push(`-d ${shellQuote(JSON.stringify(body, null, 2))}`);
    return lines.join(" \\\n  ");
  },
  openai(body, path, key) {
    if (path.endsWith("/rerank")) return pythonHTTP(body, path, key); // the SDK has no rerank
    const args = {};
    const extra = {};
    const responses = path.endsWith("/responses"); // every field a responses.create argument
    const embeddings = path.endsWith("/embeddings");
    const known = embeddings ? EMBEDDINGS_ARGS : path.includes("chat") ? CHAT_ARGS : COMPLETIONS_ARGS;
    for (const [k, v] of Object.entries(body)) (responses || known.has(k) ? args : extra)[k] = v;
    if (Object.keys(extra).length) args.extra_body = extra;
    const method = responses ? "client.responses.create" : embeddings ? "client.embeddings.create"
      : path.includes("chat") ? "client.chat.completions.create" : "client.completions.create";
    const show = embeddings
      ? `for d in response.data:\n    print(d.index, len(d.embedding), d.embedding[:${SHOWN_VALUES}])`
      : `print(${responses ? "response.output_text"
        : path.includes("chat") ? "response.choices[0].message.content" : "response.choices[0].text"})`;
    return [
      "from openai import OpenAI",
      "",
      `client = OpenAI(base_url=${JSON.stringify(`${location.origin}/inference/v1`)}, api_key=${JSON.stringify(key || "unused")})`,
      `response = ${pythonCall(method, args)}`,
      show,
    ].join("\n");
  },
  fireworks(body, path, key) {
    if (path.endsWith("/responses") || path.endsWith("/embeddings")) {
      const what = path.endsWith("/responses") ? "Responses" : "embeddings";
      return [`# fireworks-ai has no ${what} client; Fireworks' own examples use the openai SDK:`,
              SNIPPETS.openai(body, path, key)].join("\n");
    }
    if (path.endsWith("/rerank")) {
      return ["# fireworks-ai has no rerank client: a plain HTTP request (httpx)",
              pythonHTTP(body, path, key)].join("\n");
    }
    const method = path.includes("chat") ? "client.chat.completions.create" : "client.completions.create";
    const show = path.includes("chat") ? "response.choices[0].message.content" : "response.choices[0].text";
    return [
      "from fireworks import Fireworks",
      "",
      `client = Fireworks(base_url=${JSON.stringify(location.origin)}, api_key=${JSON.stringify(key || "unused")})`,
      `response = ${pythonCall(method, body)}`,
      `print(${show})`,
    ].join("\n");
  },
  js(body, path, key) {
    const headers = { "Content-Type": "application/json" };
    if (key) headers.Authorization = `Bearer ${key}`;
    const show = path.endsWith("/responses")
      ? 'body.output.filter((i) => i.type === "message").map((i) => i.content[0].text).join("")'
      : path.endsWith("/embeddings")
        ? `body.data.map((d) => [d.index, d.embedding.length, d.embedding.slice(0, ${SHOWN_VALUES})])`
        : path.endsWith("/rerank") ? "body.data.map((d) => [d.index, d.relevance_score, d.document])"
          : path.includes("chat") ? "body.choices[0].message.content" : "body.choices[0].text";
    return [
      "// Node 18+ (save as request.mjs, run: node request.mjs) or a browser console",
      `const response = await fetch(${JSON.stringify(`${location.origin}/inference${path}`)}, {`,
      '  method: "POST",',
      `  headers: ${JSON.stringify(headers)},`,
      `  body: JSON.stringify(${JSON.stringify(body, null, 2).replace(/\n/g, "\n  ")}),`,
      "});",
      "const body = await response.json();",
      `console.log(response.ok ? ${show} : body);`,
    ].join("\n");
  },
};

let codeLang = "curl";

// The request the page would send now in the current tab: its body and its path.
function currentCall() {
  if (state.tab === "embeddings") return { body: embeddingsBody(), path: "/v1/embeddings" };
  if (state.tab === "rerank") return { body: rerankBody(), path: "/v1/rerank" };
  const path = mcpMode() ? "/v1/responses" : chatMode() ? "/v1/chat/completions" : "/v1/completions";
  return { body: currentRequest(), path };
}

function showCode() {
  let call;
  try {
    call = currentCall();
  } catch (err) {
    showError(err.message);
    return;
  }
  const { body, path } = call;
  // /v1/rerank has no openai SDK method: that tab shows httpx
  document.querySelector(".tabs button[data-lang=openai]").textContent =
    path.endsWith("/rerank") ? "Python (httpx)" : "Python (openai)";
  // images' data: URLs cut short on the page; Copy copies the code with them whole
  $("code").textContent = SNIPPETS[codeLang](shortenDataURLs(body), path, apiKey());
  fullCode = SNIPPETS[codeLang](body, path, apiKey());
  for (const b of document.querySelectorAll(".tabs button")) {
    b.classList.toggle("active", b.dataset.lang === codeLang);
  }
  if (!$("code-dialog").open) $("code-dialog").showModal();
}

let fullCode = ""; // the code View code shows, data: URLs whole

async function copyCode() {
  const code = fullCode;
  try {
    await navigator.clipboard.writeText(code);
  } catch {
    // no clipboard permission (plain http on another host): select the text instead; the copy
    // it makes holds the code with its data: URLs whole, not the text shown
    const range = document.createRange();
    range.selectNodeContents($("code"));
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    const whole = (event) => {
      event.clipboardData.setData("text/plain", code);
      event.preventDefault();
    };
    document.addEventListener("copy", whole);
    document.execCommand("copy");
    document.removeEventListener("copy", whole);
  }
  $("copy-code").textContent = "Copied";
  setTimeout(() => { $("copy-code").textContent = "Copy"; }, 1500);
}

// ---------------------------------------------------------------- export and import

function panelValues() {
  const out = {};
  for (const input of $("params").querySelectorAll("input, select, textarea")) {
    out[input.id] = input.type === "checkbox" ? input.checked : input.value;
  }
  return out;
}

function exportConversation() {
  const data = {
    format: EXPORT_FORMAT,
    exported: new Date().toISOString(),
    model: $("model").value,
    use_chat_template: chatMode(),
    system: $("system").value,
    tree: exportNode(state.tree),
    raw: { prompt: $("raw-prompt").value, completion: state.raw },
    parameters: panelValues(),
  };
  const blob = new Blob([JSON.stringify(data, null, 2)], { type: "application/json" });
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = "girandole-conversation.json";
  a.click();
  URL.revokeObjectURL(a.href);
}

// A node of the conversation tree as exported: the message's fields and its versions after it.
function exportNode({ role, choices, sel, stats, tools, images, children, active }) {
  const out = role ? { role, choices, sel, stats, tools, images } : {};
  return { ...out, active, children: children.map(exportNode) };
}

function importNode(node) {
  const m = { ...newMessage(node.role), ...node, editing: false, streaming: undefined };
  m.choices = m.choices.map((c) => ({ ...newChoice(), ...c }));
  m.images = importedImages(node.images);
  if (!m.images) delete m.images;
  m.children = (node.children || []).map(importNode);
  m.active = Math.min(node.active || 0, Math.max(0, m.children.length - 1));
  return m;
}

// The root of an export's tree: /2's as written; /1's list of messages as a single branch.
function importedTree(data) {
  if (data.format === EXPORT_FORMAT && data.tree && Array.isArray(data.tree.children)) {
    const root = importNode(data.tree);
    return { children: root.children, active: root.active };
  }
  if (data.format === EXPORT_V1 && Array.isArray(data.messages)) {
    const root = { children: [], active: 0 };
    let parent = root;
    for (const m of data.messages) parent = addVersion(parent, importNode(m));
    return root;
  }
  throw new Error(`not a ${EXPORT_FORMAT} (or /1) export`);
}

async function importConversation(file) {
  let data;
  let tree;
  try {
    data = JSON.parse(await file.text());
    tree = importedTree(data);
  } catch (err) {
    showError(`Could not import ${file.name}: ${err.message}`);
    return;
  }
  stop(); // a conversation read in replaces the one being answered
  if (state.models.some((m) => m.id === data.model)) $("model").value = data.model;
  $("use-chat").checked = data.use_chat_template !== false;
  $("system").value = data.system || "";
  state.tree = tree;
  $("raw-prompt").value = (data.raw && data.raw.prompt) || "";
  state.raw = (data.raw && data.raw.completion) || null;
  for (const [id, value] of Object.entries(data.parameters || {})) {
    const input = $(id);
    // the panel's fields only, as exported: another id names another part of the page
    if (!input || !$("params").contains(input) || input.type === "file") continue;
    if (input.type === "checkbox") input.checked = Boolean(value);
    else input.value = value;
  }
  formatChanged();
  modelChanged();
  hideError();
  render();
}

// ---------------------------------------------------------------- wiring

function init() {
  $("model").addEventListener("change", modelChanged);
  $("use-chat").addEventListener("change", () => { modeChanged(); render(); });
  $("composer").addEventListener("submit", (event) => { event.preventDefault(); sendChat(); });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      sendChat();
    }
  });
  $("raw-send").addEventListener("click", sendRaw);
  $("stop").addEventListener("click", stop);
  $("raw-stop").addEventListener("click", stop);
  $("raw-append").addEventListener("click", () => {
    if (!state.raw) return;
    $("raw-prompt").value += text(state.raw);
    state.raw = null;
    render(); // the button is disabled now: the focus goes to the prompt's end, to go on from
    const prompt = $("raw-prompt");
    prompt.focus();
    prompt.setSelectionRange(prompt.value.length, prompt.value.length);
  });
  $("p-format").addEventListener("change", formatChanged);
  for (const b of document.querySelectorAll(".modes button")) {
    b.addEventListener("click", () => setTab(b.dataset.tab));
  }
  $("embed-send").addEventListener("click", sendEmbeddings);
  $("rerank-send").addEventListener("click", sendRerank);
  $("rerank-query").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.isComposing) {
      event.preventDefault();
      sendRerank();
    }
  });
  $("view-code").addEventListener("click", showCode);
  $("copy-code").addEventListener("click", copyCode);
  for (const b of document.querySelectorAll(".tabs button")) {
    b.addEventListener("click", () => { codeLang = b.dataset.lang; showCode(); });
  }
  $("export").addEventListener("click", exportConversation);
  // Import is a label for its hidden file input: focusable (tabindex), Enter or Space opens the
  // file chooser as a click does (else the keyboard could not reach it at all)
  $("import-button").addEventListener("keydown", (event) => {
    if (event.key !== "Enter" && event.key !== " ") return;
    event.preventDefault();
    $("import").click();
  });
  $("import").addEventListener("change", (event) => {
    if (event.target.files[0]) importConversation(event.target.files[0]);
    event.target.value = "";
  });
  $("clear").addEventListener("click", () => {
    stop(); // the answer being streamed goes too: no generation left running unseen
    state.tree = { children: [], active: 0 };
    state.raw = null;
    render();
  });
  $("key-button").addEventListener("click", () => askKey(""));
  $("key-dialog").addEventListener("close", keyDialogClosed);
  document.addEventListener("click", (event) => {
    if (!$("token-popup").contains(event.target)) hidePopup();
  });
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Escape" || $("token-popup").hidden) return;
    hidePopup();
    if (popupAnchor && popupAnchor.isConnected) popupAnchor.focus();
  });
  initImages();
  showDefaults();
  formatChanged();
  setTab("generate");
  render();
  loadModels();
}

init();
