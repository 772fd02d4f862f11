// nekojump dashboard: copy buttons, confirmations, live tunnel refresh.
// Everything works without JavaScript too; this only makes it nicer.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  // Screen readers read what is put here (a polite live region in every page).
  const announcer = document.getElementById("announcer");
  const announce = (text) => {
    if (announcer) {
      announcer.textContent = text;
    }
  };

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
      announce(button.textContent);
      setTimeout(() => { button.textContent = "Copy"; }, 2000);
    });
  }

  // Back to a page kept in the browser's back/forward cache: show what is true
  // now, not what it said then (a key since removed, "Key saved").
  window.addEventListener("pageshow", (event) => {
    if (event.persisted) window.location.reload();
  });
  // "Key saved" and the like are said once: Back or reload later must not say it
  // again about something undone since.
  const address = new URL(window.location.href);
  const done = address.searchParams.get("done");
  if (done !== null) {
    address.searchParams.delete("done");
    window.history.replaceState(window.history.state, "", address);
  }

  // A public key pasted when the session had ended (or the page went away before
  // the answer) is put back after logging in, once, for the same member only: the
  // login page said nothing was changed, and the paste should not be lost with it.
  // Only a one-line public key is kept, never anything like a private key (the
  // server never echoes those either), and never over a form the server refused.
  const DRAFT = "nekojump-key-draft";
  const PUBLIC_KEY = /(^|\s)(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp(256|384|521)|sk-(ssh-ed25519|ecdsa-sha2-nistp256)@openssh\.com)\s+AAAA[A-Za-z0-9+\/]+={0,3}(\s|$)/;
  const PRIVATE = /PRIVATE KEY|PuTTY-User-Key-File-|Private-Lines:|Private-MAC:|b3BlbnNzaC1rZXktdjE/;
  const keyForm = document.querySelector("form.key-form");
  if (keyForm) {
    const text = keyForm.querySelector("#public_key");
    const description = keyForm.querySelector("#description");
    const member = keyForm.dataset.member;
    let draft = null;
    try {
      draft = JSON.parse(sessionStorage.getItem(DRAFT) || "null");
    } catch (error) {  // not ours to read: dropped below
    }
    sessionStorage.removeItem(DRAFT);
    if (draft && draft.member === member && done !== "key-added"
        && !document.getElementById("key-error") && !text.value.trim()) {
      text.value = draft.text;
      if (!description.value) description.value = draft.description;
      const details = keyForm.closest("details");
      if (details) details.open = true;
      announce("Your unsaved key is back in the form.");
    }
    keyForm.addEventListener("submit", () => {
      const pasted = text.value.trim();
      if (!pasted.includes("\n") && PUBLIC_KEY.test(pasted) && !PRIVATE.test(pasted)) {
        sessionStorage.setItem(DRAFT, JSON.stringify(
          {member, text: pasted, description: description.value}));
      }
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
    // Say a state of the refresh ("offline — retrying", "session ended") once,
    // not every two seconds; the "updated" time is only shown.
    let said = "";
    const status = (text, link) => {
      updated.replaceChildren(text, ...(link ? [link] : []));
      const whole = updated.textContent;
      if (whole !== said) {
        announce(whole);
        said = whole;
      }
    };
    // Keys removed since the page was made (in another tab, by an admin): marked
    // as removed, their Remove button disabled, and the page says to reload.
    const updateKeyStates = () => {
      const states = tunnels.querySelector("#key-states");
      const card = document.getElementById("ssh-key-card");
      if (!states || !card) return;
      const present = new Set(Array.from(states.querySelectorAll("[data-fingerprint]"),
                                         (span) => span.dataset.fingerprint));
      const rows = Array.from(card.querySelectorAll(".key-row"));
      let removed = 0;
      for (const row of rows) {
        const fingerprint = row.querySelector(".fingerprint");
        if (!fingerprint || present.has(fingerprint.textContent)) continue;
        removed += 1;
        if (row.classList.contains("removed")) continue;
        row.classList.add("removed");
        const mark = document.createElement("span");
        mark.className = "badge bad";
        mark.textContent = "REMOVED";
        fingerprint.after(" ", mark);
        for (const button of row.querySelectorAll("button")) button.disabled = true;
      }
      if (!removed || card.querySelector("#keys-changed")) return;
      if (removed === rows.length) {
        const badge = card.querySelector(".card-header .badge");
        if (badge) {
          badge.className = "badge";
          badge.textContent = "NOT CONFIGURED";
        }
      }
      const note = document.createElement("p");
      note.className = "notice";
      note.id = "keys-changed";
      note.setAttribute("role", "status");
      const reload = document.createElement("a");
      reload.href = window.location.pathname;
      reload.textContent = "Reload";
      note.append(removed === 1 ? "A key shown here was removed elsewhere (another tab or an admin). "
                                : "Keys shown here were removed elsewhere (another tab or an admin). ",
                  reload, " for the current page.");
      card.querySelector(".card-header").after(note);
      announce(note.textContent);
    };
    const livePorts = (root) => new Set(
      Array.from(root.querySelectorAll("tr[data-port]"), (row) => row.dataset.port));
    // The highest port a list shows when it is cut short (the admin's first 500):
    // ports past it may be up without being listed.
    const lastListed = (root, ports) =>
      root.querySelector("#tunnels-cut") ? Math.max(...Array.from(ports, Number)) : Infinity;
    // Tunnels that came up or ended since the last answer, said in words; of a
    // list cut short, only within what both answers list (a tunnel pushed past
    // the cut did not end).
    const announceChanges = (before, after, upTo) => {
      const news = [];
      for (const port of after) {
        if (!before.has(port) && Number(port) <= upTo) news.push("Tunnel on port " + port + " is up.");
      }
      for (const port of before) {
        if (!after.has(port) && Number(port) <= upTo) news.push("Tunnel on port " + port + " ended.");
      }
      if (news.length) announce(news.join(" "));
    };
    // Put a new answer in by changing only the cells that changed, when it has the
    // same rows: a focused button (and a screen reader's place) then survives a
    // refresh that only moved the counters.  False if the rows differ.
    const updateInPlace = (fresh) => {
      const rows = Array.from(tunnels.querySelectorAll("tr[data-port]"));
      const freshRows = Array.from(fresh.querySelectorAll("tr[data-port]"));
      if (!rows.length || rows.length !== freshRows.length
          || rows.some((row, i) => row.dataset.port !== freshRows[i].dataset.port)) {
        return false;
      }
      rows.forEach((row, i) => {
        Array.from(row.children).forEach((cell, j) => {
          const fromAnswer = freshRows[i].children[j];
          if (fromAnswer && cell.innerHTML !== fromAnswer.innerHTML) {
            cell.innerHTML = fromAnswer.innerHTML;
          }
        });
      });
      for (const id of ["#port-states", "#key-states"]) {
        const states = tunnels.querySelector(id);
        const freshStates = fresh.querySelector(id);
        if (states && freshStates) states.replaceWith(freshStates);
      }
      // "First 500 of N": N changes while the first rows stay the same.
      const cut = tunnels.querySelector("#tunnels-cut");
      const freshCut = fresh.querySelector("#tunnels-cut");
      if (cut && freshCut) cut.replaceWith(freshCut);
      else if (cut) cut.remove();
      else if (freshCut) tunnels.querySelector("table").after(freshCut);
      return true;
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
        status("offline — retrying");
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
        status("session ended — ", again);
        return;
      }
      if (!response.ok) {
        status("refresh failed (" + response.status + ") — retrying");
        setTimeout(refresh, 2000);
        return;
      }
      if (html !== shown) {
        const answer = document.createElement("template");
        answer.innerHTML = html;
        const before = livePorts(tunnels);
        const after = livePorts(answer.content);
        const upTo = Math.min(lastListed(tunnels, before), lastListed(answer.content, after));
        if (!updateInPlace(answer.content)) {
          // Rows came or went: swap the table, keeping keyboard focus on the same
          // row's button (or the card itself if that tunnel ended).
          const focused = tunnels.contains(document.activeElement)
            ? document.activeElement.closest("tr[data-port]") : null;
          tunnels.replaceChildren(answer.content);
          if (focused) {
            const again = tunnels.querySelector(
              'tr[data-port="' + focused.dataset.port + '"] button');
            (again || tunnels).focus();
          }
        }
        shown = html;
        announceChanges(before, after, upTo);
        updatePortStates();
        updateKeyStates();
      }
      said = "";
      updated.textContent = "updated " + new Date().toLocaleTimeString();
      setTimeout(refresh, 2000);  // one at a time: never an older answer after a newer
    };
    setTimeout(refresh, 2000);
  }
});
