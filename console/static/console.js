// The console's only script (the Content-Security-Policy allows no other).
// The servers table follows the log through server-sent events, and the
// create form posts without leaving the page. Rows are built with
// textContent, never from HTML, so nothing from an event becomes markup.
"use strict";

(function () {
  const table = document.querySelector("table[data-live]");
  if (!table) return;
  const body = table.tBodies[0];
  const state = document.getElementById("live-state");
  const empty = document.getElementById("no-servers");
  const notice = document.getElementById("notice");
  const problem = document.getElementById("form-error");
  const base = table.dataset.base;
  const csrf = table.dataset.csrf;
  const COLUMNS = ["host", "addresses", "floating", "type", "size"];

  function cell(cls, text) {
    const td = document.createElement("td");
    td.className = cls;
    if (text !== undefined) td.textContent = text;
    return td;
  }

  function badge(status) {
    const span = document.createElement("span");
    span.className = "badge status-" + status.replace(/[^a-z-]/g, "");
    span.textContent = status;
    return span;
  }

  function build(s) {
    const tr = document.createElement("tr");
    tr.dataset.serverId = s.id;
    const name = cell("name");
    const link = document.createElement("a");
    link.href = base + encodeURIComponent(s.id);
    name.appendChild(link);
    tr.appendChild(name);
    tr.appendChild(cell("status"));
    for (const c of COLUMNS) tr.appendChild(cell(c));
    const actions = cell("actions");
    const form = document.createElement("form");
    form.method = "post";
    form.action = base + encodeURIComponent(s.id) + "/delete";
    const token = document.createElement("input");
    token.type = "hidden";
    token.name = "csrf";
    token.value = csrf;
    const button = document.createElement("button");
    button.type = "submit";
    button.className = "danger";
    button.textContent = "Delete";
    form.append(token, button);
    actions.appendChild(form);
    tr.appendChild(actions);
    return tr;
  }

  function find(id) {
    for (const tr of body.rows) if (tr.dataset.serverId === id) return tr;
    return null;
  }

  // A row as of log position s.seq: never over a newer one.
  function apply(s) {
    let row = find(s.id);
    if (row && Number(row.dataset.seq || 0) > s.seq) return;
    if (s.deleted) {
      if (row) row.remove();
    } else {
      if (!row) {
        row = build(s);
        body.appendChild(row);
      }
      row.dataset.seq = String(s.seq);
      row.querySelector("td.name a").textContent = s.name;
      row.querySelector("td.status").replaceChildren(badge(s.status));
      for (const c of COLUMNS) row.querySelector("td." + c).textContent = s[c];
    }
    if (empty) empty.hidden = body.rows.length > 0;
  }

  function show(text, ok) {
    if (!state) return;
    state.hidden = false;
    state.textContent = text;
    state.classList.toggle("off", !ok);
  }

  function say(el, text) {
    if (!el) return;
    el.textContent = text;
    el.hidden = !text;
  }

  const create = document.getElementById("create-server");
  if (create) {
    create.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      say(problem, "");
      let answer = null;
      let status = 0;
      try {
        const res = await fetch(create.action, {
          method: "POST",
          body: new FormData(create),
          headers: { Accept: "application/json" },
          credentials: "same-origin",
        });
        status = res.status;
        answer = await res.json();
      } catch (err) {
        answer = null;
      }
      if (answer && answer.row) {
        apply(answer.row);
        say(notice, "Server " + answer.row.name + " requested; its row follows the log below.");
        create.elements.namedItem("name").value = "";
      } else {
        say(problem, answer && answer.error ? answer.error : "the console refused the form (" + status + "); reload the page");
      }
    });
  }

  const events = new EventSource(table.dataset.live);
  events.addEventListener("open", () => show("live", true));
  events.addEventListener("error", () => show("reconnecting", false));
  events.addEventListener("server", (e) => apply(JSON.parse(e.data)));
  events.addEventListener("signin", () => {
    events.close();
    window.location.assign("/login?next=" + encodeURIComponent(window.location.pathname));
  });
})();
