// The live view: one websocket, one Summary per frame, redrawn on the next
// animation frame (a burst of Summaries costs one redraw).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(location.search);
  const asked = (params.get("symbol") || "").trim();
  const venueState = new Map();  // exchange -> {levels: signature, changedAt: ms}
  let latest = null, drawn = true, updates = 0, retryDelay = 1000, refused = false;

  function setStatus(text, live) {
    $("status").textContent = text;
    $("status").classList.toggle("live", !!live);
  }

  function showError(text) {
    $("error").textContent = text;
    $("error").hidden = !text;
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const query = asked ? "?symbol=" + encodeURIComponent(asked) : "";
    const socket = new WebSocket(scheme + "//" + location.host + "/ws" + query);
    socket.binaryType = "arraybuffer";
    socket.onmessage = (event) => {
      if (typeof event.data === "string") {
        const message = JSON.parse(event.data);
        if (message.error) {
          refused = !message.retry;
          showError(message.error);
          setStatus(message.retry ? "refused, retrying…" : "refused");
        } else if (message.symbol) {
          $("symbol").textContent = message.symbol;
          $("symbol-input").placeholder = message.symbol;
          document.title = message.symbol + " · aggregator";
          showError("");
          setStatus("live", true);
          retryDelay = 1000;
        }
        return;
      }
      latest = SummaryDecoder.decode(event.data);
      updates += 1;
      if (drawn) { drawn = false; requestAnimationFrame(draw); }
    };
    socket.onclose = () => {
      if (refused) return;
      setStatus("disconnected, reconnecting…");
      setTimeout(connect, retryDelay);
      retryDelay = Math.min(retryDelay * 2, 15000);
    };
  }

  function fmt(value) {
    if (!isFinite(value)) return "—";
    return value.toPrecision(8).replace(/(\.\d*?)0+$/, "$1").replace(/\.$/, "");
  }

  function row(level) {
    const tr = document.createElement("tr");
    tr.dataset.venue = level.exchange;
    tr.style.setProperty("--venue", "var(--" + level.exchange + ", var(--dim))");
    for (const [text, cls] of [[level.exchange, "venue"], [fmt(level.amount), "num amount"],
                               [fmt(level.price), "num price"]]) {
      const td = document.createElement("td");
      td.className = cls;
      td.textContent = text;
      tr.appendChild(td);
    }
    return tr;
  }

  function trackVenues(summary, now) {
    // The Summary says each venue's state; when its levels last moved is
    // what this page saw.
    const levels = new Map();
    for (const l of summary.bids.concat(summary.asks)) {
      levels.set(l.exchange, (levels.get(l.exchange) || "") + l.price + ":" + l.amount + ";");
    }
    for (const e of summary.exchanges) {
      const signature = levels.get(e.exchange) || "";
      const known = venueState.get(e.exchange);
      if (!known || known.levels !== signature) {
        venueState.set(e.exchange, { levels: signature, changedAt: now });
      }
    }
  }

  function drawVenues(summary, now) {
    const body = $("venues").tBodies[0];
    body.replaceChildren(...summary.exchanges.map((e) => {
      const tr = document.createElement("tr");
      const seen = venueState.get(e.exchange);
      const age = seen ? ((now - seen.changedAt) / 1000).toFixed(1) + " s ago" : "—";
      const cells = [[e.exchange, "venue"], [e.state, "state-" + e.state], [age, "num"], [e.reason, ""]];
      for (const [text, cls] of cells) {
        const td = document.createElement("td");
        td.className = cls;
        td.textContent = text;
        tr.appendChild(td);
      }
      tr.cells[0].style.color = "var(--" + e.exchange + ", var(--fg))";
      return tr;
    }));
  }

  function drawDepth(summary) {
    const canvas = $("depth"), g = canvas.getContext("2d");
    const w = canvas.width, h = canvas.height, pad = 28;
    g.clearRect(0, 0, w, h);
    const cumulate = (levels) => {
      let total = 0;
      return levels.map((l) => ({ price: l.price, total: (total += l.amount) }));
    };
    const bids = cumulate(summary.bids), asks = cumulate(summary.asks);
    const all = bids.concat(asks);
    if (!all.length) return;
    const lo = Math.min(...all.map((p) => p.price)), hi = Math.max(...all.map((p) => p.price));
    const top = Math.max(...all.map((p) => p.total));
    const x = (price) => pad + (hi === lo ? 0.5 : (price - lo) / (hi - lo)) * (w - 2 * pad);
    const y = (total) => h - pad - (total / top) * (h - 2 * pad);
    const style = getComputedStyle(document.documentElement);
    for (const [points, color] of [[bids, "--bid"], [asks, "--ask"]]) {
      if (!points.length) continue;
      g.beginPath();
      g.moveTo(x(points[0].price), y(0));
      let previous = 0;
      for (const p of points) { g.lineTo(x(p.price), y(previous)); g.lineTo(x(p.price), y(p.total)); previous = p.total; }
      g.lineTo(x(points[points.length - 1].price), y(0));
      g.closePath();
      const c = style.getPropertyValue(color).trim();
      g.fillStyle = c + "55"; g.strokeStyle = c;
      g.fill(); g.stroke();
    }
    g.fillStyle = style.getPropertyValue("--dim").trim();
    g.font = "12px monospace";
    g.fillText(fmt(lo), pad, h - 8);
    g.textAlign = "right"; g.fillText(fmt(hi), w - pad, h - 8);
    g.fillText("cumulative " + fmt(top), w - pad, 16);
    g.textAlign = "left";
  }

  function draw() {
    drawn = true;
    const summary = latest, now = Date.now();
    trackVenues(summary, now);
    $("asks").replaceChildren(...summary.asks.slice().reverse().map(row));
    $("bids").replaceChildren(...summary.bids.map(row));
    const spread = $("spread");
    spread.textContent = fmt(summary.spread) + (summary.spread < 0 ? " CROSSED" : "");
    spread.classList.toggle("crossed", summary.spread < 0);
    drawVenues(summary, now);
    drawDepth(summary);
    $("updates").textContent = updates;
  }

  setInterval(() => {
    // Ages keep counting between Summaries.
    if (!latest) return;
    const now = Date.now();
    $("age").textContent = ((now - latest.timestampUs / 1000) / 1000).toFixed(1) + " s";
    drawVenues(latest, now);
  }, 500);

  fetch("/symbols").then((r) => r.json()).then((listing) => {
    $("symbols").replaceChildren(...listing.symbols.map((s) => {
      const option = document.createElement("option");
      option.value = s;
      return option;
    }));
    if (!asked) $("symbol-input").placeholder = listing.default;
  }).catch(() => {});

  connect();
})();
