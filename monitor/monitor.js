// specedge monitor: fetch the server-rendered live part every refresh period and swap
// it in. The server escapes everything peers sent; nothing here builds markup.
(function () {
  "use strict";
  var live = document.getElementById("live");
  var conn = document.getElementById("conn");
  var period = Math.max(1, Number(live.getAttribute("data-refresh")) || 10) * 1000;

  function tick() {
    fetch("fragment", { cache: "no-store" })
      .then(function (r) {
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.text();
      })
      .then(function (text) {
        live.innerHTML = text;
        conn.textContent = "live";
        conn.className = "ok";
      })
      .catch(function () {
        conn.textContent = "monitor unreachable, retrying";
        conn.className = "bad";
      })
      .then(function () { setTimeout(tick, period); });
  }
  setTimeout(tick, period);
})();
