"""GET /openapi.json (the document in ``openapi.yaml``, as JSON) and GET /docs (Redoc).

The document is data shipped in the package: ``terra/api/openapi.yaml``, read once when
the routes are added. /docs renders it with the vendored Redoc bundle in ``static/`` (no CDN):
the page's Content-Security-Policy keeps the browser on this server.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

import yaml
from aiohttp import web

from terra.api.respond import dumps

_PACKAGE = resources.files("terra.api")
BUNDLE = "redoc.standalone.js"

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>terra API</title>
<style>body { margin: 0; padding: 0; }</style>
</head>
<body>
<redoc spec-url="/openapi.json"></redoc>
<script src="/docs/redoc.standalone.js"></script>
</body>
</html>
"""
# Redoc styles inline and runs its search in a blob: worker; nothing loads from elsewhere
# (its footer logo, cdn.redoc.ly, is blocked and hides itself).
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; font-src 'self' data:"
)


def load_document() -> dict[str, Any]:
    """The OpenAPI document shipped in the package."""
    text = _PACKAGE.joinpath("openapi.yaml").read_text(encoding="utf-8")
    # libyaml's loader when PyYAML has it: the pure-Python one takes ~0.5 s for this file.
    document = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert isinstance(document, dict)
    return document


@functools.cache
def _document_json() -> bytes:
    """The document as JSON, parsed once per process (every app serves the same file)."""
    return dumps(load_document()).encode("utf-8")


def add_routes(app: web.Application) -> None:
    document = _document_json()
    bundle = _PACKAGE.joinpath("static", BUNDLE).read_bytes()

    async def openapi(request: web.Request) -> web.Response:
        return web.Response(body=document, content_type="application/json", charset="utf-8")

    async def docs(request: web.Request) -> web.Response:
        return web.Response(
            text=_PAGE,
            content_type="text/html",
            charset="utf-8",
            headers={"Content-Security-Policy": _CSP},
        )

    async def redoc(request: web.Request) -> web.Response:
        return web.Response(
            body=bundle,
            content_type="application/javascript",
            charset="utf-8",
            headers={"Cache-Control": "public, max-age=86400"},
        )

    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/docs", docs)
    app.router.add_get(f"/docs/{BUNDLE}", redoc)
