// interp attention explorer: reads the JSON in #explorer-data, draws everything locally.
// No network: no fetch, no import, no external URL (the page's CSP forbids them anyway).
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("explorer-data").textContent);
  const H = D.n_heads, LAYERS = D.layers;
  // Paul Tol's "muted" scheme (colour-blind safe) per label family; greys for the rest.
  const FAMILY = {
    "previous-token": ["#332288", "prev"], "next-token": ["#88CCEE", "next"],
    "positional": ["#44AA99", "pos"], "induction": ["#CC6677", "ind"],
    "duplicate-token": ["#882255", "dup"], "sink": ["#999933", "sink"],
    "syntactic": ["#DDCC77", "syn"], "semantic": ["#AA4499", "sem"],
    "local": ["#117733", "loc"], "long-range": ["#555555", "long"],
    "uniform": ["#999999", "uni"], "unclassified": ["#CCCCCC", "?"],
  };
  const NONE = ["#BBBBBB", ""];
  // viridis (colour-blind safe, ordered in lightness), 9 stops interpolated
  const VIRIDIS = [[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
    [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37]];
  const $ = (id) => document.getElementById(id);
  const S = { text: 0, li: Math.max(0, LAYERS.indexOf(D.start.layer)), h: D.start.head,
    sel: 1, dir: "out", bytes: [] };

  function family(label) { return label ? label.split(":")[0] : null; }
  function style(layer, head) {
    const info = D.heads[layer + "," + head];
    if (!info) return { info: null, colour: NONE[0], abbr: NONE[1] };
    const f = FAMILY[family(info.label)] || NONE;
    return { info, colour: f[0], abbr: f[1] };
  }
  function viridis(t) {
    const x = Math.min(1, Math.max(0, t)) * (VIRIDIS.length - 1);
    const i = Math.min(VIRIDIS.length - 2, Math.floor(x)), f = x - i;
    const c = VIRIDIS[i].map((v, j) => Math.round(v + f * (VIRIDIS[i + 1][j] - v)));
    return "rgb(" + c.join(",") + ")";
  }
  function hexRgb(hex) {
    return [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
  }
  function bytesOf(t) {
    if (!S.bytes[t]) {
      const bin = atob(D.texts[t].data), out = new Uint8Array(bin.length);
      for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
      S.bytes[t] = out;
    }
    return S.bytes[t];
  }
  // the stored byte (weight * 255) of (layer index, head, query, key) in text t
  function byte(t, li, h, q, k) {
    const T = D.texts[t], n = T.tokens.length, b = bytesOf(t), block = (li * H + h);
    if (!T.causal) return b[((block * n + q) * n) + k];
    if (k > q) return 0;
    return b[block * (n * (n + 1) / 2) + q * (q + 1) / 2 + k];
  }
  function weight(t, li, h, q, k) { return byte(t, li, h, q, k) / 255; }
  function fmt(w) { return w.toFixed(2); }
  function shown(tok) { return tok.replace(/\n/g, "\u21b5"); }

  // ------------------------------------------------------------------ header and selector
  function header() {
    $("model").textContent = D.model;
    const sel = $("text-select");
    D.texts.forEach((T, i) => {
      const o = document.createElement("option");
      o.value = String(i);
      o.textContent = (i + 1) + ". " + T.title + " (" + T.tokens.length + " tokens)";
      sel.appendChild(o);
    });
    sel.addEventListener("change", () => { S.text = Number(sel.value); S.sel = 1; drawAll(); });
    const notes = $("notes");
    D.notes.forEach((n) => { const li = document.createElement("li"); li.textContent = n;
      notes.appendChild(li); });
    const counts = {};
    Object.values(D.heads).forEach((v) => { const f = family(v.label);
      counts[f] = (counts[f] || 0) + 1; });
    const legend = $("legend");
    Object.keys(FAMILY).filter((f) => counts[f]).forEach((f) => {
      const span = document.createElement("span");
      span.className = "chip";
      span.innerHTML = '<i style="background:' + FAMILY[f][0] + '"></i>';
      span.appendChild(document.createTextNode(FAMILY[f][1] + " = " + f + " (" + counts[f] + ")"));
      legend.appendChild(span);
    });
    if (!Object.keys(counts).length) legend.textContent = "No head labels were given: every " +
      "thumbnail is grey (pass the head taxonomy's frame as labels=).";
  }

  // ------------------------------------------------------------------ layer x head grid
  function buildGrid() {
    const grid = $("grid");
    grid.style.gridTemplateColumns = "3em repeat(" + H + ", auto)";
    grid.appendChild(document.createElement("span"));
    for (let h = 0; h < H; h++) {
      const c = document.createElement("span"); c.className = "axis"; c.textContent = "H" + h;
      grid.appendChild(c);
    }
    LAYERS.forEach((layer, li) => {
      const r = document.createElement("span"); r.className = "axis"; r.textContent = "L" + layer;
      grid.appendChild(r);
      for (let h = 0; h < H; h++) {
        const st = style(layer, h), b = document.createElement("button");
        b.className = "thumb"; b.id = "thumb-" + layer + "-" + h;
        b.dataset.li = String(li); b.dataset.head = String(h);
        b.tabIndex = -1;
        b.style.borderColor = st.colour;
        const what = st.info ? st.info.label + (st.info.confidence === null ? "" :
          ", confidence " + fmt(st.info.confidence)) : "no label";
        b.setAttribute("aria-label", "layer " + layer + " head " + h + ": " + what);
        b.title = "L" + layer + "H" + h + ": " + what;
        const cv = document.createElement("canvas"); b.appendChild(cv);
        const ab = document.createElement("span"); ab.className = "abbr"; ab.textContent = st.abbr;
        b.appendChild(ab);
        b.addEventListener("click", () => select(li, h, true));
        b.addEventListener("keydown", gridKey);
        grid.appendChild(b);
      }
    });
  }
  function drawThumbs() {
    const n = D.texts[S.text].tokens.length;
    LAYERS.forEach((layer, li) => {
      for (let h = 0; h < H; h++) {
        const cv = $("thumb-" + layer + "-" + h).firstChild;
        cv.width = n; cv.height = n;
        const ctx = cv.getContext("2d"), img = ctx.createImageData(n, n);
        const rgb = hexRgb(style(layer, h).colour);
        for (let q = 0; q < n; q++) for (let k = 0; k < n; k++) {
          const w = Math.sqrt(weight(S.text, li, h, q, k)), o = (q * n + k) * 4;
          for (let j = 0; j < 3; j++) img.data[o + j] = Math.round(255 + w * (rgb[j] - 255));
          img.data[o + 3] = 255;
        }
        ctx.putImageData(img, 0, 0);
      }
    });
  }
  function gridKey(ev) {
    const li = Number(ev.currentTarget.dataset.li), h = Number(ev.currentTarget.dataset.head);
    const moves = { ArrowLeft: [0, -1], ArrowRight: [0, 1], ArrowUp: [-1, 0], ArrowDown: [1, 0] };
    if (!moves[ev.key]) return;
    ev.preventDefault();
    const nl = Math.min(LAYERS.length - 1, Math.max(0, li + moves[ev.key][0]));
    const nh = Math.min(H - 1, Math.max(0, h + moves[ev.key][1]));
    select(nl, nh, true);
  }
  function select(li, h, focus) {
    S.li = li; S.h = h;
    document.querySelectorAll(".thumb").forEach((b) => {
      const on = Number(b.dataset.li) === li && Number(b.dataset.head) === h;
      b.classList.toggle("active", on); b.tabIndex = on ? 0 : -1;
      b.setAttribute("aria-pressed", on ? "true" : "false");
    });
    if (focus) $("thumb-" + LAYERS[li] + "-" + h).focus();
    drawHead();
  }

  // ------------------------------------------------------------------ one head
  function headInfo() {
    const layer = LAYERS[S.li], st = style(layer, S.h);
    $("head-title").textContent = "Layer " + layer + ", head " + S.h;
    const box = $("head-info");
    box.textContent = "";
    const p = document.createElement("p");
    if (st.info) {
      p.innerHTML = '<span class="swatch" style="background:' + st.colour + '"></span>';
      p.appendChild(document.createTextNode("Label: " + st.info.label + (st.info.confidence ===
        null ? "" : " (confidence " + fmt(st.info.confidence) + ")")));
      box.appendChild(p);
      if (st.info.scores.length) {
        const ul = document.createElement("ul");
        st.info.scores.forEach((s) => { const li = document.createElement("li");
          li.textContent = s[0] + ": " + s[1].toFixed(3); ul.appendChild(li); });
        const cap = document.createElement("p"); cap.textContent = "Top taxonomy scores:";
        box.appendChild(cap); box.appendChild(ul);
      }
    } else {
      p.textContent = "No taxonomy label for this head.";
      box.appendChild(p);
    }
  }
  function buildTokens() {
    const T = D.texts[S.text];
    $("text-full").textContent = T.text || T.title;
    ["q", "k"].forEach((side) => {
      const col = $("col-" + side);
      col.textContent = "";
      T.tokens.forEach((tok, i) => {
        const b = document.createElement("button");
        b.className = "tok " + side; b.dataset.i = String(i);
        b.id = "tok-" + side + "-" + i;
        const lab = document.createElement("span"); lab.className = "lab";
        lab.textContent = shown(tok);
        const w = document.createElement("span"); w.className = "w";
        if (side === "q") { b.appendChild(w); b.appendChild(lab); }
        else { b.appendChild(lab); b.appendChild(w); }
        const dir = side === "q" ? "out" : "in";
        const pick = () => { S.sel = i; S.dir = dir; drawTokens(); };
        b.addEventListener("mouseenter", pick);
        b.addEventListener("focus", pick);
        b.addEventListener("click", pick);
        b.addEventListener("keydown", (ev) => tokenKey(ev, side, i));
        col.appendChild(b);
      });
    });
  }
  function tokenKey(ev, side, i) {
    const n = D.texts[S.text].tokens.length;
    let j = null, other = side;
    if (ev.key === "ArrowDown") j = Math.min(n - 1, i + 1);
    else if (ev.key === "ArrowUp") j = Math.max(0, i - 1);
    else if (ev.key === "ArrowLeft" || ev.key === "ArrowRight") { j = i;
      other = ev.key === "ArrowLeft" ? "q" : "k"; }
    if (j === null) return;
    ev.preventDefault();
    $("tok-" + other + "-" + j).focus();
  }
  function drawTokens() {
    const T = D.texts[S.text], n = T.tokens.length;
    if (S.sel >= n) S.sel = n - 1;
    const out = S.dir === "out";
    $("dir").textContent = out ? "Showing: where the chosen token attends (query \u2192 keys)."
      : "Showing: which tokens attend to the chosen token (queries \u2192 key).";
    const weights = [];
    for (let i = 0; i < n; i++) weights.push(out ? weight(S.text, S.li, S.h, S.sel, i)
      : weight(S.text, S.li, S.h, i, S.sel));
    const lit = out ? "k" : "q", chosen = out ? "q" : "k";
    for (let i = 0; i < n; i++) {
      const a = $("tok-" + lit + "-" + i), b = $("tok-" + chosen + "-" + i);
      a.classList.remove("chosen"); b.classList.toggle("chosen", i === S.sel);
      a.querySelector(".w").textContent = fmt(weights[i]);
      a.dataset.weight = String(weights[i]);
      a.style.background = "rgba(0,114,178," + weights[i].toFixed(3) + ")";
      a.style.color = weights[i] > 0.5 ? "#fff" : "";
      b.querySelector(".w").textContent = ""; delete b.dataset.weight;
      b.style.background = ""; b.style.color = "";
    }
    drawLines(weights, out);
    drawMatrix();
  }
  function drawLines(weights, out) {
    const svg = $("lines"), box = $("token-view").getBoundingClientRect();
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    svg.setAttribute("height", String($("token-view").scrollHeight));
    const mid = (el) => { const r = el.getBoundingClientRect();
      return r.top - box.top + $("token-view").scrollTop + r.height / 2; };
    const x1 = 0, x2 = svg.clientWidth || 120;
    const from = $("tok-" + (out ? "q" : "k") + "-" + S.sel);
    weights.forEach((w, i) => {
      if (w < 0.01) return;
      const other = $("tok-" + (out ? "k" : "q") + "-" + i);
      const l = document.createElementNS("http://www.w3.org/2000/svg", "line");
      const yq = out ? mid(from) : mid(other), yk = out ? mid(other) : mid(from);
      l.setAttribute("x1", String(x1)); l.setAttribute("y1", String(yq));
      l.setAttribute("x2", String(x2)); l.setAttribute("y2", String(yk));
      l.setAttribute("stroke", "#0072B2"); l.setAttribute("stroke-width", "2");
      l.setAttribute("stroke-opacity", w.toFixed(3));
      svg.appendChild(l);
    });
  }

  // ------------------------------------------------------------------ the matrix
  function drawMatrix() {
    const T = D.texts[S.text], n = T.tokens.length, cv = $("matrix");
    const cell = Math.max(5, Math.min(28, Math.floor(560 / n)));
    const label = (t) => { const s = shown(t); return s.length > 14 ? s.slice(0, 13) + "\u2026" : s; };
    const ctx = cv.getContext("2d"), font = Math.min(12, cell) + "px sans-serif";
    ctx.font = font;
    const pad = 8 + Math.ceil(Math.max(...T.tokens.map((t) => ctx.measureText(label(t)).width)));
    const dpr = window.devicePixelRatio || 1, size = pad + n * cell + 4;
    cv.width = size * dpr; cv.height = size * dpr;
    cv.style.width = size + "px"; cv.style.height = size + "px";
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, size, size);
    for (let q = 0; q < n; q++) for (let k = 0; k < n; k++) {
      ctx.fillStyle = viridis(weight(S.text, S.li, S.h, q, k));
      ctx.fillRect(pad + k * cell, pad + q * cell, cell, cell);
    }
    ctx.fillStyle = "#222"; ctx.font = font;
    ctx.textBaseline = "middle";
    for (let i = 0; i < n; i++) {
      ctx.textAlign = "right";
      ctx.fillText(label(T.tokens[i]), pad - 4, pad + i * cell + cell / 2);
      ctx.save(); ctx.translate(pad + i * cell + cell / 2, pad - 4); ctx.rotate(-Math.PI / 2);
      ctx.textAlign = "left"; ctx.fillText(label(T.tokens[i]), 0, 0); ctx.restore();
    }
    ctx.strokeStyle = "#D55E00"; ctx.lineWidth = 2;
    if (S.dir === "out") ctx.strokeRect(pad, pad + S.sel * cell, n * cell, cell);
    else ctx.strokeRect(pad + S.sel * cell, pad, cell, n * cell);
    cv.onmousemove = (ev) => {
      const r = cv.getBoundingClientRect();
      const k = Math.floor((ev.clientX - r.left - pad) / cell);
      const q = Math.floor((ev.clientY - r.top - pad) / cell);
      $("readout").textContent = (q >= 0 && k >= 0 && q < n && k < n) ?
        "query " + q + " " + JSON.stringify(T.tokens[q]) + " \u2192 key " + k + " " +
        JSON.stringify(T.tokens[k]) + ": " + fmt(weight(S.text, S.li, S.h, q, k)) : "";
    };
  }

  function drawHead() { headInfo(); drawTokens(); }
  function drawAll() { buildTokens(); drawThumbs(); select(S.li, S.h, false); }

  $("dir-toggle").addEventListener("click", () => {
    S.dir = S.dir === "out" ? "in" : "out"; drawTokens(); });
  header();
  buildGrid();
  drawAll();
  // when the page was ready, in ms since navigation started (read by bench/explorer.py)
  document.body.dataset.readyMs = String(Math.round(performance.now()));
  document.body.dataset.ready = "1";
})();
