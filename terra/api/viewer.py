"""Viewers: the conference event feed (Server-Sent Events), the transcript so far, the list
of active conferences, the captions page and the minutes viewer page.

Thin: check access, ask the feed hub (``terra/feed.py``), serialise. The pages are static
files shipped in ``terra/web/`` (no build step, no CDN); their scripts read the token from
the page's own ``?token=`` and pass it on to the feed and ``/minutes``.
"""

from __future__ import annotations

import asyncio
from importlib import resources

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from terra import keys
from terra.api.auth import require_operator, require_viewer
from terra.api.errors import NotFound
from terra.feed import FeedEvent
from terra.params import validate_id

# The files of terra/web/ that /assets/{name} serves, with their content types.
ASSETS = {
    "live.js": "text/javascript; charset=utf-8",
    "live.css": "text/css; charset=utf-8",
    "minutes.js": "text/javascript; charset=utf-8",
    "viewer.js": "text/javascript; charset=utf-8",
}
_PAGE = "text/html; charset=utf-8"
# The browser reconnects this soon after the feed closes (a viewer that fell behind).
RECONNECT_MS = 1000
# A viewer whose socket takes nothing for this long is dropped (aiohttp-sse aborts it).
SEND_TIMEOUT_S = 30.0


def _conference(request: web.Request) -> str:
    """The path's conference id, for a viewer allowed to see it, known to this server."""
    conference_id = validate_id("conference_id", request.match_info["conference_id"])
    require_viewer(request, conference_id)
    known = request.app[keys.FEED].get(conference_id) is not None
    if not known and not (request.app[keys.SPOOL].root / conference_id).is_dir():
        raise NotFound(f"conference {conference_id} is not known to this server")
    return conference_id


# -- the feed ------------------------------------------------------------------------------
async def events(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events of one conference. First a ``snapshot`` (participants, finals so
    far, each open combination's progress); then ``progress``, ``final``,
    ``participant_joined`` and ``participant_left``, each with its id. A client sending
    ``Last-Event-ID`` (or ``?last_event_id=``) gets only the events it missed when they are
    still kept, else a fresh snapshot. A viewer that falls ``feed.viewer_queue`` events
    behind is disconnected and resumes that way."""
    conference_id = _conference(request)
    hub = request.app[keys.FEED]
    last_event_id = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
    woken = asyncio.Event()
    batch_s = request.app[keys.CONFIG].feed.batch_ms / 1000

    def wake() -> None:
        woken.set()
        if viewer.overflowed and request.transport is not None:
            # Fell behind (its writes stalled while events queued up): cut it off now, not
            # after the send timeout. Its EventSource reconnects with Last-Event-ID.
            request.transport.abort()

    viewer, first = hub.attach(conference_id, last_event_id, wake)
    sse = EventSourceResponse(
        send_timeout=SEND_TIMEOUT_S,
        ping_interval=request.app[keys.CONFIG].feed.ping_s,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
    try:
        await sse.prepare(request)
        async with sse:  # on leaving: stop the pings and wait for them
            closed = asyncio.ensure_future(sse.wait())
            try:
                await sse.send("{}", event="hello", retry=RECONNECT_MS)
                await _send(request, sse, first)
                while not viewer.overflowed:
                    waiting = asyncio.ensure_future(woken.wait())
                    await asyncio.wait({waiting, closed}, return_when=asyncio.FIRST_COMPLETED)
                    waiting.cancel()
                    if closed.done():
                        break
                    woken.clear()
                    if batch_s > 0 and len(viewer) < viewer.half:
                        # Gather what else comes within batch_ms (or until the queue is
                        # half full) into the same write: a viewer costs per write.
                        try:
                            await asyncio.wait_for(woken.wait(), batch_s)
                        except TimeoutError:
                            pass
                        woken.clear()
                    if viewer.overflowed:
                        break
                    await _send(request, sse, viewer.take())
            finally:
                closed.cancel()
    except (ConnectionError, TimeoutError):
        pass  # the viewer went away, or stalled past the send timeout
    finally:
        hub.detach(conference_id, viewer)
    return sse


async def _send(request: web.Request, sse: EventSourceResponse, batch: list[FeedEvent]) -> None:
    """Write what is queued in one go (each event's frame was encoded once, by the hub); a
    socket that takes nothing for ``SEND_TIMEOUT_S`` is aborted."""
    if not batch:
        return
    try:
        async with asyncio.timeout(SEND_TIMEOUT_S):
            await sse.write(b"".join(event.frame for event in batch))
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()
        raise


async def transcript(request: web.Request) -> web.Response:
    """The conference's finals so far (as the feed's snapshot has them), JSON."""
    conference_id = _conference(request)
    feed = request.app[keys.FEED].get(conference_id)
    if feed is None:  # spooled, but not live since this server started
        return web.json_response(
            {"conference_id": conference_id, "participants": [], "finals": [], "finals_dropped": 0}
        )
    state = feed.snapshot()
    del state["progress"]
    return web.json_response(state)


async def conferences(request: web.Request) -> web.Response:
    """The conferences with a participant in session, for an operator (ingest token)."""
    require_operator(request)
    return web.json_response({"conferences": request.app[keys.FEED].conferences()})


# -- pages ---------------------------------------------------------------------------------
def _web_file(name: str) -> bytes:
    return resources.files("terra.web").joinpath(name).read_bytes()


async def live_page(request: web.Request) -> web.Response:
    """The captions page of a conference (HTML; its script follows the event feed)."""
    _conference(request)
    return web.Response(body=_web_file("live.html"), headers=_page_headers())


async def minutes_page(request: web.Request) -> web.Response:
    """The minutes viewer of a conference (HTML; its script polls ``GET /minutes``)."""
    _conference(request)
    return web.Response(body=_web_file("minutes.html"), headers=_page_headers())


async def asset(request: web.Request) -> web.Response:
    """A script or stylesheet of the pages (static, shipped in the package)."""
    name = request.match_info["name"]
    if name not in ASSETS:
        raise NotFound(f"no asset {name[:60]!r}")
    return web.Response(
        body=_web_file(name),
        headers={"Content-Type": ASSETS[name], "Cache-Control": "public, max-age=300"},
    )


def _page_headers() -> dict[str, str]:
    return {
        "Content-Type": _PAGE,
        "Cache-Control": "no-store",
        "Referrer-Policy": "no-referrer",  # the token is in the page's URL
        "Content-Security-Policy": "default-src 'self'; style-src 'self'; script-src 'self'",
    }


def add_routes(app: web.Application) -> None:
    app.router.add_get("/conferences", conferences)
    app.router.add_get("/conferences/{conference_id}/events", events)
    app.router.add_get("/conferences/{conference_id}/transcript", transcript)
    app.router.add_get("/live/{conference_id}", live_page)
    app.router.add_get("/minutes/{conference_id}/view", minutes_page)
    app.router.add_get("/assets/{name}", asset)
