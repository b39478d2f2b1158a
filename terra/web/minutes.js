// The minutes viewer: asks GET /minutes/{id}?format=json (which queues a compile the first
// time), shows the compile's progress while it runs, then the phrases with a search box and
// download links for every format.
import { $, conferenceId, speakerChip, speakerLine, withToken } from "/assets/viewer.js";

(function () {
  const FORMATS = ["xml", "json", "srt", "vtt", "md"];
  let phrases = [];

  $("conference").textContent = conferenceId;
  document.title = "Minutes · " + conferenceId;

  function url(format) {
    return withToken("/minutes/" + encodeURIComponent(conferenceId), { format });
  }
  function offset(seconds) {
    const s = Math.floor(seconds), h = Math.floor(s / 3600), m = Math.floor(s / 60) % 60;
    const pad = (n) => String(n).padStart(2, "0");
    return (h ? h + ":" + pad(m) : m) + ":" + pad(s % 60);
  }
  function message(text) {
    $("message").textContent = text;
  }

  async function poll() {
    let response;
    try {
      response = await fetch(url("json"), { cache: "no-store" });
    } catch (e) {
      message("The server cannot be reached; trying again…");
      return setTimeout(poll, 3000);
    }
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      const detail = body && typeof body === "object" ? body.detail : body;
      message(response.status === 404 ? "Nothing was recorded for this conference." :
        "The minutes are not available: " + (detail || response.status));
      if (response.status >= 500 || response.status === 429) setTimeout(poll, 5000);
      return;
    }
    if (body.status === "queueplacing" || body.status === "running") {
      const progress = $("progress");
      progress.hidden = false;
      progress.value = body.progress || 0;
      message("Compiling the minutes… " + Math.round((body.progress || 0) * 100) + " %");
      return setTimeout(poll, 1000);
    }
    show(body);
  }

  function show(minutes) {
    $("state").hidden = true;
    const names = new Map(minutes.participants.map((p) => [p.id, p.name]));
    for (const p of minutes.participants) speakerChip(p.id).textContent = p.name || p.id;
    const summary = $("summary");
    summary.hidden = false;
    summary.textContent = minutes.start.replace("T", " ").slice(0, 19) + " – " +
      minutes.end.slice(11, 19) + " · " + offset(minutes.duration_s) + " · " +
      minutes.participants.length + " participants · " + minutes.phrases.length + " phrases";
    const items = document.createDocumentFragment();
    phrases = minutes.phrases.map((phrase) => {
      const text = document.createElement("div");
      text.className = "text";
      text.textContent = phrase.text;
      const { li, time, who } = speakerLine(phrase.participant_id, text);
      li.dataset.status = "final";
      time.textContent = offset(phrase.start_s);
      time.title = phrase.start;
      time.dateTime = phrase.start;
      who.textContent = phrase.speaker || names.get(phrase.participant_id) || phrase.participant_id;
      items.appendChild(li);
      return { li, text, plain: phrase.text, lower: phrase.text.toLowerCase() };
    });
    $("lines").appendChild(items);
    for (const format of FORMATS) {
      const a = document.createElement("a");
      a.href = url(format);
      a.download = conferenceId + "." + format;
      a.textContent = format;
      a.dataset.format = format;
      $("downloads").appendChild(a);
    }
    const search = $("search");
    search.disabled = false;
    search.addEventListener("input", () => filter(search.value.trim().toLowerCase()));
  }

  function filter(query) {
    for (const p of phrases) {
      const at = query ? p.lower.indexOf(query) : -1;
      p.li.classList.toggle("hidden", Boolean(query) && at < 0);
      if (at < 0) {
        p.text.textContent = p.plain;
        continue;
      }
      const mark = document.createElement("mark");
      mark.textContent = p.plain.slice(at, at + query.length);
      p.text.replaceChildren(p.plain.slice(0, at), mark, p.plain.slice(at + query.length));
    }
  }

  poll();
})();
