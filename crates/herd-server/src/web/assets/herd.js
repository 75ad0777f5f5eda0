// herd's whole script: live regions and confirmations. Pages work without it.
"use strict";

// A live region names its stream; each message is the region's new HTML, rendered and
// escaped by the server.
function live(region) {
  const source = new EventSource(region.dataset.live);
  source.onmessage = (event) => {
    region.innerHTML = event.data;
    region.dataset.updated = String(Date.now());
  };
  source.onerror = () => {
    // The browser reconnects on its own; a page whose session ended goes to the login.
    if (source.readyState === EventSource.CLOSED) {
      region.classList.add("stale");
    }
  };
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-live]").forEach(live);
});

// Forms that lose work ask first.
document.addEventListener("submit", (event) => {
  const question = event.target.dataset.confirm;
  if (question && !window.confirm(question)) {
    event.preventDefault();
  }
});
