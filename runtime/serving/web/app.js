// The chat page: conversations in localStorage, replies streamed from /v1/chat/completions.
// Model output is Markdown rendered by marked with raw HTML escaped, then sanitised by DOMPurify:
// it never runs as HTML or script. No network access beyond this server.
"use strict";

const STORE = "bundle-chat-v1";
const $ = (id) => document.getElementById(id);
const state = { data: load(), controller: null, info: {}, pending: [] };

function load() {
  try {
    const d = JSON.parse(localStorage.getItem(STORE));
    if (d && Array.isArray(d.conversations)) return d;
  } catch (e) { /* fall through to a fresh store */ }
  return { conversations: [], current: null, apiKey: "" };
}
function save() { localStorage.setItem(STORE, JSON.stringify(state.data)); }
function current() { return state.data.conversations.find((c) => c.id === state.data.current); }

function newConversation() {
  const c = { id: String(Date.now()) + Math.random().toString(16).slice(2, 6), title: "New chat",
              messages: [], system: state.info.defaults ? state.info.defaults.system : "",
              temperature: state.info.defaults ? state.info.defaults.temperature : 0.8 };
  state.data.conversations.unshift(c);
  state.data.current = c.id;
  save();
  return c;
}

function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (ch) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[ch]));
}

if (window.marked) {
  // Raw HTML in model output is shown as text, not interpreted.
  marked.use({ gfm: true, breaks: true, renderer: { html(token) { return escapeHtml(token.text || token.raw || ""); } } });
}

function renderMarkdown(el, text) {
  if (window.marked && window.DOMPurify) {
    el.innerHTML = DOMPurify.sanitize(marked.parse(text), { FORBID_TAGS: ["style", "form", "input"] });
  } else {
    el.textContent = text;  // libraries missing: plain text is always safe
  }
  el.querySelectorAll("pre").forEach((pre) => {
    const b = document.createElement("button");
    b.type = "button"; b.className = "copy"; b.textContent = "Copy";
    b.addEventListener("click", async () => {
      const code = pre.querySelector("code") ? pre.querySelector("code").innerText : pre.innerText;
      try { await navigator.clipboard.writeText(code); b.textContent = "Copied"; }
      catch (e) { b.textContent = "Select and copy"; }
      setTimeout(() => { b.textContent = "Copy"; }, 1500);
    });
    pre.appendChild(b);
  });
}

// A reasoning model's thinking: above its answer, folded away once the answer comes, hidden
// altogether when "Show the thinking" is off. Plain text (textContent), never HTML.
function thinkingBlock(el) {
  let d = el.querySelector("details.thinking");
  if (!d) {
    d = document.createElement("details");
    d.className = "thinking";
    const s = document.createElement("summary");
    s.textContent = "Thinking…";
    const t = document.createElement("div");
    t.className = "thought";
    d.append(s, t);
    el.insertBefore(d, el.firstChild);
  }
  d.hidden = !showThinking();
  return d;
}
function setThinking(el, text, done) {
  const d = thinkingBlock(el);
  d.querySelector(".thought").textContent = text;
  d.querySelector("summary").textContent = done ? "Thought" : "Thinking…";
  if (!done) d.open = true;
}
function showThinking() { return state.data.showThinking !== false; }

function addMessage(role, text, reasoning, attachments) {
  const el = document.createElement("div");
  el.className = "msg " + role;
  if (role === "assistant") {
    const body = document.createElement("div");
    body.className = "body";
    el.appendChild(body);
    renderMarkdown(body, text);
    if (reasoning) { setThinking(el, reasoning, true); el.querySelector("details.thinking").open = false; }
  } else el.textContent = text;
  if (attachments && attachments.length) el.appendChild(chips(attachments, null));
  $("messages").appendChild(el);
  $("messages").scrollTop = $("messages").scrollHeight;
  return el;
}
function bodyOf(el) { return el.querySelector(".body"); }

// What the chat says about the conversation, dimmed: turns left out to fit the context, a cut answer.
function leftOutNote(n) {
  const el = document.createElement("div");
  el.className = "note";
  el.textContent = "(" + n + " earlier turn" + (n === 1 ? "" : "s") + " left out: the conversation no longer fits " +
    "the context of " + state.info.context + " tokens)";
  return el;
}
function cutNote() {
  const el = document.createElement("div");
  el.className = "note";
  el.textContent = "(the answer was cut: it reached its length limit or the end of the context)";
  return el;
}

function render() {
  const list = $("conversations");
  list.replaceChildren();
  for (const c of state.data.conversations) {
    const li = document.createElement("li");
    if (c.id === state.data.current) li.className = "current";
    const a = document.createElement("a");
    a.href = "#"; a.textContent = c.title;
    a.addEventListener("click", (e) => { e.preventDefault(); if (!state.controller) { state.data.current = c.id; save(); render(); document.body.classList.remove("sidebar-open"); } });
    const del = document.createElement("button");
    del.type = "button"; del.textContent = "×"; del.title = "Delete";
    del.addEventListener("click", () => {
      if (state.controller) return;
      state.data.conversations = state.data.conversations.filter((x) => x.id !== c.id);
      if (state.data.current === c.id) state.data.current = state.data.conversations.length ? state.data.conversations[0].id : null;
      save(); render();
    });
    li.append(a, del);
    list.appendChild(li);
  }
  const c = current() || newConversation();
  $("messages").replaceChildren();
  for (const m of c.messages) {
    if (m.left_out) $("messages").appendChild(leftOutNote(m.left_out));
    const el = addMessage(m.role, m.content, m.reasoning, m.attachments);
    if (m.cut) el.appendChild(cutNote());
  }
  $("system").value = c.system || "";
  $("temperature").value = c.temperature;
  const t = state.info.thinking || {};
  $("think-row").hidden = !t.switchable;
  $("show-thinking-row").hidden = !t.thinks;
  $("think").checked = c.think !== undefined ? c.think : !!t.default;
  $("show-thinking").checked = showThinking();
  renderAdapters();
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.data.apiKey) h.Authorization = "Bearer " + state.data.apiKey;
  return h;
}

async function api(path, options) {
  let r = await fetch(path, Object.assign({ headers: headers() }, options || {}));
  if (r.status === 401) {
    const key = prompt("This server needs an API key:");
    if (key) { state.data.apiKey = key; save(); r = await fetch(path, Object.assign({}, options || {}, { headers: headers() })); }
  }
  return r;
}

// What a message says to the model: the attached files' text (each named), then the words typed.
function apiContent(m) {
  if (!m.attachments || !m.attachments.length) return m.content;
  const parts = m.attachments.map((a) => ({ type: "text", text: "File: " + a.name + "\n```\n" + a.text + "\n```\n\n" }));
  return parts.concat(m.content ? [{ type: "text", text: m.content }] : []);
}

// Whether the conversation with this new message fits the context: counted by the server's
// tokenizer (the Messages API's count_tokens) before anything is sent. null when it fits.
async function tooLarge(c, message) {
  const context = state.info.context;
  if (!context || !message.attachments || !message.attachments.length) return null;
  const history = c.messages.concat([message]).map((m) => ({ role: m.role, content: apiContent(m) }));
  try {
    const r = await api("/v1/messages/count_tokens", {
      method: "POST", body: JSON.stringify({ model: "local", system: c.system || undefined, messages: history }) });
    const names = message.attachments.map((a) => a.name).join(", ");
    const advice = ". Attach a smaller file, start a new chat, or restart the bundle with a larger --ctx.";
    if (r.status === 400) {  // far too large even to count
      const err = await r.json().catch(() => ({}));
      return names + " is too large for the context: " + ((err.error && err.error.message) || "it cannot be read") + advice;
    }
    if (!r.ok) return null;  // the answer will say what is wrong
    const n = (await r.json()).input_tokens;
    if (n < context - 16) return null;
    return names + " is too large for the context: with it, this chat is " + n + " tokens and the context holds " +
      context + advice;
  } catch (e) { return null; }
}

async function send(text, attachments) {
  const c = current();
  const message = attachments && attachments.length ? { role: "user", content: text, attachments } : { role: "user", content: text };
  const problem = await tooLarge(c, message);
  if (problem) {
    const err = addMessage("error", problem); err.classList.add("error");
    return false;
  }
  c.messages.push(message);
  if (c.title === "New chat") c.title = (text || attachments[0].name).slice(0, 40);
  try { save(); } catch (e) { /* a store too full for the files' text: the chat goes on, unsaved */ }
  render();
  const el = addMessage("assistant", "");
  // The history goes back without the thinking, as OpenAI clients send it.
  const messages = (c.system ? [{ role: "system", content: c.system }] : [])
    .concat(c.messages.map((m) => ({ role: m.role, content: apiContent(m) })));
  const temperature = Number(c.temperature);
  const t = state.info.thinking || {};
  const think = c.think !== undefined ? c.think : !!t.default;
  state.controller = new AbortController();
  $("send").hidden = true; $("stop").hidden = false;
  let reply = "", thought = "", stopped = false, timings = null, cut = false, left = 0;
  try {
    const r = await api("/v1/chat/completions", {
      method: "POST", signal: state.controller.signal,
      body: JSON.stringify({ messages, stream: true, temperature: Number.isFinite(temperature) ? temperature : undefined,
                             // a chat longer than the context loses its oldest turns (--context-overflow)
                             truncation: state.info.context_overflow === "error" ? undefined : "auto",
                             chat_template_kwargs: t.switchable ? { enable_thinking: think } : undefined,
                             lora: c.lora ? adapters().map((a) => ({ id: a.id, scale: adapterScale(c, a) })) : undefined }),
    });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || ("HTTP " + r.status));
    }
    left = Number(r.headers.get("X-Turns-Left-Out") || 0);
    if (left > 0) el.parentNode.insertBefore(leftOutNote(left), el);
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut); buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.reasoning_content) { thought += delta.reasoning_content; setThinking(el, thought, false); }
          if (delta && delta.content) {
            reply += delta.content;
            if (thought) { setThinking(el, thought, true); el.querySelector("details.thinking").open = false; }
            renderMarkdown(bodyOf(el), reply);
          }
          if (delta && (delta.content || delta.reasoning_content)) $("messages").scrollTop = $("messages").scrollHeight;
          if (chunk.timings) timings = chunk.timings;
          if (chunk.choices && chunk.choices[0] && chunk.choices[0].finish_reason === "length") cut = true;
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") stopped = true;
    else { const err = addMessage("error", "Error: " + e.message); err.classList.add("error"); }
  } finally {
    state.controller = null;
    $("send").hidden = false; $("stop").hidden = true;
  }
  if (thought) setThinking(el, thought, true);
  if (reply || thought || stopped) {
    const m = thought ? { role: "assistant", content: reply, reasoning: thought } : { role: "assistant", content: reply };
    if (left) m.left_out = left;  // the notes stay with the conversation
    if (cut) m.cut = true;
    c.messages.push(m);
    try { save(); } catch (e) { /* a full store: the chat goes on, unsaved */ }
  }
  if (stopped) { const n = document.createElement("div"); n.className = "note"; n.textContent = "(stopped)"; el.appendChild(n); }
  if (cut) el.appendChild(cutNote());  // never a silent cut
  if (timings) $("speed").textContent = timings.predicted_per_second.toFixed(1) + " tokens/s";
  return true;
}

// Attachments: text files and PDFs, read here in the page (PDFs by pdf.js, loaded the first time
// one is attached) and sent as text parts. Images are refused: the model reads text only.
const MAX_ATTACHMENT_BYTES = 32 * 1024 * 1024;
let pdfjs = null;

async function pdfText(file) {
  if (!pdfjs) {
    pdfjs = await import("/static/vendor/pdf.min.mjs");
    pdfjs.GlobalWorkerOptions.workerSrc = "/static/vendor/pdf.worker.min.mjs";
  }
  const task = pdfjs.getDocument({ data: new Uint8Array(await file.arrayBuffer()), isEvalSupported: false });
  const pages = [];
  try {
    const doc = await task.promise;
    for (let i = 1; i <= doc.numPages; i++) {
      const content = await (await doc.getPage(i)).getTextContent();
      pages.push(content.items.map((it) => (it.str || "") + (it.hasEOL ? "\n" : "")).join(""));
    }
  } finally { task.destroy(); }
  return pages.join("\n\n").trim();
}

async function readAttachment(file) {
  if ((file.type || "").startsWith("image/") || /\.(png|jpe?g|gif|webp|bmp|tiff?|heic|avif|svg)$/i.test(file.name))
    throw new Error(file.name + ": images cannot be attached: this model reads text only");
  if (file.size > MAX_ATTACHMENT_BYTES)
    throw new Error(file.name + ": larger than " + (MAX_ATTACHMENT_BYTES >> 20) + " MB; attach a smaller part of it");
  if (file.type === "application/pdf" || /\.pdf$/i.test(file.name)) {
    let text;
    try { text = await pdfText(file); }
    catch (e) { throw new Error(file.name + ": this PDF could not be read (" + (e.message || e) + ")"); }
    if (!text) throw new Error(file.name + ": this PDF has no text to take out (a scan? this model cannot read images)");
    return { name: file.name, size: file.size, kind: "pdf", text };
  }
  let text;
  try { text = new TextDecoder("utf-8", { fatal: true }).decode(await file.arrayBuffer()); }
  catch (e) { text = null; }
  if (text === null || text.includes("\u0000"))
    throw new Error(file.name + ": not a text file or a PDF, which are what can be attached");
  return { name: file.name, size: file.size, kind: "text", text };
}

function sizeText(n) { return n < 1024 ? n + " B" : n < 1 << 20 ? (n / 1024).toFixed(1) + " KB" : (n / (1 << 20)).toFixed(1) + " MB"; }

// Attachment chips: on a message, or (with onRemove) on the message being written.
function chips(list, onRemove) {
  const box = document.createElement("div");
  box.className = "chips";
  list.forEach((a, i) => {
    const chip = document.createElement("span");
    chip.className = "chip";
    chip.title = a.kind === "pdf" ? "PDF, its text taken out" : "text file";
    chip.textContent = (a.kind === "pdf" ? "📄 " : "📝 ") + a.name + " · " + sizeText(a.size);
    if (onRemove) {
      const x = document.createElement("button");
      x.type = "button"; x.textContent = "×"; x.title = "Remove"; x.setAttribute("aria-label", "Remove " + a.name);
      x.addEventListener("click", () => onRemove(i));
      chip.appendChild(x);
    }
    box.appendChild(chip);
  });
  return box;
}

function renderPending() {
  const box = $("attachments");
  box.hidden = state.pending.length === 0;
  box.replaceChildren(...chips(state.pending, (i) => { state.pending.splice(i, 1); renderPending(); }).childNodes);
}

async function addFiles(files) {
  for (const file of files) {
    try { state.pending.push(await readAttachment(file)); }
    catch (e) { const err = addMessage("error", e.message); err.classList.add("error"); }
  }
  renderPending();
}

// LoRA adapters packed in the bundle: a scale slider each; a conversation whose sliders were
// moved sends its scales with every request (llama-server's per-request "lora").
function adapters() { return state.info.adapters || []; }
function adapterScale(c, a) { return c.lora && c.lora[a.id] !== undefined ? c.lora[a.id] : a.scale; }

function renderAdapters() {
  const box = $("adapters");
  box.hidden = adapters().length === 0;
  box.textContent = "";
  const c = current();
  for (const a of adapters()) {
    const label = document.createElement("label");
    label.className = "adapter";
    label.textContent = "LoRA " + a.name + " ";
    const input = document.createElement("input");
    input.type = "range"; input.min = "0"; input.max = "2"; input.step = "0.05";
    input.value = String(adapterScale(c, a));
    input.dataset.adapter = String(a.id);
    const shown = document.createElement("output");
    shown.textContent = Number(input.value).toFixed(2);
    input.addEventListener("input", () => { shown.textContent = Number(input.value).toFixed(2); });
    input.addEventListener("change", () => {
      const cur = current();
      cur.lora = cur.lora || {};
      cur.lora[a.id] = Number(input.value);
      save();
    });
    label.append(input, shown);
    box.appendChild(label);
  }
}

async function start() {
  try {
    const r = await api("/info");
    if (r.ok) state.info = await r.json();
  } catch (e) { /* the page still works without it */ }
  const name = state.info.name || "Chat";
  document.title = name;
  $("model-name").textContent = name;
  const b = state.info.backend || {};
  const m = state.info.model || {};
  const where = b.name === "CUDA" ? "CUDA (" + (b.device || "GPU") + ")" : b.name ? "CPU" + (b.cpu_variant ? " (" + b.cpu_variant + ")" : "") : "";
  $("backend").textContent = [m.size_label, m.quantization, where].filter(Boolean).join(" · ");
  if (b.cpu_reason && b.name === "CPU") $("backend").title = "CPU because " + b.cpu_reason;
  render();
}

$("composer").addEventListener("submit", async (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if ((!text && !state.pending.length) || state.controller) return;
  const attachments = state.pending;
  $("input").value = "";
  state.pending = [];
  renderPending();
  if (!(await send(text, attachments))) {  // refused before sending: the words and files stay
    $("input").value = text;
    state.pending = attachments;
    renderPending();
  }
});
$("attach").addEventListener("click", () => $("file").click());
$("file").addEventListener("change", async () => { const files = [...$("file").files]; $("file").value = ""; await addFiles(files); });
$("composer").addEventListener("dragover", (e) => e.preventDefault());
$("composer").addEventListener("drop", (e) => { e.preventDefault(); if (e.dataTransfer) addFiles([...e.dataTransfer.files]); });
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
$("new-chat").addEventListener("click", () => { if (!state.controller) { newConversation(); render(); } });
$("toggle-settings").addEventListener("click", () => { $("settings").hidden = !$("settings").hidden; });
$("toggle-sidebar").addEventListener("click", () => document.body.classList.toggle("sidebar-open"));
$("system").addEventListener("change", () => { current().system = $("system").value; save(); });
$("temperature").addEventListener("change", () => { current().temperature = Number($("temperature").value); save(); });
$("think").addEventListener("change", () => { current().think = $("think").checked; save(); });
$("show-thinking").addEventListener("change", () => {
  state.data.showThinking = $("show-thinking").checked; save();
  document.querySelectorAll("details.thinking").forEach((d) => { d.hidden = !showThinking(); });
});
start();
