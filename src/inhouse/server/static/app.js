// inhouse chat page: talks to this server's /v1 API; conversations are kept in this browser only.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "inhouse.conversations";
const KEY = "inhouse.apiKey";
const SETTINGS = "inhouse.settings";

let conversations = [];
let current = null;
let controller = null;

function load() {
  try { conversations = JSON.parse(localStorage.getItem(STORE) || "[]"); } catch (e) { conversations = []; }
  $("api-key").value = localStorage.getItem(KEY) || "";
  try {
    const s = JSON.parse(localStorage.getItem(SETTINGS) || "{}");
    if (s.temperature !== undefined) $("temperature").value = s.temperature;
  } catch (e) { /* ignore */ }
}

function save() {
  localStorage.setItem(STORE, JSON.stringify(conversations));
  localStorage.setItem(SETTINGS, JSON.stringify({ temperature: $("temperature").value, model: $("model").value }));
}

function newConversation() {
  const conv = { id: Date.now().toString(36) + Math.random().toString(36).slice(2, 6), title: "New conversation",
                 system: $("system").value, messages: [] };
  conversations.unshift(conv);
  select(conv.id);
  save();
}

function select(id) {
  current = conversations.find((c) => c.id === id) || null;
  if (current) $("system").value = current.system || "";
  renderList();
  renderMessages();
}

function renderList() {
  const ul = $("conversations");
  ul.replaceChildren();
  for (const c of conversations) {
    const li = document.createElement("li");
    if (current && c.id === current.id) li.className = "active";
    const span = document.createElement("span");
    span.textContent = c.title;
    span.dir = "auto";
    const del = document.createElement("button");
    del.type = "button";
    del.textContent = "×";
    del.title = "Delete";
    del.addEventListener("click", (ev) => {
      ev.stopPropagation();
      conversations = conversations.filter((x) => x.id !== c.id);
      if (current && current.id === c.id) current = conversations[0] || null;
      save(); select(current ? current.id : null);
    });
    li.append(span, del);
    li.addEventListener("click", () => select(c.id));
    ul.appendChild(li);
  }
}

function messageElement(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.dir = "auto"; // per message: Arabic or Hebrew replies lay out right to left
  const body = document.createElement("div");
  body.className = "body";
  body.dir = "auto";
  div.appendChild(body);
  setText(div, text);
  $("messages").appendChild(div);
  return div;
}

function setText(div, text) {
  const body = div.querySelector(".body");
  if (div.classList.contains("assistant")) window.renderMarkdown(body, text);
  else body.textContent = text;
  // The message's direction comes from its own first strong character (as dir="auto" would, but
  // dir="auto" skips children that carry their own dir, which the rendered paragraphs do).
  div.dir = firstStrongDirection(text);
}

const RTL = /[\p{Script=Arabic}\p{Script=Hebrew}\p{Script=Syriac}\p{Script=Thaana}\p{Script=Nko}]/u;
const LETTER = /\p{L}/u;

function firstStrongDirection(text) {
  for (const ch of text) {
    if (RTL.test(ch)) return "rtl";
    if (LETTER.test(ch)) return "ltr";
  }
  return "auto";
}

function setStatus(div, text) {
  let s = div.querySelector(".status");
  if (!s) { s = document.createElement("div"); s.className = "status"; div.appendChild(s); }
  s.textContent = text;
}

function renderMessages() {
  $("messages").replaceChildren();
  if (!current) return;
  for (const m of current.messages) {
    const div = messageElement(m.role, m.content);
    if (m.stopped) setStatus(div, "stopped");
  }
  $("messages").scrollTop = $("messages").scrollHeight;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function loadModels() {
  $("notice").textContent = "";
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const data = await r.json();
    if (!r.ok) { $("notice").textContent = (data.error && data.error.message) || r.statusText; return; }
    const sel = $("model");
    const previous = sel.value || (JSON.parse(localStorage.getItem(SETTINGS) || "{}").model);
    sel.replaceChildren();
    for (const m of data.data) {
      const o = document.createElement("option");
      o.value = m.id; o.textContent = m.parent ? `${m.id} (adapter of ${m.parent})` : m.id;
      sel.appendChild(o);
    }
    if (previous && [...sel.options].some((o) => o.value === previous)) sel.value = previous;
  } catch (e) {
    $("notice").textContent = "cannot reach the server: " + e.message;
  }
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

async function send(text) {
  if (!current) newConversation();
  const conv = current;
  conv.system = $("system").value;
  conv.messages.push({ role: "user", content: text });
  if (conv.title === "New conversation") conv.title = text.slice(0, 40);
  save(); renderList();
  messageElement("user", text);
  const reply = { role: "assistant", content: "" };
  const div = messageElement("assistant", "");
  const messages = (conv.system.trim() ? [{ role: "system", content: conv.system }] : [])
    .concat(conv.messages.map((m) => ({ role: m.role, content: m.content })));
  controller = new AbortController();
  busy(true);
  let failed = false;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({ model: $("model").value || undefined, messages, stream: true,
                             temperature: parseFloat($("temperature").value) || 0 }),
    });
    if (!r.ok) {
      let msg = r.statusText;
      try { const e = await r.json(); msg = (e.error && e.error.message) || msg; } catch (e) { /* not JSON */ }
      throw new Error(r.status + ": " + msg);
    }
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const obj = JSON.parse(data);
          if (obj.error) throw new Error(obj.error.message);
          for (const ch of obj.choices || []) {
            if (ch.delta && ch.delta.content) {
              reply.content += ch.delta.content;
              setText(div, reply.content);
              $("messages").scrollTop = $("messages").scrollHeight;
            }
          }
        }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") { reply.stopped = true; setStatus(div, "stopped"); }
    else { failed = true; div.classList.add("error"); setStatus(div, "error: " + e.message); }
  } finally {
    controller = null;
    busy(false);
    if (!failed) conv.messages.push(reply);
    else conv.messages.pop();  // keep the history answerable: drop the unanswered question
    save();
  }
}

function init() {
  load();
  if (conversations.length) select(conversations[0].id); else renderList();
  $("new-chat").addEventListener("click", newConversation);
  $("stop").addEventListener("click", () => { if (controller) controller.abort(); });
  $("api-key").addEventListener("change", () => { localStorage.setItem(KEY, $("api-key").value.trim()); loadModels(); });
  $("system").addEventListener("change", () => { if (current) { current.system = $("system").value; save(); } });
  $("temperature").addEventListener("change", save);
  $("model").addEventListener("change", save);
  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("input").value;
    if (!text.trim() || controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
  });
  busy(false);
  loadModels();
}

document.addEventListener("DOMContentLoaded", init);
