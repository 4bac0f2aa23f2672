// The dashboard: polls /dashboard/data (the server's rings of one-second or ten-second
// samples) and draws each series on a <canvas>, with the --slo-p95 / --slo-ttft targets as
// dashed lines. Every chart's figure carries what it drew in data attributes
// (`data-points`, per series `data-points`, `data-threshold-drawn`), so that a test can
// check the drawing without reading pixels.
'use strict';

(() => {
  const $ = Wick.$;

  // id, title, unit, series [key, label], optional: SLO field, y scale, fixed y max,
  // whether the y axis starts at zero, whole numbers only, the series whose latest value
  // is the chart's total (shown in the title).
  const CHARTS = [
    { id: 'requests', title: 'Requests per second', unit: '/s',
      series: [['requests_per_s', 'finished'], ['refused_per_s', '429 refused']] },
    { id: 'e2e', title: 'End-to-end latency', unit: 's',
      series: [['e2e_p50', 'P50'], ['e2e_p95', 'P95'], ['e2e_p99', 'P99']],
      slo: 'e2e_p95_s', sloLabel: 'SLO P95' },
    { id: 'ttft', title: 'Time to first token', unit: 's',
      series: [['ttft_p50', 'P50'], ['ttft_p95', 'P95'], ['ttft_p99', 'P99']],
      slo: 'ttft_p95_s', sloLabel: 'SLO P95' },
    { id: 'tokens', title: 'Tokens per second', unit: '/s',
      series: [['prompt_tokens_per_s', 'in (prompt)'], ['generation_tokens_per_s', 'out (generated)']] },
    { id: 'queue', title: 'Requests running and waiting', unit: '', whole: true,
      series: [['running', 'running'], ['waiting', 'waiting']] },
    // The pool's size is in the title: drawn, it would flatten the lines that matter.
    { id: 'kv', title: 'KV cache blocks', unit: '', whole: true, of: 'kv_total',
      series: [['kv_used', 'used'], ['kv_cached', 'cached, free']] },
    { id: 'hit', title: 'Prefix-cache hit rate', unit: '%', scale: 100, yMax: 100,
      series: [['prefix_hit_rate', 'prompt tokens reused']] },
    { id: 'memory', title: 'Memory', unit: 'MB', fromZero: false,
      series: [['resident_mb', 'resident'], ['gpu_mb', 'GPU buffers']] },
  ];

  const store = { range: 'fine', t: [], series: {}, capacity: 600, step: 1, last: 0, meta: null };
  let timer = null;

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function fmt(v, unit) {
    if (v === null || v === undefined || !Number.isFinite(v)) return '–';
    const a = Math.abs(v);
    let s;
    if (unit === 's' && a < 1) s = (v * 1000).toFixed(a < 0.01 ? 1 : 0) + ' ms';
    else if (a >= 1000) s = v.toFixed(0);
    else if (a >= 10) s = v.toFixed(1);
    else s = v.toFixed(2);
    if (unit === 's' && a < 1) return s;
    return unit ? s + (unit === '/s' || unit === '%' ? '' : ' ') + unit : s;
  }

  function buildCharts() {
    const box = $('#charts');
    box.textContent = '';
    for (const c of CHARTS) {
      const fig = el('figure', 'chart');
      fig.id = 'chart-' + c.id;
      fig.dataset.points = '0';
      const cap = el('figcaption');
      cap.appendChild(el('span', 'title', c.title));
      const legend = el('span', 'legend');
      c.series.forEach(([key, label], i) => {
        const k = el('span', 'key');
        k.dataset.series = key;
        k.dataset.points = '0';
        k.append(el('i', 'swatch c' + i), el('span', 'label', label), el('span', 'value', ''));
        legend.appendChild(k);
      });
      if (c.slo) {
        const k = el('span', 'key threshold');
        k.hidden = true;
        k.append(el('i', 'swatch slo'), el('span', 'label', ''));
        legend.appendChild(k);
      }
      cap.appendChild(legend);
      fig.append(cap, el('canvas'));
      box.appendChild(fig);
    }
  }

  function css(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  }

  // A round number at or above v, for the axis.
  function niceCeil(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  function draw(c) {
    const fig = document.getElementById('chart-' + c.id);
    const canvas = fig.querySelector('canvas');
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth;
    const h = canvas.clientHeight;
    if (!w || !h) return;
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
    const ctx = canvas.getContext('2d');
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const pad = { l: 56, r: 10, t: 8, b: 20 };
    const pw = w - pad.l - pad.r;
    const ph = h - pad.t - pad.b;
    // The x axis: the ring's whole window once it is full, at least the last minute.
    const now = store.meta ? store.meta.now_ms : Date.now();
    const full = store.capacity * store.step * 1000;
    const held = store.t.length ? now - store.t[0] : 0;
    const span = Math.min(full, Math.max(60000, Math.ceil(held / 60000) * 60000));
    const t0 = now - span;
    const scale = c.scale || 1;
    const threshold = c.slo && store.meta && store.meta.slo ? store.meta.slo[c.slo] : null;

    // The y range: every value held, and the threshold.
    let lo = Infinity;
    let hi = -Infinity;
    for (const [key] of c.series) {
      for (const v of store.series[key] || []) {
        if (v === null) continue;
        lo = Math.min(lo, v * scale);
        hi = Math.max(hi, v * scale);
      }
    }
    if (threshold) hi = Math.max(hi, threshold);
    let y0 = 0;
    let y1;
    if (c.yMax) y1 = c.yMax;
    else if (c.fromZero === false && Number.isFinite(lo)) {
      const margin = Math.max((hi - lo) * 0.15, hi * 0.01, 1);
      y0 = Math.max(0, lo - margin);
      y1 = hi + margin;
    } else if (c.whole) y1 = Math.max(4, Math.ceil((Number.isFinite(hi) ? hi * 1.1 : 1) / 4) * 4);
    else y1 = niceCeil(Number.isFinite(hi) ? hi * 1.1 : 1);
    if (y1 <= y0) y1 = y0 + 1;
    const X = (t) => pad.l + ((t - t0) / span) * pw;
    const Y = (v) => pad.t + ph - ((v - y0) / (y1 - y0)) * ph;

    // Grid and axis labels.
    ctx.font = '11px system-ui, sans-serif';
    ctx.fillStyle = css('--muted');
    ctx.strokeStyle = css('--grid');
    ctx.lineWidth = 1;
    ctx.textAlign = 'right';
    ctx.textBaseline = 'middle';
    for (let i = 0; i <= 4; i++) {
      const v = y0 + ((y1 - y0) * i) / 4;
      const y = Math.round(Y(v)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(pad.l, y);
      ctx.lineTo(pad.l + pw, y);
      ctx.stroke();
      // Units too long for the axis are in the legend.
      const axisUnit = c.unit === '%' || c.unit === 'MB' ? '' : c.unit;
      ctx.fillText(c.whole ? String(Math.round(v)) : fmt(v, axisUnit), pad.l - 4, y);
    }
    ctx.textAlign = 'center';
    ctx.textBaseline = 'top';
    for (let i = 0; i <= 4; i++) {
      const ago = (span / 1000) * (1 - i / 4); // seconds
      let label = 'now';
      if (ago >= 3600) label = '-' + +(ago / 3600).toFixed(1) + ' h';
      else if (ago >= 60) label = '-' + +(ago / 60).toFixed(1) + ' min';
      else if (ago > 0) label = '-' + Math.round(ago) + ' s';
      ctx.fillText(label, pad.l + (pw * i) / 4, pad.t + ph + 4);
    }

    // Series: a line through neighbouring samples, a dot for a sample alone.
    let anyPoints = 0;
    const gap = store.step * 1000 * 2.5;
    c.series.forEach(([key], i) => {
      const vals = store.series[key] || [];
      ctx.strokeStyle = css('--c' + i);
      ctx.fillStyle = ctx.strokeStyle;
      ctx.lineWidth = 1.6;
      let n = 0;
      let open = false;
      let lastT = -Infinity;
      let last = null;
      for (let j = 0; j < store.t.length; j++) {
        const t = store.t[j];
        const v = vals[j];
        if (v === null || v === undefined || t < t0) {
          open = false;
          continue;
        }
        n++;
        last = v;
        const x = X(t);
        const y = Y(v * scale);
        const prevNull = j === 0 || vals[j - 1] === null || vals[j - 1] === undefined;
        const nextNull = j + 1 >= vals.length || vals[j + 1] === null || vals[j + 1] === undefined;
        if (!open || t - lastT > gap) {
          if (open) ctx.stroke();
          ctx.beginPath();
          ctx.moveTo(x, y);
          open = true;
        } else ctx.lineTo(x, y);
        if (prevNull && nextNull) {
          ctx.stroke();
          ctx.beginPath();
          ctx.arc(x, y, 2.5, 0, 2 * Math.PI);
          ctx.fill();
          ctx.beginPath();
          ctx.moveTo(x, y);
        }
        lastT = t;
      }
      if (open) ctx.stroke();
      const key_ = fig.querySelector('.key[data-series="' + key + '"]');
      key_.dataset.points = String(n);
      key_.hidden = n === 0 && key === 'gpu_mb';
      const shown = c.whole ? String(Math.round(last)) : fmt(last * scale, c.unit);
      key_.querySelector('.value').textContent = n ? ' ' + shown : '';
      anyPoints += n;
    });
    fig.dataset.points = String(anyPoints);

    // The target, dashed, across the whole chart.
    const tk = fig.querySelector('.key.threshold');
    if (threshold) {
      const y = Math.round(Y(threshold)) + 0.5;
      ctx.save();
      ctx.strokeStyle = css('--slo');
      ctx.lineWidth = 1.5;
      ctx.setLineDash([6, 4]);
      ctx.beginPath();
      ctx.moveTo(pad.l, y);
      ctx.lineTo(pad.l + pw, y);
      ctx.stroke();
      ctx.restore();
      tk.hidden = false;
      tk.querySelector('.label').textContent = ' ' + c.sloLabel + ' ' + fmt(threshold, c.unit);
      fig.dataset.threshold = String(threshold);
      fig.dataset.thresholdDrawn = 'true';
    } else if (tk) {
      tk.hidden = true;
      fig.dataset.thresholdDrawn = 'false';
    }
  }

  function drawAll() {
    for (const c of CHARTS) draw(c);
    tiles();
    const total = latest('kv_total');
    document.querySelector('#chart-kv .title').textContent =
      'KV cache blocks' + (total ? ' (of ' + total + ')' : '');
    const slope = store.meta && store.meta.memory_slope_mb_per_hour;
    const title = document.querySelector('#chart-memory .title');
    title.textContent = 'Memory' + (typeof slope === 'number'
      ? ', slope ' + (slope >= 0 ? '+' : '') + fmt(slope, '') + ' MB/h' : '');
  }

  // The latest non-null value of a series.
  function latest(key) {
    const v = store.series[key] || [];
    for (let i = v.length - 1; i >= 0; i--) if (v[i] !== null) return v[i];
    return null;
  }

  // The mean of a series' last `n` samples (rates are noisy second by second).
  function recentMean(key, n) {
    const v = (store.series[key] || []).slice(-n).filter((x) => x !== null);
    return v.length ? v.reduce((a, b) => a + b, 0) / v.length : null;
  }

  function whole(v) {
    return v === null ? '–' : String(Math.round(v));
  }

  function tiles() {
    const m = store.meta;
    if (!m) return;
    const slope = m.memory_slope_mb_per_hour;
    const kvTotal = latest('kv_total');
    const hit = latest('prefix_hit_rate');
    const rows = [
      ['Requests/s, last 10 samples', fmt(recentMean('requests_per_s', 10), '')],
      ['P95 latency', fmt(latest('e2e_p95'), 's')],
      ['P95 first token', fmt(latest('ttft_p95'), 's')],
      ['Tokens/s out, last 10 samples', fmt(recentMean('generation_tokens_per_s', 10), '')],
      ['Running / waiting', whole(latest('running')) + ' / ' + whole(latest('waiting'))],
      ['429s in total', String(m.refused_total)],
      ['KV in use', kvTotal ? fmt((100 * latest('kv_used')) / kvTotal, '%') : '–'],
      ['Prefix-cache hits', hit === null ? '–' : fmt(100 * hit, '%')],
      ['Resident memory', fmt(latest('resident_mb'), 'MB')],
      ['Memory slope', slope === null ? 'after a minute' : (slope >= 0 ? '+' : '') + fmt(slope, '') + ' MB/h'],
    ];
    const box = $('#tiles');
    box.textContent = '';
    for (const [name, value] of rows) {
      const t = el('div', 'tile');
      t.append(el('span', 'name muted small', name), el('span', 'value', value));
      box.appendChild(t);
    }
  }

  function merge(j) {
    if (j.range !== store.range) return;
    store.meta = j;
    store.capacity = j.capacity;
    store.step = j.step_s;
    // Only samples newer than those held (two answers may overlap).
    let from = 0;
    while (from < j.t.length && j.t[from] <= store.last) from++;
    store.t = store.t.concat(j.t.slice(from));
    for (const [key, vals] of Object.entries(j.series)) {
      store.series[key] = (store.series[key] || []).concat(vals.slice(from));
    }
    const extra = store.t.length - store.capacity;
    if (extra > 0) {
      store.t = store.t.slice(extra);
      for (const key of Object.keys(store.series)) store.series[key] = store.series[key].slice(extra);
    }
    if (j.t.length) store.last = j.t[j.t.length - 1];
    $('#model').textContent = j.model ? j.model + (j.max_model_len ? ' · context ' + j.max_model_len : '') : '';
    const ring = j.range === 'fine' ? 'one sample a second' : 'one sample every 10 s';
    $('#status').textContent = (j.loaded ? '' : 'The model is loading. ') + ring + ', ' + j.len +
      ' of ' + j.capacity + ' kept · updated ' + new Date(j.now_ms).toLocaleTimeString();
    document.body.dataset.samples = String(store.t.length);
    drawAll();
  }

  let polls = 0; // the latest poll chain; an older one stops

  async function poll() {
    clearTimeout(timer);
    const mine = ++polls;
    const range = store.range;
    try {
      const resp = await Wick.api('/dashboard/data?range=' + range + '&since=' + store.last);
      if (resp.status === 401) {
        location.reload();
        return;
      }
      if (!resp.ok) throw new Error(await Wick.errorText(resp));
      merge(await resp.json());
    } catch (e) {
      $('#status').textContent = 'No data: ' + e.message;
    }
    if (mine === polls) timer = setTimeout(poll, range === 'fine' ? 1000 : 10000);
  }

  function start(first) {
    buildCharts();
    first.json().then(merge).catch(() => {}).finally(() => {
      timer = setTimeout(poll, 1000);
    });
    $('#range').addEventListener('change', () => {
      store.range = $('#range').value;
      store.t = [];
      store.series = {};
      store.last = 0;
      poll();
    });
    window.addEventListener('resize', drawAll);
    document.addEventListener('wick-theme', drawAll);
  }

  document.addEventListener('DOMContentLoaded', () => {
    Wick.guard(() => Wick.api('/dashboard/data?range=fine&since=0'), start);
  });
})();
