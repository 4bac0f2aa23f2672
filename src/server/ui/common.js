// Shared by the chat page and the dashboard: the API key (asked once, kept in the browser's
// localStorage), fetch with the key, the lock screen shown while the server refuses the key,
// and the light/dark switch (the system's choice until the user picks one).
'use strict';

const Wick = (() => {
  const KEY = 'wick.apiKey';
  const THEME = 'wick.theme';

  const $ = (sel) => document.querySelector(sel);

  function key() {
    return localStorage.getItem(KEY) || '';
  }

  function setKey(k) {
    if (k) localStorage.setItem(KEY, k);
    else localStorage.removeItem(KEY);
  }

  // fetch() with `Authorization: Bearer KEY` when a key is kept.
  function api(path, opts) {
    const o = Object.assign({}, opts || {});
    o.headers = Object.assign({}, o.headers || {});
    const k = key();
    if (k) o.headers.Authorization = 'Bearer ' + k;
    return fetch(path, o);
  }

  function applyTheme() {
    const t = localStorage.getItem(THEME);
    if (t === 'light' || t === 'dark') document.documentElement.dataset.theme = t;
    else delete document.documentElement.dataset.theme;
  }

  function isDark() {
    const t = document.documentElement.dataset.theme;
    if (t) return t === 'dark';
    return window.matchMedia('(prefers-color-scheme: dark)').matches;
  }

  function toggleTheme() {
    localStorage.setItem(THEME, isDark() ? 'light' : 'dark');
    applyTheme();
    document.dispatchEvent(new Event('wick-theme'));
  }

  // The page's error of a failed request: OpenAI's `error.message`, or the status.
  async function errorText(resp) {
    try {
      const j = await resp.json();
      if (j && j.error && j.error.message) return j.error.message;
    } catch (_) { /* not JSON */ }
    return 'HTTP ' + resp.status;
  }

  // Calls `probe()` (a fetch of a key-protected route); while it answers 401 the page is
  // locked: its content is hidden and the key form shown. `onReady` runs once unlocked.
  function guard(probe, onReady) {
    const lock = $('#lock');
    const form = $('#lock-form');
    const input = $('#lock-key');
    const msg = $('#lock-msg');
    async function attempt() {
      let resp;
      try {
        resp = await probe();
      } catch (e) {
        msg.textContent = 'The server cannot be reached: ' + e.message;
        setTimeout(attempt, 2000);
        return;
      }
      if (resp.status === 401) {
        document.body.dataset.locked = 'true';
        lock.hidden = false;
        msg.textContent = key()
          ? 'The server refused this key.'
          : 'This server needs an API key (wick serve --api-key).';
        input.focus();
        return;
      }
      document.body.dataset.locked = 'false';
      lock.hidden = true;
      onReady(resp);
    }
    form.addEventListener('submit', (ev) => {
      ev.preventDefault();
      setKey(input.value.trim());
      input.value = '';
      attempt();
    });
    const forget = $('#forget-key');
    if (forget) {
      forget.addEventListener('click', () => {
        setKey('');
        location.reload();
      });
    }
    attempt();
  }

  applyTheme();
  document.addEventListener('DOMContentLoaded', () => {
    const t = $('#theme');
    if (t) t.addEventListener('click', toggleTheme);
  });

  return { $, api, key, setKey, guard, errorText, isDark };
})();
