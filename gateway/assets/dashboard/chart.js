// Bar charts in SVG, drawn by hand (no library, nothing from another origin).
// `Chart.bars(svg, points)`: points are {label, value}; one <rect class="bar">
// per point (zero days included), with a <title> giving the figure.
"use strict";
(function () {
  const NS = ["http:", "", "www.w3.org", "2000", "svg"].join("/");
  const W = 1000, H = 160, PAD_L = 56, PAD_B = 20, PAD_T = 8;

  function el(name, attrs, text) {
    const e = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    if (text !== undefined) e.textContent = String(text);
    return e;
  }

  function bars(svg, points) {
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.setAttribute("preserveAspectRatio", "none");
    const max = Math.max(1, ...points.map((p) => p.value));
    const plotW = W - PAD_L, plotH = H - PAD_B - PAD_T;
    const step = points.length ? plotW / points.length : plotW;
    svg.appendChild(el("line", { class: "axis", x1: PAD_L, y1: H - PAD_B, x2: W, y2: H - PAD_B }));
    svg.appendChild(el("text", { x: 2, y: PAD_T + 10 }, max.toLocaleString()));
    svg.appendChild(el("text", { x: 2, y: H - PAD_B }, "0"));
    points.forEach((p, i) => {
      const h = Math.round((p.value / max) * plotH);
      const rect = el("rect", {
        class: "bar",
        x: (PAD_L + i * step + step * 0.15).toFixed(1),
        y: H - PAD_B - h,
        width: Math.max(1, step * 0.7).toFixed(1),
        height: h,
        "data-value": p.value,
        "data-label": p.label,
      });
      rect.appendChild(el("title", {}, `${p.label}: ${p.value.toLocaleString()}`));
      svg.appendChild(rect);
      if (i === 0 || i === points.length - 1 || i % 7 === 0) {
        svg.appendChild(el("text", { x: (PAD_L + i * step).toFixed(1), y: H - 6 }, p.label.slice(5)));
      }
    });
  }

  window.Chart = { bars };
})();
