// A small Markdown renderer that builds DOM nodes and never parses HTML: model output is always text.
// Supported: fenced code blocks, headings, bullet and numbered lists, paragraphs, `code`, **bold**, *italic*.
"use strict";

(function (global) {
  function inline(parent, text) {
    // Tokens: `code`, **bold**, *italic*. Everything else is a text node.
    const re = /(`[^`\n]+`|\*\*[^*\n]+\*\*|\*[^*\s][^*\n]*\*)/g;
    let last = 0;
    let m;
    while ((m = re.exec(text)) !== null) {
      if (m.index > last) parent.appendChild(document.createTextNode(text.slice(last, m.index)));
      const tok = m[0];
      let el;
      if (tok.startsWith("`")) { el = document.createElement("code"); el.textContent = tok.slice(1, -1); }
      else if (tok.startsWith("**")) { el = document.createElement("strong"); el.textContent = tok.slice(2, -2); }
      else { el = document.createElement("em"); el.textContent = tok.slice(1, -1); }
      parent.appendChild(el);
      last = m.index + tok.length;
    }
    if (last < text.length) parent.appendChild(document.createTextNode(text.slice(last)));
  }

  function blocks(parent, text) {
    const lines = text.split("\n");
    let para = [];
    let list = null;
    const flushPara = () => {
      if (para.length) {
        const p = document.createElement("p");
        p.dir = "auto";
        inline(p, para.join("\n"));
        parent.appendChild(p);
        para = [];
      }
    };
    for (const line of lines) {
      const h = /^(#{1,6})\s+(.*)$/.exec(line);
      const li = /^\s*(?:[-*+]|(\d+)[.)])\s+(.*)$/.exec(line);
      if (h) {
        flushPara(); list = null;
        const el = document.createElement("h" + Math.min(6, h[1].length + 2));
        el.dir = "auto";
        inline(el, h[2]);
        parent.appendChild(el);
      } else if (li) {
        flushPara();
        const kind = li[1] ? "ol" : "ul";
        if (!list || list.tagName.toLowerCase() !== kind) {
          list = document.createElement(kind);
          list.dir = "auto";
          parent.appendChild(list);
        }
        const item = document.createElement("li");
        inline(item, li[2]);
        list.appendChild(item);
      } else if (line.trim() === "") {
        flushPara(); list = null;
      } else {
        list = null;
        para.push(line);
      }
    }
    flushPara();
  }

  function render(container, text) {
    container.replaceChildren();
    const fence = /```([^\n`]*)\n?([\s\S]*?)(?:```|$)/g;
    let last = 0;
    let m;
    while ((m = fence.exec(text)) !== null) {
      if (m.index > last) blocks(container, text.slice(last, m.index));
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      const lang = m[1].trim();
      if (/^[\w+-]+$/.test(lang)) code.className = "language-" + lang;
      code.textContent = m[2].replace(/\n$/, "");
      pre.appendChild(code);
      container.appendChild(pre);
      last = fence.lastIndex;
      if (m[0].length === 0) break;
    }
    if (last < text.length) blocks(container, text.slice(last));
  }

  global.renderMarkdown = render;
})(window);
