/* precision_policy plan report: draws the overview or one cluster as SVG from the embedded data. No network. */
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("pp-data").textContent);
  var N = D.nodes, NN = N.name.length;
  var SVGNS = "http://www.w3.org/2000/svg";
  var canvas = document.getElementById("canvas");
  var side = document.getElementById("side");
  var crumb = document.getElementById("crumb");
  var back = document.getElementById("back");
  var search = document.getElementById("search");
  var hitsEl = document.getElementById("hits");
  var svg = document.createElementNS(SVGNS, "svg");
  svg.setAttribute("id", "graph");
  canvas.appendChild(svg);

  var byName = new Map();
  for (var i = 0; i < NN; i++) byName.set(N.name[i], i);
  var castsByEdge = new Map(), castsIn = [], castsOut = [];
  D.casts.forEach(function (c, ci) {
    (castsOut[c[0]] = castsOut[c[0]] || []).push(ci);
    c[5].forEach(function (k) {
      var key = c[0] + ">" + k;
      (castsByEdge.get(key) || castsByEdge.set(key, []).get(key)).push(ci);
      (castsIn[k] = castsIn[k] || []).push(ci);
    });
  });
  var audit = new Map(), ranges = new Map();
  if (D.audit) D.audit.rows.forEach(function (r) { if (r[0] >= 0) audit.set(r[0], r); });
  if (D.ranges) D.ranges.rows.forEach(function (r) { if (r[0] >= 0) ranges.set(r[0], r); });

  function esc(s) {
    return String(s == null ? "" : s).replace(/[&<>"']/g, function (ch) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[ch];
    });
  }
  function cut(s, n) { return s.length > n ? s.slice(0, n - 1) + "\u2026" : s; }
  function tail(s, n) { return s.length > n ? "\u2026" + s.slice(s.length - n + 1) : s; }
  function dt(k) { return D.dtypes[k]; }
  function color(k) { return D.colors[k]; }

  // ------------------------------------------------------------------ views
  var view = null, hits = null, selected = -1, box = { x: 0, y: 0, w: 100, h: 100 };
  var NW = D.sizes.node[0], NH = D.sizes.node[1], CW = D.sizes.cluster[0], CH = D.sizes.cluster[1];

  function nodeSvg(i, x, y) {
    var cls = "nd" + (audit.has(i) && audit.get(i)[6] ? " mis" : "");
    var title = N.name[i] + "\n" + N.op[i] + ": " + (dt(N.dt[i])) + (N.rule[i] ? "  [" + N.rule[i] + "]" : "") + "\n" + N.why[i] +
      (N.fol[i] && N.why[i].indexOf(N.fol[i]) < 0 ? "\nfollowed: " + N.fol[i] : "") + "\nin: " + N.ins[i].join(", ") + "  out: " + N.outs[i].join(", ");
    var s = '<g class="' + cls + '" data-node="' + i + '" data-name="' + esc(N.name[i]) + '" data-dtype="' + esc(dt(N.dt[i])) +
      '" transform="translate(' + (x - NW / 2) + "," + (y - NH / 2) + ')"><title>' + esc(title) + "</title>" +
      '<rect class="box" width="' + NW + '" height="' + NH + '" rx="4" fill="' + color(N.dt[i]) + '"></rect>' +
      '<text class="op" x="6" y="14">' + esc(cut(N.op[i], 22)) + "</text>" +
      '<text x="6" y="29">' + esc(tail(N.name[i], 24)) + "</text>";
    var r = ranges.get(i);
    if (r && (r[5] > 0 || r[4] > 0)) {
      var fill = r[5] > 0 ? "#d62728" : "#e0a800";
      s += '<g transform="translate(' + (NW - 9) + ',-6)"><circle r="8" fill="' + fill + '"></circle><text class="badge" x="-3" y="4">!</text></g>';
    }
    if ((castsOut[i] || []).some(function (ci) { return D.casts[ci][6]; })) {
      s += '<path d="M' + (NW / 2 - 6) + "," + NH + "l6,7l6,-7" + '" fill="#d62728"></path>';
    }
    return s + "</g>";
  }

  function clusterSvg(k, x, y) {
    var c = D.clusters[k], m = c[2], counts = {}, mis = false;
    for (var j = 0; j < m.length; j++) {
      counts[N.dt[m[j]]] = (counts[N.dt[m[j]]] || 0) + 1;
      if (audit.has(m[j]) && audit.get(m[j])[6]) mis = true;
    }
    var rep = D.templates[c[3]].n > 1 ? " \u00b7 \u00d7" + D.templates[c[3]].n + " identical" : "";
    var title = c[0] + " (" + m.length + " ops" + rep + ")\n" + Object.keys(counts).map(function (d) { return dt(+d) + ": " + counts[d]; }).join(", ") + "\nclick to open";
    var s = '<g class="cl' + (mis ? " mis" : "") + '" data-cluster="' + k + '" transform="translate(' + (x - CW / 2) + "," + (y - CH / 2) + ')"><title>' + esc(title) + "</title>";
    if (c[1] === "block") s += '<rect class="stack" x="5" y="-5" width="' + CW + '" height="' + CH + '" rx="6"></rect>';
    s += '<rect class="frame" width="' + CW + '" height="' + CH + '" rx="6"></rect>' +
      '<text class="lbl" x="8" y="16">' + esc(tail(c[0], 30)) + "</text>" +
      '<text x="8" y="31">' + m.length + " ops" + esc(rep) + "</text>";
    var bx = 8, bw = CW - 16;
    Object.keys(counts).sort(function (a, b) { return counts[b] - counts[a]; }).forEach(function (d) {
      var w = bw * counts[d] / m.length;
      s += '<rect x="' + bx.toFixed(1) + '" y="' + (CH - 18) + '" width="' + w.toFixed(1) + '" height="10" fill="' + color(+d) + '"></rect>';
      bx += w;
    });
    return s + '<text class="hitn" x="' + (CW - 8) + '" y="16" text-anchor="end"></text></g>';
  }

  function edgeSvg(d, casts) {
    if (casts && casts.length) {
      var t = casts.map(function (ci) { var c = D.casts[ci]; return "cast " + N.name[c[0]] + ":" + c[1] + " " + c[2] + " \u2192 " + c[3] + " (" + c[4] + ")"; });
      return '<path class="e cast" d="' + d + '" marker-end="url(#arrc)"><title>' + esc(t.join("\n")) + "</title></path>";
    }
    return '<path class="e" d="' + d + '" marker-end="url(#arr)"></path>';
  }

  var DEFS = '<defs><marker id="arr" viewBox="0 0 10 10" refX="9" refY="5" markerUnits="userSpaceOnUse" markerWidth="9" markerHeight="9" orient="auto"><path d="M0,0L10,5L0,10z" fill="#8a8a8a"></path></marker>' +
    '<marker id="arrc" viewBox="0 0 10 10" refX="9" refY="5" markerUnits="userSpaceOnUse" markerWidth="9" markerHeight="9" orient="auto"><path d="M0,0L10,5L0,10z" fill="#d62728"></path></marker></defs>';

  function show(v) {
    view = v;
    var parts = [DEFS, '<g id="edges">'], L, k;
    if (v.cluster < 0) {
      L = D.overview;
      L.edges.forEach(function (e) { parts.push(edgeSvg(e[2], e[3])); });
      parts.push('</g><g id="nodes">');
      L.items.forEach(function (it) { parts.push(it[0] ? clusterSvg(it[1], it[2], it[3]) : nodeSvg(it[1], it[2], it[3])); });
      crumb.textContent = "Overview" + (D.clusters.length ? " (" + D.clusters.length + " clusters; click one to open it)" : "");
      back.disabled = true;
    } else {
      var c = D.clusters[v.cluster], m = c[2];
      L = D.templates[c[3]];
      L.edges.forEach(function (e) { parts.push(edgeSvg(e[2], castsByEdge.get(m[e[0]] + ">" + m[e[1]]))); });
      parts.push('</g><g id="nodes">');
      for (k = 0; k < m.length; k++) parts.push(nodeSvg(m[k], L.pos[k][0], L.pos[k][1]));
      crumb.textContent = "Overview \u203a " + c[0] + " (" + m.length + " ops)";
      back.disabled = false;
    }
    parts.push("</g>");
    svg.innerHTML = parts.join("");
    v.w = L.w; v.h = L.h;
    fit();
    paintHits();
    if (selected >= 0) mark(selected);
  }

  // ------------------------------------------------------------------ pan and zoom
  function apply() { svg.setAttribute("viewBox", box.x + " " + box.y + " " + box.w + " " + box.h); }
  function fit() {
    var r = canvas.getBoundingClientRect(), cw = r.width || 800, ch = r.height || 500;
    // the whole drawing, unless that makes boxes unreadably small: then the top of it at 0.3
    var s = Math.max(Math.min(cw / view.w, ch / view.h, 1.5), Math.min(0.3, cw / view.w));
    box = { w: cw / s, h: ch / s, x: 0, y: 0 };
    box.x = (view.w - box.w) / 2; box.y = (view.h - box.h) / 2;
    if (view.h * s > ch) box.y = 0;
    apply();
  }
  function zoom(f, cx, cy) {
    var nw = box.w * f, nh = box.h * f;
    box.x = cx - (cx - box.x) * f; box.y = cy - (cy - box.y) * f; box.w = nw; box.h = nh;
    apply();
  }
  function toGraph(ev) {
    var r = svg.getBoundingClientRect();
    return [box.x + (ev.clientX - r.left) / r.width * box.w, box.y + (ev.clientY - r.top) / r.height * box.h];
  }
  svg.addEventListener("wheel", function (ev) {
    ev.preventDefault();
    var p = toGraph(ev);
    zoom(ev.deltaY > 0 ? 1.15 : 1 / 1.15, p[0], p[1]);
  }, { passive: false });
  var drag = null;
  svg.addEventListener("mousedown", function (ev) { drag = { x: ev.clientX, y: ev.clientY, bx: box.x, by: box.y, moved: false }; });
  window.addEventListener("mousemove", function (ev) {
    if (!drag) return;
    var r = svg.getBoundingClientRect(), dx = ev.clientX - drag.x, dy = ev.clientY - drag.y;
    if (Math.abs(dx) + Math.abs(dy) > 3) { drag.moved = true; svg.classList.add("dragging"); }
    box.x = drag.bx - dx / r.width * box.w; box.y = drag.by - dy / r.height * box.h;
    apply();
  });
  window.addEventListener("mouseup", function () { setTimeout(function () { drag = null; }, 0); svg.classList.remove("dragging"); });
  document.getElementById("fit").onclick = function () { fit(); };
  document.getElementById("zin").onclick = function () { zoom(1 / 1.4, box.x + box.w / 2, box.y + box.h / 2); };
  document.getElementById("zout").onclick = function () { zoom(1.4, box.x + box.w / 2, box.y + box.h / 2); };
  back.onclick = function () { show({ cluster: -1 }); };

  svg.addEventListener("click", function (ev) {
    if (drag && drag.moved) return;
    var g = ev.target.closest("g.nd, g.cl");
    if (!g) return;
    if (g.classList.contains("cl")) { openCluster(+g.getAttribute("data-cluster")); return; }
    select(+g.getAttribute("data-node"), false);
  });

  function openCluster(k) {
    show({ cluster: k });
    var c = D.clusters[k];
    side.innerHTML = "<h2>" + esc(c[0]) + "</h2><p>" + c[2].length + " ops, " + esc(c[1] === "block" ? "a repeated block" : c[1] === "scope" ? "a name scope" : "a run of graph order") +
      (D.templates[c[3]].n > 1 ? "; " + D.templates[c[3]].n + " identical instances share this layout" : "") + ".</p><p class=\"note\">Click an op for its decision; Back returns to the overview.</p>";
  }

  // ------------------------------------------------------------------ details
  function nodeLink(name) {
    return byName.has(name) ? '<a class="link" data-goto="' + esc(name) + '">' + esc(name) + "</a>" : esc(name);
  }
  function castText(ci) {
    var c = D.casts[ci];
    return esc(N.name[c[0]] + ":" + c[1] + " " + c[2] + " \u2192 " + c[3]) + " <span class=\"note\">(" + esc(c[4]) + (c[6] ? ", for fetch" : "") + ", " + c[5].length + " consumer(s))</span>";
  }
  function details(i) {
    var h = "<h2>" + esc(N.name[i]) + "</h2><dl>" +
      "<dt>op type</dt><dd>" + esc(N.op[i]) + "</dd>" +
      "<dt>computes in</dt><dd><span class=\"sw\" style=\"display:inline-block;width:11px;height:11px;background:" + color(N.dt[i]) + ";border:1px solid #777\"></span> " + esc(dt(N.dt[i])) + "</dd>" +
      "<dt>origin</dt><dd>" + esc(dt(N.or[i])) + "</dd>" +
      "<dt>rule</dt><dd>" + esc(N.rule[i] || "-") + "</dd>" +
      "<dt>followed</dt><dd>" + (N.fol[i] ? nodeLink(N.fol[i]) : "-") + "</dd>" +
      "<dt>reason</dt><dd>" + esc(N.why[i]) + "</dd>" +
      "<dt>input dtypes</dt><dd>" + esc(N.ins[i].join(", ") || "-") + "</dd>" +
      "<dt>output dtypes</dt><dd>" + esc(N.outs[i].join(", ") || "-") + "</dd>";
    if (castsIn[i]) h += "<dt>casts in</dt><dd>" + castsIn[i].map(castText).join("<br>") + "</dd>";
    if (castsOut[i]) h += "<dt>casts out</dt><dd>" + castsOut[i].map(castText).join("<br>") + "</dd>";
    var a = audit.get(i);
    if (a) h += "<dt>audit</dt><dd>planned " + esc(a[3] || "-") + ", executed " + esc(a[4] || "-") + (a[5] ? " (" + esc(a[5]) + ")" : "") +
      (a[6] ? '<br><span class="bad">' + esc(a[6]) + "</span>" : " \u2014 as planned") + "</dd>";
    var r = ranges.get(i);
    if (r) h += "<dt>range</dt><dd>max |x| " + esc(r[7]) + " (" + esc(r[3]) + "); below min normal " + (100 * r[4]).toPrecision(3) + "%; above max " +
      (100 * r[5]).toPrecision(3) + "%" + (r[6] ? "<br>" + esc(r[6]) : "") + "</dd>";
    if (N.cl[i] >= 0) h += "<dt>cluster</dt><dd>" + esc(D.clusters[N.cl[i]][0]) + "</dd>";
    return h + "</dl>";
  }
  side.addEventListener("click", function (ev) {
    var a = ev.target.closest("[data-goto]");
    if (a) reveal(a.getAttribute("data-goto"));
  });
  function mark(i) {
    var old = svg.querySelector("g.nd.sel");
    if (old) old.classList.remove("sel");
    var g = svg.querySelector('g.nd[data-node="' + i + '"]');
    if (g) g.classList.add("sel");
    return g;
  }
  function select(i, center) {
    selected = i;
    side.innerHTML = details(i);
    var g = mark(i);
    if (g && center) {
      var t = g.transform.baseVal.consolidate().matrix, r = canvas.getBoundingClientRect();
      box.w = r.width || 800; box.h = r.height || 500;
      box.x = t.e + NW / 2 - box.w / 2; box.y = t.f + NH / 2 - box.h / 2;
      apply();
    }
  }
  function reveal(name) {
    var i = byName.get(name);
    if (i === undefined) { side.innerHTML = "<p>No node named <b>" + esc(name) + "</b>.</p>"; return false; }
    var k = N.cl[i];
    if ((k < 0 && view.cluster >= 0) || (k >= 0 && view.cluster !== k)) show({ cluster: k });
    select(i, true);
    return true;
  }
  window.ppReveal = reveal;

  // ------------------------------------------------------------------ search
  function runSearch(q) {
    q = q.trim().toLowerCase();
    if (!q) { hits = null; hitsEl.textContent = ""; paintHits(); return; }
    hits = new Set();
    for (var i = 0; i < NN; i++) {
      if (N.lname[i].indexOf(q) >= 0 || N.lop[i].indexOf(q) >= 0) hits.add(i);
    }
    hitsEl.textContent = hits.size + " match" + (hits.size === 1 ? "" : "es");
    var list = Array.from(hits).slice(0, 200);
    side.innerHTML = "<h2>" + hits.size + " node(s) match \u201c" + esc(q) + "\u201d</h2><div class=\"results\">" +
      list.map(function (i) { return '<a data-goto="' + esc(N.name[i]) + '">' + esc(N.name[i]) + ' <span class="note">' + esc(N.op[i]) + " \u00b7 " + esc(dt(N.dt[i])) + "</span></a>"; }).join("") +
      (hits.size > list.length ? '<p class="note">\u2026 ' + (hits.size - list.length) + " more</p>" : "") + "</div>";
    paintHits();
  }
  function paintHits() {
    svg.querySelectorAll("g.nd").forEach(function (g) {
      var on = hits && hits.has(+g.getAttribute("data-node"));
      g.classList.toggle("hit", !!on);
      g.classList.toggle("dim", !!hits && !on);
    });
    svg.querySelectorAll("g.cl").forEach(function (g) {
      var c = D.clusters[+g.getAttribute("data-cluster")], n = 0;
      if (hits) c[2].forEach(function (i) { if (hits.has(i)) n++; });
      g.classList.toggle("hit", n > 0);
      g.classList.toggle("dim", !!hits && n === 0);
      g.querySelector("text.hitn").textContent = n ? n + " match" + (n > 1 ? "es" : "") : "";
    });
  }
  var timer = 0;
  search.addEventListener("input", function () { clearTimeout(timer); timer = setTimeout(function () { runSearch(search.value); }, 120); });
  search.addEventListener("keydown", function (ev) {
    if (ev.key === "Enter" && hits && hits.size) reveal(N.name[hits.values().next().value]);
  });
  document.querySelectorAll("tr.op-row").forEach(function (tr) {
    tr.onclick = function () { search.value = tr.getAttribute("data-op"); runSearch(search.value); window.scrollTo(0, 0); };
  });
  document.querySelectorAll("[data-goto]").forEach(function (el) {
    if (side.contains(el)) return;
    el.style.cursor = "pointer";
    el.onclick = function () { reveal(el.getAttribute("data-goto")); window.scrollTo(0, 0); };
  });

  N.lname = N.name.map(function (s) { return s.toLowerCase(); });
  N.lop = N.op.map(function (s) { return s.toLowerCase(); });
  show({ cluster: -1 });
  function fromHash() {
    var h = decodeURIComponent(location.hash.slice(1));
    if (h.indexOf("node=") === 0) reveal(h.slice(5));
    else if (h.indexOf("q=") === 0) { search.value = h.slice(2); runSearch(h.slice(2)); }
  }
  window.addEventListener("hashchange", fromHash);
  fromHash();
  document.body.setAttribute("data-ready", "1");
})();
