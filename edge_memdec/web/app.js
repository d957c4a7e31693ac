// The chat page of `edge-memdec serve`: streams answers from /v1/chat/completions and tints each token by how
// far the memory decoder moved the probability of the token that was chosen. No framework, no build step.

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "edge-memdec.api-key";
const SAMPLING_FIELDS = { temperature: parseFloat, top_p: parseFloat, top_k: parseInt, min_p: parseFloat,
  max_tokens: parseInt, seed: parseInt };
const TOP_LOGPROBS = 3;    // alternatives the server sends per token, shown in a token's details
const FAINTEST = 0.005;    // |p_mix - p_base| below this is not tinted

// Lanes of a turn: one answer ("single"), or side by side without ("off") and with ("on") the decoder.
const LANE_TITLES = { single: "assistant", off: "without the decoder", on: "with the decoder" };

const state = {
  turns: [],           // [{user: text, answers: {lane: text}}], the conversation so far
  controller: null,    // AbortController of the request in flight
  hasDecoder: false,   // from /props: whether the server has a memory decoder
  infoFor: null,       // the token span whose details are open
};

// ---- server calls ----

function headers() {
  const out = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}

async function errorMessage(response) {
  let message = `the server answered ${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body?.error?.message) message = body.error.message;
  } catch {
    // not JSON: keep the status line
  }
  if (response.status === 401) message += " (enter the server's API key under Settings)";
  return message;
}

async function loadProps() {
  let props;
  try {
    const response = await fetch("props", { headers: headers() });
    if (!response.ok) throw new Error(await errorMessage(response));
    props = await response.json();
  } catch (err) {
    $("model").textContent = "not connected";
    showError($("transcript"), err.message);
    return;
  }
  const params = props.default_generation_settings?.params ?? {};
  for (const name of Object.keys(SAMPLING_FIELDS)) {
    if (params[name] !== undefined && $(name).value === "") $(name).value = params[name];
  }
  const { base, memdec } = props.models ?? {};
  state.hasDecoder = memdec != null;
  $("model").textContent = [base?.name, memdec?.name].filter(Boolean).join(" + ");
  $("decoder-controls").hidden = !state.hasDecoder;
  $("no-decoder").hidden = state.hasDecoder;
  for (const id of ["decoder", "lambda", "side-by-side"]) $(id).disabled = !state.hasDecoder;
  if (state.hasDecoder) {
    $("lambda").value = props.lambda;
    showLambda();
  }
  document.body.dataset.ready = "true";
}

// Streams one chat completion; calls onChunk with each parsed chunk. Throws with the server's message.
async function streamChat(body, onChunk, signal) {
  const response = await fetch("v1/chat/completions", {
    method: "POST", headers: headers(), body: JSON.stringify(body), signal,
  });
  if (!response.ok) throw new Error(await errorMessage(response));
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replaceAll("\r", "");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        onChunk(chunk);
      }
    }
  }
}

// ---- settings ----

function lambdaValue() {
  return Number($("lambda").value);
}

function showLambda() {
  $("lambda-value").textContent = lambdaValue().toFixed(2);
  const used = $("decoder").checked || $("side-by-side").checked;
  $("lambda").disabled = !state.hasDecoder || !used;
}

function sampling() {
  const out = {};
  for (const [name, parse] of Object.entries(SAMPLING_FIELDS)) {
    const raw = $(name).value.trim();
    if (raw !== "") out[name] = parse(raw);
  }
  return out;
}

// The lambda a lane's request carries: 0 without the decoder; none at all when the server has no decoder.
function laneLambda(lane) {
  if (!state.hasDecoder) return undefined;
  if (lane === "off" || (lane === "single" && !$("decoder").checked)) return 0;
  return lambdaValue();
}

// The conversation as a lane saw it: each earlier turn with that lane's answer (else the answer it got).
function messagesFor(lane, turn) {
  const out = [];
  const system = $("system").value.trim();
  if (system) out.push({ role: "system", content: system });
  for (const past of state.turns) {
    if (past === turn) break;
    const reply = past.answers[lane] ?? past.answers.single ?? past.answers.on ?? past.answers.off;
    if (reply === undefined) continue;
    out.push({ role: "user", content: past.user }, { role: "assistant", content: reply });
  }
  out.push({ role: "user", content: turn.user });
  return out;
}

// ---- rendering ----

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function showError(parent, message) {
  parent.append(element("div", "error", `error: ${message}`));
  scrollDown();
}

function scrollDown() {
  const transcript = $("transcript");
  transcript.scrollTop = transcript.scrollHeight;
}

// A probability as a percentage: one decimal, or two significant digits below 1% (0.0043%, not 0.0%).
function percent(p) {
  if (p == null) return "–";
  return p >= 0.01 || p === 0 ? `${(100 * p).toFixed(1)}%` : `${(100 * p).toPrecision(2)}%`;
}

// The text of each logprobs entry, split out of the chunk's text by the entries' UTF-8 bytes. Entries whose
// bytes end mid-character join the next one. Null when the pieces do not add up to the chunk's text.
function tokenPieces(text, entries) {
  const decoder = new TextDecoder();
  const pieces = [];
  let pending = [];
  for (const entry of entries) {
    const bytes = entry.bytes ? Uint8Array.from(entry.bytes) : new TextEncoder().encode(entry.token);
    pending.push(entry);
    const piece = decoder.decode(bytes, { stream: true });
    if (piece) {
      pieces.push({ text: piece, entries: pending });
      pending = [];
    }
  }
  if (pending.length && pieces.length) pieces.at(-1).entries.push(...pending);
  return pieces.map((p) => p.text).join("") === text ? pieces : null;
}

function details(entry) {
  const m = entry.memdec;
  const lines = [
    JSON.stringify(entry.token),
    `p base ${percent(m.p_base)} · p decoder ${percent(m.p_mem)} · p mixed ${percent(m.p_mix)}`,
    `rank ${m.rank_base} under the base, ${m.rank_mix} mixed`,
  ];
  if (m.changed) lines.push("the decoder changed the most probable token");
  const top = (entry.top_logprobs ?? []).map((t) => `${JSON.stringify(t.token)} ${percent(Math.exp(t.logprob))}`);
  if (top.length) lines.push(`top: ${top.join(", ")}`);
  return lines.join("\n");
}

// One span for a piece of text and its entries, tinted by the entry the decoder moved most.
function tokenSpan(text, entries) {
  const span = element("span", "tok", text);
  const known = entries.filter((e) => e.memdec);
  if (!known.length) return span;
  const shift = (e) => e.memdec.p_mix - e.memdec.p_base;
  const main = known.reduce((a, b) => (Math.abs(shift(b)) > Math.abs(shift(a)) ? b : a));
  const m = main.memdec;
  const moved = shift(main);
  Object.assign(span.dataset, { pBase: m.p_base, pMem: m.p_mem ?? "", pMix: m.p_mix });
  if (Math.abs(moved) >= FAINTEST) {
    const rgb = moved > 0 ? "var(--up)" : "var(--down)";
    span.style.backgroundColor = `rgb(${rgb} / ${Math.min(0.8, Math.sqrt(Math.abs(moved))).toFixed(3)})`;
    span.classList.add(moved > 0 ? "up" : "down");
  }
  if (known.some((e) => e.memdec.changed)) span.classList.add("changed");
  span.title = known.map(details).join("\n\n");
  return span;
}

function appendChunk(textNode, chunk) {
  const choice = chunk.choices?.[0];
  const text = choice?.delta?.content ?? "";
  if (!text) return "";
  const entries = choice.logprobs?.content ?? [];
  if (!entries.length) {
    textNode.append(text);
  } else {
    const pieces = tokenPieces(text, entries) ?? [{ text, entries }];
    textNode.append(...pieces.map((p) => tokenSpan(p.text, p.entries)));
  }
  scrollDown();
  return text;
}

function answerBox(lane, lam) {
  const box = element("div", "message assistant");
  const who = lam === undefined ? LANE_TITLES[lane] : `${LANE_TITLES[lane]} · λ ${lam.toFixed(2)}`;
  box.append(element("span", "who", who), element("div", "text"));
  box.dataset.lane = lane;
  if (lam !== undefined) box.dataset.lambda = lam;
  return box;
}

// Tap (or click) a token: its details open below it; tap it again, or anywhere else, and they close.
function showTokenInfo(span) {
  const info = $("token-info");
  if (!span || span === state.infoFor) {
    info.hidden = true;
    state.infoFor = null;
    return;
  }
  state.infoFor = span;
  info.textContent = span.title;
  const chat = $("chat").getBoundingClientRect();
  const box = span.getBoundingClientRect();
  info.style.left = `${Math.max(0, Math.min(box.left - chat.left, chat.width - 300))}px`;
  info.style.top = `${box.bottom - chat.top + 4}px`;
  info.hidden = false;
}

// ---- sending ----

async function runLane(turn, lane, box) {
  const lam = laneLambda(lane);
  const body = { messages: messagesFor(lane, turn), stream: true, logprobs: true, top_logprobs: TOP_LOGPROBS,
    ...sampling() };
  if (lam !== undefined) body.lambda = lam;
  const textNode = box.querySelector(".text");
  let answer = "";
  box.dataset.state = "running";
  try {
    await streamChat(body, (chunk) => { answer += appendChunk(textNode, chunk); }, state.controller.signal);
    box.dataset.state = "done";
  } catch (err) {
    box.dataset.state = err.name === "AbortError" ? "stopped" : "failed";
    if (err.name !== "AbortError") showError(box, err.message);
  }
  if (answer) turn.answers[lane] = answer;
  return box.dataset.state;
}

async function send(text) {
  const turn = { user: text, answers: {} };
  state.turns.push(turn);
  const view = element("div", "turn");
  view.append(element("div", "message user", text));
  const sideBySide = state.hasDecoder && $("side-by-side").checked;
  const lanes = sideBySide ? ["off", "on"] : ["single"];
  const answers = element("div", sideBySide ? "answers side-by-side" : "answers");
  const boxes = lanes.map((lane) => answerBox(lane, laneLambda(lane)));
  answers.append(...boxes);
  view.append(answers);
  $("transcript").append(view);
  scrollDown();
  setBusy(true);
  // One after the other: the server decodes one request at a time.
  for (const [i, lane] of lanes.entries()) {
    const outcome = await runLane(turn, lane, boxes[i]);
    if (outcome === "stopped") break;
  }
  setBusy(false);
}

function setBusy(busy) {
  state.controller = busy ? new AbortController() : null;
  document.body.dataset.busy = String(busy);
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

// ---- wiring ----

function submit(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.controller) return;
  $("prompt").value = "";
  send(text);
}

$("composer").addEventListener("submit", submit);
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) submit(event);
});
$("stop").addEventListener("click", () => state.controller?.abort());
$("clear").addEventListener("click", () => {
  state.controller?.abort();
  state.turns = [];
  $("transcript").replaceChildren();
  showTokenInfo(null);
});
$("lambda").addEventListener("input", showLambda);
$("decoder").addEventListener("change", showLambda);
$("side-by-side").addEventListener("change", showLambda);
$("transcript").addEventListener("click", (event) => {
  showTokenInfo(event.target.closest(".tok[data-p-base]"));
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape") showTokenInfo(null);
});
$("api-key").value = localStorage.getItem(KEY_STORAGE) ?? "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
  loadProps();
});
document.body.dataset.busy = "false";
loadProps();
