// A small Markdown renderer for model replies. Safe by construction: the whole text is
// HTML-escaped first, and only the tags written below are added afterwards; links keep
// http, https and mailto targets only. Covers fenced code blocks, inline code, headings,
// bullet and numbered lists, block quotes, rules, bold, italic, strike-through and links;
// anything else stays plain text.
'use strict';

const Markdown = (() => {
  function escape(s) {
    return s
      .replace(/&/g, '&amp;')
      .replace(/</g, '&lt;')
      .replace(/>/g, '&gt;')
      .replace(/"/g, '&quot;')
      .replace(/'/g, '&#39;');
  }

  const SAFE_URL = /^(https?:\/\/|mailto:)/i;

  // One line of escaped text: code spans are set aside first so nothing inside them is
  // formatted, then links and emphasis.
  function inline(escaped) {
    const spans = [];
    let s = escaped.replace(/`([^`]+)`/g, (_, code) => {
      spans.push('<code>' + code + '</code>');
      return '\u0000' + (spans.length - 1) + '\u0000';
    });
    s = s.replace(/\[([^\]]+)\]\(([^)\s]+)\)/g, (m, text, url) => {
      if (!SAFE_URL.test(url)) return m;
      // Set aside too, so that emphasis never reaches into the address.
      spans.push('<a href="' + url + '" rel="noopener noreferrer" target="_blank">' + text + '</a>');
      return '\u0000' + (spans.length - 1) + '\u0000';
    });
    s = s
      .replace(/\*\*([^*]+)\*\*/g, '<strong>$1</strong>')
      .replace(/__([^_]+)__/g, '<strong>$1</strong>')
      .replace(/~~([^~]+)~~/g, '<del>$1</del>')
      .replace(/(^|[^*\w])\*([^*\s][^*]*?)\*(?!\w)/g, '$1<em>$2</em>')
      .replace(/(^|[^_\w])_([^_\s][^_]*?)_(?!\w)/g, '$1<em>$2</em>');
    return s.replace(/\u0000(\d+)\u0000/g, (_, i) => spans[Number(i)]);
  }

  // Markdown source → HTML.
  function render(src) {
    const lines = String(src).replace(/\u0000/g, '').replace(/\r\n?/g, '\n').split('\n');
    const out = [];
    let para = [];
    let list = null; // {tag, items}
    const flushPara = () => {
      if (para.length) out.push('<p>' + para.map(inline).join('<br>') + '</p>');
      para = [];
    };
    const flushList = () => {
      if (list) {
        out.push('<' + list.tag + '>' + list.items.map((i) => '<li>' + inline(i) + '</li>').join('') +
          '</' + list.tag + '>');
      }
      list = null;
    };
    const flush = () => {
      flushPara();
      flushList();
    };
    for (let i = 0; i < lines.length; i++) {
      const raw = lines[i];
      const fence = raw.match(/^\s*(```|~~~)\s*([\w+#.-]*)\s*$/);
      if (fence) {
        flush();
        const body = [];
        i++;
        while (i < lines.length && !lines[i].trim().startsWith(fence[1])) {
          body.push(lines[i]);
          i++;
        }
        const lang = fence[2] ? ' class="lang-' + escape(fence[2]) + '"' : '';
        out.push('<pre><code' + lang + '>' + escape(body.join('\n')) + '</code></pre>');
        continue;
      }
      const line = escape(raw);
      if (!line.trim()) {
        flush();
        continue;
      }
      let m = line.match(/^(#{1,6})\s+(.*)$/);
      if (m) {
        flush();
        const n = m[1].length;
        out.push('<h' + n + '>' + inline(m[2]) + '</h' + n + '>');
        continue;
      }
      if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(line)) {
        flush();
        out.push('<hr>');
        continue;
      }
      m = line.match(/^&gt;\s?(.*)$/);
      if (m) {
        flush();
        out.push('<blockquote>' + inline(m[1]) + '</blockquote>');
        continue;
      }
      const ul = line.match(/^\s*[-*+]\s+(.*)$/);
      const ol = line.match(/^\s*\d{1,9}[.)]\s+(.*)$/);
      if (ul || ol) {
        flushPara();
        const tag = ul ? 'ul' : 'ol';
        if (!list || list.tag !== tag) {
          flushList();
          list = { tag, items: [] };
        }
        list.items.push((ul || ol)[1]);
        continue;
      }
      if (list && /^\s{2,}/.test(line)) {
        // A continuation of the last item.
        list.items[list.items.length - 1] += ' ' + line.trim();
        continue;
      }
      flushList();
      para.push(line);
    }
    flush();
    return out.join('\n');
  }

  return { render, escape };
})();
