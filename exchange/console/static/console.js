// The console's small behaviours: status polling, the field chooser of the ask page and
// the live page's server-sent events. No framework; every page works without it too.

const POLL_MS = 1000;

function poll() {
  for (const el of document.querySelectorAll("[data-poll]")) {
    const url = el.dataset.poll;
    const shown = el.dataset.status;
    const tick = async () => {
      try {
        const response = await fetch(url, { credentials: "same-origin" });
        if (response.ok) {
          const data = await response.json();
          if (data.status !== shown) {
            window.location.reload();
            return;
          }
        }
      } catch (err) {
        // the node or the console is restarting: try again
      }
      window.setTimeout(tick, POLL_MS);
    };
    if (["open", "pending"].includes(shown)) window.setTimeout(tick, POLL_MS);
  }
}

function fieldChooser() {
  const select = document.getElementById("dataset");
  const boxes = document.getElementById("field-boxes");
  const hidden = document.getElementById("fields");
  if (!select || !boxes || !hidden) return;
  const sync = () => {
    hidden.value = [...boxes.querySelectorAll("input:checked")].map((b) => b.value).join(",");
  };
  const render = () => {
    const option = select.selectedOptions[0];
    boxes.replaceChildren();
    const chosen = new Set(hidden.value.split(",").filter(Boolean));
    for (const name of (option?.dataset.fields || "").split(",").filter(Boolean)) {
      const label = document.createElement("label");
      label.className = "check";
      const box = document.createElement("input");
      box.type = "checkbox";
      box.value = name;
      box.checked = chosen.has(name);
      box.addEventListener("change", sync);
      label.append(box, document.createTextNode(name));
      boxes.append(label);
    }
    sync();
  };
  select.addEventListener("change", () => { hidden.value = ""; render(); });
  render();
}

function live() {
  const rows = document.getElementById("live-rows");
  const state = document.getElementById("live-state");
  if (!rows || !state) return;
  const source = new EventSource("/live/events");
  source.addEventListener("open", () => { state.textContent = state.dataset.connected; });
  source.addEventListener("error", () => { state.textContent = state.dataset.lost; });
  source.addEventListener("message", (message) => {
    const event = JSON.parse(message.data);
    const tr = document.createElement("tr");
    tr.className = "live-event";
    const when = new Date(event.time_ms).toLocaleString(document.documentElement.lang,
      { timeZone: "Asia/Shanghai" });
    const details = Object.entries(event)
      .filter(([k]) => !["id", "event", "height", "time_ms", "tx", "case"].includes(k))
      .map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" ");
    for (const text of [event.height, when, event.event, event.case || "", details]) {
      const td = document.createElement("td");
      td.textContent = String(text);
      tr.append(td);
    }
    rows.prepend(tr);
  });
}

poll();
fieldChooser();
live();
