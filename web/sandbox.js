// The sandbox's chat page: it plays Telegram's app against the emulated Bot API. It polls
// /sandbox/api/state and redraws what changed; every action is one POST to /sandbox/api/….
"use strict";

const view = { user: null, last: {}, queries: new Map(), checkouts: new Map(), toastTimer: null, toBottom: true };
const $ = (id) => document.getElementById(id);

async function api(path, body) {
  const response = await fetch("/sandbox/api/" + path, body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  const answer = await response.json();
  if (!response.ok) throw new Error(answer.error || response.statusText);
  return answer;
}

function escapeHtml(text) {
  return String(text ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

// Telegram's entities count UTF-16 code units, and so do JavaScript strings: offsets index `text` directly.
const TAGS = {
  bold: ["<b>", "</b>"], italic: ["<i>", "</i>"], underline: ["<u>", "</u>"], strikethrough: ["<s>", "</s>"],
  spoiler: ['<span class="spoiler">', "</span>"], code: ["<code>", "</code>"],
  blockquote: ["<blockquote>", "</blockquote>"], expandable_blockquote: ["<blockquote>", "</blockquote>"],
};

function openTag(entity, text) {
  if (entity.type === "pre") return "<pre>";
  if (entity.type === "text_link" || entity.type === "url") {
    const href = entity.type === "url" ? text.substr(entity.offset, entity.length) : entity.url;
    const safe = /^(https?|tg|mailto):/i.test(href || "") ? href : "#";
    return `<a href="${escapeHtml(safe)}" target="_blank" rel="noopener">`;
  }
  return (TAGS[entity.type] || ["<span>", "</span>"])[0];
}

function closeTag(entity) {
  if (entity.type === "pre") return "</pre>";
  if (entity.type === "text_link" || entity.type === "url") return "</a>";
  return (TAGS[entity.type] || ["<span>", "</span>"])[1];
}

function renderText(text, entities) {
  const opens = new Map(), closes = new Map();
  const sorted = [...(entities || [])].sort((a, b) => a.offset - b.offset || b.length - a.length);
  for (const e of sorted) {
    if (!opens.has(e.offset)) opens.set(e.offset, []);
    opens.get(e.offset).push(e);
    const end = e.offset + e.length;
    if (!closes.has(end)) closes.set(end, []);
    closes.get(end).unshift(e);
  }
  let out = "";
  for (let i = 0; i <= text.length; i++) {
    for (const e of closes.get(i) || []) out += closeTag(e);
    for (const e of opens.get(i) || []) out += openTag(e, text);
    if (i < text.length) out += escapeHtml(text[i]);
  }
  return out;
}

function amount(minor, currency) {
  const digits = currency === "XTR" || currency === "JPY" ? 0 : 2;
  return (minor / 10 ** digits).toFixed(digits) + " " + currency;
}

function messageHtml(m, state) {
  const who = m.from_bot ? "bot" : "user";
  let body = "";
  if (m.successful_payment) {
    const p = m.successful_payment;
    body = `💳 You paid ${escapeHtml(amount(p.total_amount, p.currency))}`;
  } else if (m.invoice) {
    const inv = m.invoice;
    const query = view.checkouts.get(m.id);
    let status = "";
    if (query) {
      const answer = state.checkout_answers[query];
      status = !answer ? "Checking out…" : answer.ok ? "Payment approved ✓"
        : "Refused: " + escapeHtml(answer.error_message || "");
    }
    body = `<div class="invoice"><div><b>${escapeHtml(inv.title)}</b></div><div>${escapeHtml(inv.description)}</div>` +
      `<div class="amount">${escapeHtml(amount(inv.total_amount, inv.currency))}</div>` +
      `<button class="pay" type="button" data-message="${m.id}">Pay ${escapeHtml(amount(inv.total_amount, inv.currency))}</button>` +
      (status ? `<div class="status">${status}</div>` : "") + "</div>";
  } else {
    if (m.photo) body += `<div class="status">[photo: ${escapeHtml(String(m.photo))}]</div>`;
    if (m.document) body += `<div class="status">[document: ${escapeHtml(String(m.document))}]</div>`;
    body += renderText(m.text || "", m.entities);
  }
  if (m.buttons && m.buttons.length) {
    body += '<div class="keyboard">' + m.buttons.map((row) => '<div class="row">' + row.map((b) => {
      const label = escapeHtml(b.text || "");
      if (b.url) return `<button class="inline" type="button" data-url="${escapeHtml(b.url)}">${label} ↗</button>`;
      if (b.callback_data !== undefined) {
        return `<button class="inline" type="button" data-message="${m.id}" data-data="${escapeHtml(b.callback_data)}">${label}</button>`;
      }
      return `<button class="inline" type="button" data-say="${label}">${label}</button>`;
    }).join("") + "</div>").join("") + "</div>";
  }
  return `<div class="msg ${who}" data-id="${m.id}">${body}</div>`;
}

function drawIfChanged(key, element, html) {
  if (view.last[key] === html) return false;
  view.last[key] = html;
  element.innerHTML = html;
  return true;
}

function drawUsers(state) {
  const html = state.users.map((u) => `<li><button type="button" data-user="${u.id}" class="${u.id === view.user ? "current" : ""}">` +
    `${escapeHtml(u.first_name)} <span class="hint">${u.id}</span></button></li>`).join("");
  drawIfChanged("users", $("users"), html);
  const current = state.users.find((u) => u.id === view.user);
  $("chat-name").textContent = current ? `Chat of ${current.first_name} with @${state.bot.username}` : "";
}

function drawEvents(state) {
  const html = [...state.events].reverse().map((r) => {
    const e = r.event || {};
    const kind = e.event_type + (e.update_type ? ` (${e.update_type})` : "");
    const outcome = r.status === null ? '<span class="waiting">⏳ Make is working…</span>'
      : `<span class="${r.status < 300 ? "ok" : "bad"}">Make answered ${r.status} in ${r.seconds} s</span>`;
    const answer = r.status === null ? "" : "<div>Make's answer:</div><pre>" +
      escapeHtml(typeof r.answer === "string" ? r.answer : JSON.stringify(r.answer, null, 2)) + "</pre>";
    return `<details class="event" data-n="${r.n}" data-type="${escapeHtml(String(e.event_type))}">` +
      `<summary>#${r.n} <b>${escapeHtml(kind)}</b> · chat ${escapeHtml(String(e.chat_id))} · ${outcome}</summary>` +
      `<pre class="json">${escapeHtml(JSON.stringify(e, null, 2))}</pre>${answer}</details>`;
  }).join("") || '<p class="hint">Nothing yet: write to the bot.</p>';
  const events = $("events");
  const open = new Set([...events.querySelectorAll("details[open]")].map((d) => d.dataset.n));
  if (drawIfChanged("events", events, html)) {
    for (const d of events.querySelectorAll("details")) if (open.has(d.dataset.n)) d.open = true;
  }
}

function draw(state) {
  const m = state.make;
  $("about").textContent = `Telegram is emulated: bot @${state.bot.username}. Make: ` +
    (m.real ? `your real webhook ${m.url}` : `a stand-in scenario that answers after ${m.delay} s`) +
    `. Batches close after ${state.settings.debounce_seconds} s of quiet (at most ${state.settings.max_wait_seconds} s).`;
  $("burst-hint").textContent = `Send a few messages within ${state.settings.debounce_seconds} s: they reach Make as one batch.`;
  drawUsers(state);
  const chat = $("chat");
  const atBottom = chat.scrollHeight - chat.scrollTop - chat.clientHeight < 40;
  if ((drawIfChanged("chat", chat, state.chat.map((msg) => messageHtml(msg, state)).join("")) && atBottom)
      || view.toBottom) {
    chat.scrollTop = chat.scrollHeight;
    view.toBottom = false;
  }
  $("typing").classList.toggle("on", state.typing);
  drawIfChanged("admin", $("admin"), state.admin.map((msg) => messageHtml(msg, state)).join("") ||
    '<p class="hint">No notices yet: pay an invoice.</p>');
  drawEvents(state);
  for (const [query, label] of view.queries) {
    const answer = state.callback_answers[query];
    if (answer) {
      view.queries.delete(query);
      toast(answer.text ? `${label}: ${answer.text}` : `${label}: answered`);
    }
  }
}

function toast(text) {
  const t = $("toast");
  t.textContent = text;
  t.classList.add("on");
  clearTimeout(view.toastTimer);
  view.toastTimer = setTimeout(() => t.classList.remove("on"), 3000);
}

async function refresh() {
  try {
    let state = await api("state?user=" + (view.user || ""));
    if (!state.users.some((u) => u.id === state.user)) {  // a user of an earlier sandbox run: start over
      view.user = null;
      state = await api("state");
    }
    if (view.user === null) view.user = state.user;
    if (state.user !== view.user) return;  // asked before the user was switched: the next poll draws the right chat
    draw(state);
  } catch (err) {
    $("about").textContent = "The sandbox is not answering (stopped?): " + err.message;
  }
}

async function poll() {
  await refresh();
  setTimeout(poll, 300);
}

// Runs an action; a failure is shown, never swallowed.
async function act(action) {
  try {
    await action();
  } catch (err) {
    toast("Not done: " + err.message);
  }
  await refresh();
}

async function send(text) {
  if (text.trim()) await api("say", { user: view.user, text });
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = $("input");
  const text = input.value;
  input.value = "";
  input.focus();
  act(async () => {
    try {
      await send(text);
    } catch (err) {
      if (!input.value) input.value = text;  // not sent: keep it to send again
      throw err;
    }
  });
});

$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});

$("chat").addEventListener("click", (event) => {
  const button = event.target.closest("button");
  if (!button) return;
  act(async () => {
    if (button.classList.contains("pay")) {
      button.disabled = true;  // one checkout at a time, as in Telegram's payment form
      const answer = await api("pay", { user: view.user, message_id: Number(button.dataset.message) });
      view.checkouts.set(Number(button.dataset.message), answer.query_id);
    } else if (button.dataset.url) {
      window.open(button.dataset.url, "_blank", "noopener");
    } else if (button.dataset.data !== undefined) {
      const message = Number(button.dataset.message);
      const answer = await api("press", { user: view.user, message_id: message, data: button.dataset.data });
      view.queries.set(answer.query_id, button.textContent);
    } else if (button.dataset.say) {
      await send(button.dataset.say);
    }
  });
});

$("users").addEventListener("click", (event) => {
  const button = event.target.closest("button[data-user]");
  if (!button) return;
  view.user = Number(button.dataset.user);
  view.toBottom = true;  // another chat opens at its latest messages
  act(async () => {});
});

$("add-user").addEventListener("click", () => act(async () => {
  const user = await api("users", {});
  view.user = user.id;
  view.toBottom = true;
}));

$("invoice").addEventListener("click", () => act(() => api("invoice", { user: view.user })));

$("trouble").addEventListener("click", () => act(async () => {
  await api("fail", { method: "sendMessage", status: 429 });
  toast("Telegram will answer the bot's next message with 429 (retry after 3 s)");
}));

poll();
