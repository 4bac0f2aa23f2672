// The chat page: streams replies from /v1/chat/completions, keeps the conversation in the
// page (every turn sends it whole; the server's prefix cache makes the repeated part cheap,
// and each reply says how many prompt tokens were reused and how many computed), shows the
// model's thinking folded away from the answer, and stops a reply by aborting its request.
'use strict';

(() => {
  const $ = Wick.$;
  const messages = []; // {role, content}: what the next request sends back
  let controller = null; // the reply being streamed

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function scrollDown() {
    const m = $('#chat');
    m.scrollTop = m.scrollHeight;
  }

  function copyButton(getText, label) {
    const b = el('button', 'copy ghost', label || 'Copy');
    b.type = 'button';
    b.addEventListener('click', async () => {
      try {
        await navigator.clipboard.writeText(getText());
        b.textContent = 'Copied';
      } catch (_) {
        b.textContent = 'Copy failed';
      }
      setTimeout(() => { b.textContent = label || 'Copy'; }, 1200);
    });
    return b;
  }

  // Markdown into `node`, with a copy button on every code block.
  function renderInto(node, text) {
    node.innerHTML = Markdown.render(text);
    node.querySelectorAll('pre').forEach((pre) => {
      const code = pre.textContent;
      pre.appendChild(copyButton(() => code));
    });
  }

  function addUser(text) {
    const art = el('article', 'msg user');
    art.appendChild(el('div', 'body', text));
    $('#messages').appendChild(art);
    scrollDown();
  }

  // The reply's elements: folded reasoning, answer, and a footer for usage and copy.
  function addAssistant() {
    const art = el('article', 'msg assistant');
    art.dataset.state = 'waiting';
    const details = el('details', 'reasoning');
    details.hidden = true;
    const summary = el('summary', '', 'Thinking…');
    const rbody = el('div', 'reasoning-body');
    details.append(summary, rbody);
    const body = el('div', 'body md');
    const meta = el('footer', 'meta');
    const usage = el('span', 'usage muted');
    meta.appendChild(usage);
    art.append(details, body, meta);
    $('#messages').appendChild(art);
    scrollDown();
    return { art, details, summary, rbody, body, meta, usage };
  }

  function numberOrUndefined(id) {
    const v = $(id).value.trim();
    if (v === '') return undefined;
    const n = Number(v);
    return Number.isFinite(n) ? n : undefined;
  }

  function requestBody() {
    const sys = $('#system').value.trim();
    const body = {
      messages: (sys ? [{ role: 'system', content: sys }] : []).concat(messages),
      stream: true,
      stream_options: { include_usage: true },
      chat_template_kwargs: { enable_thinking: $('#thinking').checked },
    };
    for (const k of ['temperature', 'top_p', 'max_tokens']) {
      const v = numberOrUndefined('#' + k);
      if (v !== undefined) body[k] = v;
    }
    return body;
  }

  // Server-sent events from a fetch body: calls `onData` with each `data:` payload.
  async function readEvents(resp, onData) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = '';
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf('\n\n')) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        const data = event.split('\n')
          .filter((l) => l.startsWith('data:'))
          .map((l) => l.slice(5).trimStart())
          .join('\n');
        if (data) onData(data);
      }
    }
  }

  function showUsage(ui, usage, timing) {
    const u = ui.usage;
    const parts = [];
    if (usage) {
      const prompt = usage.prompt_tokens || 0;
      const cached = (usage.prompt_tokens_details && usage.prompt_tokens_details.cached_tokens) || 0;
      u.dataset.promptTokens = String(prompt);
      u.dataset.cachedTokens = String(cached);
      u.dataset.completionTokens = String(usage.completion_tokens || 0);
      parts.push('prompt ' + prompt + ' tokens: ' + cached + ' reused, ' + (prompt - cached) + ' computed');
      parts.push(usage.completion_tokens + ' generated');
    }
    if (timing.first !== null) parts.push('first token ' + (timing.first / 1000).toFixed(2) + ' s');
    const secs = timing.total / 1000;
    parts.push(secs.toFixed(2) + ' s');
    if (usage && secs > 0) parts.push((usage.completion_tokens / secs).toFixed(1) + ' tok/s');
    u.textContent = parts.join(' · ');
  }

  async function send(text) {
    if (controller) return;
    messages.push({ role: 'user', content: text });
    addUser(text);
    const ui = addAssistant();
    let reasoning = '';
    let content = '';
    let usage = null;
    let failure = null;
    let pending = false;
    const started = performance.now();
    const timing = { first: null, total: 0 };
    const paint = () => {
      pending = false;
      if (reasoning) {
        ui.details.hidden = false;
        ui.rbody.textContent = reasoning;
      }
      renderInto(ui.body, content);
      scrollDown();
    };
    const schedule = () => {
      if (!pending) {
        pending = true;
        requestAnimationFrame(paint);
      }
    };
    controller = new AbortController();
    setBusy(true);
    try {
      const resp = await Wick.api('/v1/chat/completions', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify(requestBody()),
        signal: controller.signal,
      });
      if (!resp.ok) throw new Error(await Wick.errorText(resp));
      ui.art.dataset.state = 'streaming';
      let done = false;
      await readEvents(resp, (data) => {
        if (data === '[DONE]') {
          done = true;
          return;
        }
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message || 'the server ended the reply with an error');
        if (chunk.usage) usage = chunk.usage;
        const choice = chunk.choices && chunk.choices[0];
        if (!choice || !choice.delta) return;
        const d = choice.delta;
        // The server may send the thinking under both names; read one.
        const r = d.reasoning_content !== undefined ? d.reasoning_content : d.reasoning;
        if (r) reasoning += r;
        if (d.content) content += d.content;
        if ((r || d.content) && timing.first === null) timing.first = performance.now() - started;
        schedule();
      });
      if (!done) throw new Error('the reply was cut off');
      ui.art.dataset.state = 'done';
    } catch (e) {
      if (e.name === 'AbortError') {
        ui.art.dataset.state = 'stopped';
      } else {
        failure = e.message;
        ui.art.dataset.state = 'error';
      }
    }
    timing.total = performance.now() - started;
    paint();
    ui.summary.textContent = 'Thinking (' + reasoning.length + ' characters)';
    if (failure) ui.meta.prepend(el('span', 'error', failure + ' '));
    if (ui.art.dataset.state === 'stopped') ui.meta.prepend(el('span', 'muted', 'stopped · '));
    showUsage(ui, usage, timing);
    ui.meta.appendChild(copyButton(() => content));
    // A stopped reply stays in the conversation as far as it went; a failed one does not.
    if (failure) messages.pop();
    else messages.push({ role: 'assistant', content });
    controller = null;
    setBusy(false);
  }

  function setBusy(busy) {
    $('#send').disabled = busy;
    $('#stop').disabled = !busy;
    document.body.dataset.busy = busy ? 'true' : 'false';
  }

  // The settings outlive the page, in localStorage.
  const SETTINGS = 'wick.chat.settings';
  const FIELDS = ['thinking', 'temperature', 'top_p', 'max_tokens', 'system'];

  function loadSettings() {
    let saved = {};
    try {
      saved = JSON.parse(localStorage.getItem(SETTINGS) || '{}') || {};
    } catch (_) { /* ignore a damaged entry */ }
    for (const f of FIELDS) {
      const e = $('#' + f);
      if (!(f in saved)) continue;
      if (e.type === 'checkbox') e.checked = saved[f] === true;
      else e.value = String(saved[f]);
    }
    const save = () => {
      const out = {};
      for (const f of FIELDS) {
        const e = $('#' + f);
        out[f] = e.type === 'checkbox' ? e.checked : e.value;
      }
      localStorage.setItem(SETTINGS, JSON.stringify(out));
    };
    for (const f of FIELDS) $('#' + f).addEventListener('change', save);
  }

  function start(modelsResp) {
    loadSettings();
    modelsResp.json().then((j) => {
      const m = j && j.data && j.data[0];
      if (m) $('#model').textContent = m.id + ' · context ' + m.max_model_len;
    }).catch(() => {});
    $('#send-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const text = $('#input').value.trim();
      if (!text || controller) return;
      $('#input').value = '';
      send(text);
    });
    $('#input').addEventListener('keydown', (ev) => {
      if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) {
        ev.preventDefault();
        $('#send-form').requestSubmit();
      }
    });
    $('#stop').addEventListener('click', () => {
      if (controller) controller.abort();
    });
    $('#clear').addEventListener('click', () => {
      if (controller) controller.abort();
      messages.length = 0;
      $('#messages').textContent = '';
    });
    $('#input').focus();
  }

  document.addEventListener('DOMContentLoaded', () => {
    Wick.guard(() => Wick.api('/v1/models'), start);
  });
})();
