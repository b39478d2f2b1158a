"""JSON answers, one way for every dialect: UTF-8 as it is (Cyrillic unescaped, as the specs'
examples are written)."""

from __future__ import annotations

import functools
import json
from typing import Any

from aiohttp import web

dumps = functools.partial(json.dumps, ensure_ascii=False)


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=dumps)
