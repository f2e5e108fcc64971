// edgefl dashboard: draws /events (the fleet's summary as JSON) with DOM text only.
"use strict";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

const show = (value, digits) =>
  value === null || value === undefined ? "-" : digits === undefined ? String(value) : Number(value).toFixed(digits);
const yes = (value, on, off) => (value === null || value === undefined ? "-" : value ? on : off);
const percent = (value) => (value === null || value === undefined ? "mains" : Math.round(value * 100) + "%");

function badge(value, on, off) {
  const cls = value === null || value === undefined ? "badge" : value ? "badge on" : "badge off";
  return el("span", { class: cls, "data-field": "online" }, yes(value, on, off));
}

function field(name, text) {
  return el("span", { class: "fig", "data-field": name }, text);
}

function deviceItem(d) {
  return el("li", { "data-device": d.id },
    el("span", { class: "name" }, d.id), " ", badge(d.online, "online", "offline"),
    field("eligible", d.eligible === false ? "not eligible (" + d.reason + ")" : yes(d.eligible, "eligible", "")),
    field("battery", "battery " + percent(d.battery)),
    field("link", show(d.link)),
    field("last_round", "last round " + show(d.last_round)));
}

function nodeItem(n) {
  const item = el("li", { "data-node": n.id },
    el("span", { class: "name" }, n.id), " ", el("span", { class: "role" }, n.role), " ",
    badge(n.online, "online", "offline"),
    field("round", "round " + show(n.round)),
    field("version", "v" + show(n.version)),
    field("accuracy", "accuracy " + show(n.accuracy, 3)));
  const below = [...n.children.map(nodeItem), ...n.devices.map(deviceItem)];
  if (below.length) item.append(el("ul", {}, ...below));
  return item;
}

function chart(points) {
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", "0 0 300 100");
  svg.setAttribute("preserveAspectRatio", "none");
  if (points.length) {
    const first = points[0][0], span = Math.max(1, points[points.length - 1][0] - first);
    const line = document.createElementNS(svg.namespaceURI, "polyline");
    // accuracy on a fixed 0..1 scale: a plateau draws flat, not as a collapse
    line.setAttribute("points", points.map(([v, a]) =>
      ((v - first) / span * 290 + 5).toFixed(1) + "," + (95 - a * 90).toFixed(1)).join(" "));
    svg.append(line);
  }
  return svg;
}

function rows(table, list) {
  table.tBodies[0].replaceChildren(...list.map((cells) =>
    el("tr", cells.attrs || {}, ...cells.values.map(([text, num]) => el("td", num ? { class: "num" } : {}, text)))));
}

function render(doc) {
  document.getElementById("tree").replaceChildren(...doc.tree.map(nodeItem));
  const devices = document.querySelectorAll("[data-device]");
  const online = [...devices].filter((d) => d.querySelector(".on")).length;
  const nodes = document.querySelectorAll("#tree [data-node]").length;
  document.getElementById("counts").textContent =
    "nodes: " + nodes + ", devices: " + devices.length + " (" + online + " online), messages: " + doc.messages;

  const accuracy = document.getElementById("accuracy");
  accuracy.replaceChildren(...Object.entries(doc.accuracy).map(([node, points]) => {
    const last = points.slice(-8);
    return el("div", { "data-node": node },
      el("h3", {}, node), chart(points),
      el("table", {}, el("tbody", {}, ...last.map(([v, a]) =>
        el("tr", { "data-version": v }, el("td", {}, "v" + v), el("td", { class: "num" }, show(a, 3)))))));
  }));

  rows(document.getElementById("participation"), Object.entries(doc.participation).map(([node, p]) => {
    const share = p.selected ? Math.min(1, p.participants / p.selected) : 1;
    const bar = el("div", { class: "bar" });
    bar.style.width = Math.round(share * 100) + "%";
    return { attrs: { "data-node": node },
      values: [[node], [show(p.round), 1], [show(p.participants), 1], [p.selected ? show(p.selected) : "open", 1], [bar]] };
  }));
  rows(document.getElementById("bytes"), Object.entries(doc.bytes).flatMap(([role, counters]) =>
    Object.entries(counters).map(([name, value]) =>
      ({ attrs: { "data-role": role, "data-counter": name }, values: [[role], [name], [show(value), 1]] }))));
  rows(document.getElementById("rejected"), Object.entries(doc.rejected).flatMap(([node, reasons]) =>
    Object.entries(reasons).map(([reason, count]) =>
      ({ attrs: { "data-node": node, "data-reason": reason }, values: [[node], [reason], [show(count), 1]] }))));
  rows(document.getElementById("clipping"), Object.entries(doc.clipping).map(([node, c]) =>
    ({ attrs: { "data-node": node }, values: [[node], [show(c.clipped), 1], [show(c.clip_bound, 3), 1]] })));
  document.body.dataset.messages = doc.messages;
}

function connect() {
  const status = document.getElementById("link");
  const events = new EventSource("/events");
  events.onopen = () => { status.textContent = "live"; status.className = "badge on"; };
  events.onerror = () => { status.textContent = "reconnecting"; status.className = "badge off"; };
  events.onmessage = (event) => render(JSON.parse(event.data));
}

connect();
