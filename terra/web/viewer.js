// What the captions page and the minutes viewer share: the conference of the page's own
// path (/live/{id}, /minutes/{id}/view), the viewer's token from its ?token= (passed on to
// every request the page makes), and the speaker markup live.css draws, one colour per
// speaker. An ES module both pages import.

export const conferenceId = decodeURIComponent(location.pathname.split("/").filter(Boolean)[1] || "");
const token = new URLSearchParams(location.search).get("token") || "";
const hues = new Map(); // participant_id -> hue: the golden angle apart, in order of arrival

export const $ = (id) => document.getElementById(id);

// A path of this server with ``params`` and the page's token as its query.
export function withToken(path, params = {}) {
  const query = new URLSearchParams(params);
  if (token) query.set("token", token);
  const text = query.toString();
  return text ? path + "?" + text : path;
}

function hue(id) {
  if (!hues.has(id)) hues.set(id, Math.round((hues.size * 137.508 + 210) % 360));
  return hues.get(id);
}

// An element of a participant: it names them (data-participant) and carries their colour.
function ofParticipant(tag, className, participantId) {
  const element = document.createElement(tag);
  element.className = className;
  element.dataset.participant = participantId;
  element.style.setProperty("--hue", hue(participantId));
  return element;
}

// A participant's chip, added to the #speakers bar.
export function speakerChip(participantId) {
  const chip = ofParticipant("span", "chip", participantId);
  $("speakers").appendChild(chip);
  return chip;
}

// A line of the transcript in the participant's colour: its time, its speaker, then
// ``content`` (the page fills in the time and the speaker's name).
export function speakerLine(participantId, content) {
  const li = ofParticipant("li", "line", participantId);
  const time = document.createElement("time");
  const who = document.createElement("span");
  who.className = "speaker";
  li.append(time, who, content);
  return { li, time, who };
}
