// What the captions page and the minutes viewer share: the conference of the page's own
// path (/live/{id}, /minutes/{id}/view), the viewer's token from its ?token= (passed on to
// every request the page makes), and one colour per speaker. An ES module both pages import.

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

export function hue(id) {
  if (!hues.has(id)) hues.set(id, Math.round((hues.size * 137.508 + 210) % 360));
  return hues.get(id);
}
