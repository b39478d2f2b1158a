"""A STAND-IN for a LibreTranslate server, on loopback, for the tests of the http backend.

It is not LibreTranslate: it speaks the same ``POST /translate`` shape (``q`` a string or
a list, ``source``, ``target``, ``api_key``; answer ``translatedText`` of the same shape,
errors as ``{"error": ...}``), "translates" from a small phrase book (anything else comes
back as ``<target> text``), records every request, and can be told to fail or be slow.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

PHRASES = {
    ("ru", "en"): {"первое предложение": "first sentence", "второе предложение": "second sentence"},
    ("en", "ru"): {"last sentence": "последнее предложение"},
}


def standin_translation(text: str, source: str, target: str) -> str:
    return PHRASES.get((source, target), {}).get(text, f"<{target}> {text}")


@dataclass
class LibreTranslateStandIn:
    requests: list[dict[str, Any]] = field(default_factory=list)
    # Statuses to answer with before answering normally, one per request.
    fail_with: list[int] = field(default_factory=list)
    delay_s: float = 0.0
    # Raw 200 bodies to answer with before answering normally, one per request (a broken
    # service's answers).
    answer_with: list[bytes] = field(default_factory=list)
    api_key: str = ""
    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    async def start(self) -> LibreTranslateStandIn:
        app = web.Application()
        app.router.add_post("/translate", self._translate)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        return self

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()

    async def _translate(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail_with:
            status = self.fail_with.pop(0)
            return web.json_response({"error": f"stand-in told to fail ({status})"}, status=status)
        if self.answer_with:
            return web.Response(body=self.answer_with.pop(0), content_type="application/json")
        if self.api_key and body.get("api_key") != self.api_key:
            return web.json_response({"error": "Invalid API key"}, status=403)
        q, source, target = body.get("q"), body.get("source"), body.get("target")
        if not isinstance(source, str) or not isinstance(target, str) or q is None:
            return web.json_response(
                {"error": "Invalid request: missing q, source or target"}, status=400
            )
        if isinstance(q, list):
            return web.json_response(
                {"translatedText": [standin_translation(t, source, target) for t in q]}
            )
        return web.json_response({"translatedText": standin_translation(q, source, target)})
