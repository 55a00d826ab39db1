// The case graph: companies, persons and accounts as Cytoscape.js nodes (served by the
// console from the npm package, never from another site); click one for its rows.

const COLORS = { company: "#1f6feb", person: "#d97706", account: "#15803d" };

async function draw() {
  const el = document.getElementById("graph");
  if (!el) return;
  const response = await fetch(el.dataset.src, { credentials: "same-origin" });
  const data = await response.json();
  const elements = [];
  for (const n of data.nodes) {
    elements.push({ data: { id: n.id, label: n.key, kind: n.kind, root: data.roots.includes(n.id) } });
  }
  data.edges.forEach((e, i) => {
    elements.push({ data: { id: `e${i}`, source: e.from, target: e.to, label: e.relation } });
  });
  // eslint-disable-next-line no-undef
  const cy = cytoscape({
    container: el,
    elements,
    layout: { name: "cose", animate: false, padding: 30 },
    maxZoom: 2,
    minZoom: 0.2,
    style: [
      { selector: "node", style: { label: "data(label)", "font-size": 9, "background-color": "#888", "text-wrap": "wrap", "text-max-width": 120 } },
      ...Object.entries(COLORS).map(([kind, color]) => ({ selector: `node[kind = "${kind}"]`, style: { "background-color": color } })),
      { selector: "node[?root]", style: { "border-width": 3, "border-color": "#b91c1c" } },
      { selector: "edge", style: { width: 1.5, label: "data(label)", "font-size": 7, "curve-style": "bezier", "target-arrow-shape": "triangle" } },
    ],
  });
  el.dataset.ready = String(cy.nodes().length);
  window.caseGraph = cy; // for the browser tests and the curious
  const detail = document.getElementById("graph-detail");
  cy.on("tap", "node", (evt) => {
    const node = evt.target.data();
    detail.replaceChildren();
    const h = document.createElement("h3");
    h.textContent = `${node.kind}: ${node.label}`;
    detail.append(h);
    for (const hit of data.rows[node.label] || []) {
      const p = document.createElement("p");
      p.className = "mono small";
      const link = document.createElement("a");
      link.href = `/chain/tx/${hit.query}`; // the query whose answer established it
      link.textContent = `${hit.dataset} ${hit.query.slice(0, 16)}`;
      p.append(link, document.createTextNode(": " +
        Object.entries(hit.row).map(([k, v]) => `${k}=${v}`).join(", ")));
      detail.append(p);
    }
  });
}

window.addEventListener("load", draw);
