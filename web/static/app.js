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
        button.textContent = "Selected — press Ctrl-C";
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
    const refresh = async () => {
      try {
        const response = await fetch(tunnels.dataset.refresh, {credentials: "same-origin"});
        if (response.ok) {
          tunnels.innerHTML = await response.text();
          updated.textContent = "updated " + new Date().toLocaleTimeString();
          updatePortStates();
        }
      } catch (error) {
        updated.textContent = "offline";
      }
    };
    // Registered Ports: UP while one of your own tunnels holds the port. The table
    // lists only yours, so a port another member holds keeps the server's word.
    const updatePortStates = () => {
      const live = new Set(Array.from(tunnels.querySelectorAll("tr[data-port]"),
                                      (row) => row.dataset.port));
      for (const cell of document.querySelectorAll("#ports-table tr[data-port] .port-state")) {
        const up = live.has(cell.parentElement.dataset.port);
        if (!up && cell.dataset.state === "held-by-other") continue;
        cell.dataset.state = up ? "up" : "down";
        cell.innerHTML = up ? '<span class="badge ok">UP</span>' : '<span class="badge">DOWN</span>';
      }
    };
    setInterval(refresh, 2000);
  }
});
