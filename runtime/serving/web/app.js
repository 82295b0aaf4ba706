// The chat page: conversations in localStorage, replies streamed from /v1/chat/completions.
// Model output is Markdown rendered by marked with raw HTML escaped, then sanitised by DOMPurify:
// it never runs as HTML or script. No network access beyond this server.
"use strict";

const STORE = "bundle-chat-v1";
const $ = (id) => document.getElementById(id);
const state = { data: load(), controller: null, info: {} };

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

function addMessage(role, text, reasoning) {
  const el = document.createElement("div");
  el.className = "msg " + role;
  if (role === "assistant") {
    const body = document.createElement("div");
    body.className = "body";
    el.appendChild(body);
    renderMarkdown(body, text);
    if (reasoning) { setThinking(el, reasoning, true); el.querySelector("details.thinking").open = false; }
  } else el.textContent = text;
  $("messages").appendChild(el);
  $("messages").scrollTop = $("messages").scrollHeight;
  return el;
}
function bodyOf(el) { return el.querySelector(".body"); }

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
  for (const m of c.messages) addMessage(m.role, m.content, m.reasoning);
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

async function send(text) {
  const c = current();
  c.messages.push({ role: "user", content: text });
  if (c.title === "New chat") c.title = text.slice(0, 40);
  save(); render();
  const el = addMessage("assistant", "");
  // The history goes back without the thinking, as OpenAI clients send it.
  const messages = (c.system ? [{ role: "system", content: c.system }] : [])
    .concat(c.messages.map((m) => ({ role: m.role, content: m.content })));
  const temperature = Number(c.temperature);
  const t = state.info.thinking || {};
  const think = c.think !== undefined ? c.think : !!t.default;
  state.controller = new AbortController();
  $("send").hidden = true; $("stop").hidden = false;
  let reply = "", thought = "", stopped = false, timings = null;
  try {
    const r = await api("/v1/chat/completions", {
      method: "POST", signal: state.controller.signal,
      body: JSON.stringify({ messages, stream: true, temperature: Number.isFinite(temperature) ? temperature : undefined,
                             chat_template_kwargs: t.switchable ? { enable_thinking: think } : undefined,
                             lora: c.lora ? adapters().map((a) => ({ id: a.id, scale: adapterScale(c, a) })) : undefined }),
    });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || ("HTTP " + r.status));
    }
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
    c.messages.push(thought ? { role: "assistant", content: reply, reasoning: thought } : { role: "assistant", content: reply });
    save();
  }
  if (stopped) { const n = document.createElement("div"); n.className = "note"; n.textContent = "(stopped)"; el.appendChild(n); }
  if (timings) $("speed").textContent = timings.predicted_per_second.toFixed(1) + " tokens/s";
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

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.controller) return;
  $("input").value = "";
  send(text);
});
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
