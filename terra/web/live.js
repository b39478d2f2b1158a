// The captions page: follows /conferences/{id}/events (Server-Sent Events) and renders only
// what changed: one list item per combination (keyed by its id), updated in place when its
// progress grows and when its final settles; DOM writes are batched per animation frame.
import { $, conferenceId, speakerChip, speakerLine, withToken } from "/assets/viewer.js";

(function () {
  const list = $("lines"), scroller = $("scroller"), status = $("status");
  const speakers = new Map(); // participant_id -> {name, chip, active}
  const lines = new Map(); // combination id -> {li, start}
  const pending = new Map(); // combination id -> latest payload not rendered yet
  let follow = true, scheduled = false, source = null, retryTimer = null;

  $("conference").textContent = conferenceId;
  document.title = "Live captions · " + conferenceId;

  function clock(seconds) {
    const d = new Date(seconds * 1000);
    return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
  }
  function setStatus(state, text) {
    status.dataset.state = state;
    status.textContent = text;
  }

  // -- speakers ------------------------------------------------------------------------
  function speaker(p) {
    let s = speakers.get(p.participant_id);
    if (!s) {
      s = { chip: speakerChip(p.participant_id), name: "", active: true };
      speakers.set(p.participant_id, s);
    }
    if (p.participant_name) s.name = p.participant_name;
    if (p.active !== undefined) s.active = p.active;
    s.chip.textContent = s.name || p.participant_id;
    s.chip.classList.toggle("left", !s.active);
    return s;
  }

  // -- lines ---------------------------------------------------------------------------
  function queue(elem) {
    pending.set(elem.id, elem);
    if (!scheduled) {
      scheduled = true;
      requestAnimationFrame(flush);
    }
  }
  function flush() {
    scheduled = false;
    for (const elem of pending.values()) render(elem);
    pending.clear();
    $("empty").hidden = lines.size > 0;
    if (follow) scroller.scrollTop = scroller.scrollHeight;
  }
  function render(elem) {
    let line = lines.get(elem.id);
    if (elem.status === "final" && !elem.text.trim()) {
      if (line) { line.li.remove(); lines.delete(elem.id); } // noise: no text after all
      return;
    }
    if (!line) line = create(elem);
    const li = line.li;
    li.dataset.status = elem.status;
    li.querySelector(".speaker").textContent = elem.participant_name || elem.participant_id;
    li.querySelector(".text").textContent = elem.text;
    const en = li.querySelector(".en");
    en.textContent = elem.translation && elem.translation !== elem.text ? elem.translation : "";
    if (elem.translation) $("english-toggle").hidden = false;
  }
  function create(elem) {
    const body = document.createElement("div");
    const text = document.createElement("div");
    text.className = "text";
    const en = document.createElement("div");
    en.className = "en";
    en.lang = "en";
    body.append(text, en);
    const { li, time } = speakerLine(elem.participant_id, body);
    li.dataset.id = elem.id;
    time.textContent = clock(elem.timestamp_float);
    time.dateTime = new Date(elem.timestamp_float * 1000).toISOString();
    // In time order: new lines almost always go last, so look from the end.
    const line = { li, start: elem.timestamp_float };
    let after = list.lastElementChild;
    while (after && lines.get(after.dataset.id).start > line.start) after = after.previousElementSibling;
    list.insertBefore(li, after ? after.nextElementSibling : list.firstElementChild);
    lines.set(elem.id, line);
    return line;
  }
  function reset(snapshot) {
    pending.clear();
    lines.clear();
    list.replaceChildren();
    speakers.clear();
    $("speakers").replaceChildren();
    for (const p of snapshot.participants) speaker(p);
    for (const elem of snapshot.finals) queue(elem);
    for (const elem of snapshot.progress) queue(elem);
    flush();
  }

  // -- the feed ------------------------------------------------------------------------
  function connect() {
    const path = "/conferences/" + encodeURIComponent(conferenceId) + "/events";
    source = new EventSource(withToken(path));
    source.addEventListener("open", () => setStatus("live", "live"));
    source.addEventListener("snapshot", (e) => reset(JSON.parse(e.data)));
    source.addEventListener("progress", (e) => queue(JSON.parse(e.data)));
    source.addEventListener("final", (e) => queue(JSON.parse(e.data)));
    source.addEventListener("participant_joined", (e) => speaker(JSON.parse(e.data)));
    source.addEventListener("participant_left", (e) => speaker(JSON.parse(e.data)));
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED) {
        // The browser gave up (an HTTP error such as 401): try again ourselves, slowly.
        setStatus("reconnecting", "disconnected, retrying…");
        clearTimeout(retryTimer);
        retryTimer = setTimeout(connect, 5000);
      } else {
        setStatus("reconnecting", "reconnecting…"); // it resumes with Last-Event-ID
      }
    });
  }

  // -- reading -------------------------------------------------------------------------
  scroller.addEventListener("scroll", () => {
    follow = scroller.scrollTop + scroller.clientHeight >= scroller.scrollHeight - 40;
    $("follow").hidden = follow;
  }, { passive: true });
  $("follow").addEventListener("click", () => {
    follow = true;
    $("follow").hidden = true;
    scroller.scrollTop = scroller.scrollHeight;
  });
  $("english").addEventListener("change", (e) => {
    document.body.classList.toggle("english", e.target.checked);
  });

  connect();
})();
