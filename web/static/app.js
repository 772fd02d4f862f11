// nekojump dashboard: copy buttons, confirmations, live tunnel refresh.
// Everything works without JavaScript too; this only makes it nicer.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  for (const button of document.querySelectorAll("button.copy")) {
    button.addEventListener("click", async () => {
      const text = document.getElementById(button.dataset.copy).innerText;
      try {
        await navigator.clipboard.writeText(text);
        button.textContent = "Copied";
      } catch (error) {
        const range = document.createRange();
        range.selectNodeContents(document.getElementById(button.dataset.copy));
        const selection = window.getSelection();
        selection.removeAllRanges();
        selection.addRange(range);
        button.textContent = /Mac|iPhone|iPad/.test(navigator.platform) ? "Selected — press ⌘C" : "Selected — press Ctrl-C";
      }
      setTimeout(() => { button.textContent = "Copy"; }, 2000);
    });
  }

  for (const form of document.querySelectorAll("form.confirm")) {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) {
        event.preventDefault();
      }
    });
  }

  const tunnels = document.getElementById("tunnels");
  const updated = document.getElementById("tunnels-updated");
  if (tunnels) {
    const BADGES = {
      "up": '<span class="badge ok">UP</span>',
      "held-by-other": '<span class="badge bad" title="another member\'s tunnel holds this port; it is not this service">HELD BY ANOTHER MEMBER</span>',
      "down": '<span class="badge">DOWN</span>',
    };
    // Registered Ports: each port's state as the server last said (UP while one of
    // your tunnels holds it, HELD BY ANOTHER MEMBER while someone else's does).
    const updatePortStates = () => {
      const states = new Map(Array.from(tunnels.querySelectorAll("#port-states [data-port]"),
                                        (span) => [span.dataset.port, span.dataset.state]));
      for (const cell of document.querySelectorAll(
        "#ports-table tr[data-port] .port-state, #admin-ports-table tr[data-port] .port-state")) {
        const state = states.get(cell.parentElement.dataset.port) || "down";
        if (cell.dataset.state !== state && BADGES[state]) {
          cell.dataset.state = state;
          cell.innerHTML = BADGES[state];
        }
      }
    };
    let shown = null;  // the last answer put in (the first one always is)
    const refresh = async () => {
      // An answer that never comes (a laptop woken on another network) must not
      // stop the refresh: give up on it after 5 s and try again.
      const abort = new AbortController();
      const timer = setTimeout(() => abort.abort(), 5000);
      let response, html;
      try {
        response = await fetch(tunnels.dataset.refresh,
                               {credentials: "same-origin", signal: abort.signal});
        html = response.ok ? await response.text() : "";
      } catch (error) {  // refused, cut off mid-answer, or given up on
        updated.textContent = "offline — retrying";
        setTimeout(refresh, 2000);
        return;
      } finally {
        clearTimeout(timer);
      }
      if (response.status === 401) {
        // Logged out (another tab) or the session expired: stop, and say so.
        // The link logs in back to this page (the server ignores pages it does not know).
        const again = document.createElement("a");
        again.href = "/login?next=" + encodeURIComponent(window.location.pathname);
        again.textContent = "log in again";
        updated.replaceChildren("session ended — ", again);
        return;
      }
      if (!response.ok) {
        updated.textContent = "refresh failed (" + response.status + ") — retrying";
        setTimeout(refresh, 2000);
        return;
      }
      if (html !== shown) {
        // Keep keyboard focus on the same row's button across the swap.
        const focused = tunnels.contains(document.activeElement)
          ? document.activeElement.closest("tr[data-port]") : null;
        tunnels.innerHTML = html;
        shown = html;
        if (focused) {
          // The same row's button, or the card itself if that tunnel ended.
          const again = tunnels.querySelector(
            'tr[data-port="' + focused.dataset.port + '"] button');
          (again || tunnels).focus();
        }
        updatePortStates();
      }
      updated.textContent = "updated " + new Date().toLocaleTimeString();
      setTimeout(refresh, 2000);  // one at a time: never an older answer after a newer
    };
    setTimeout(refresh, 2000);
  }
});
