"""The OpenAPI document (terra/api/openapi.yaml): valid OpenAPI 3, one path for every route
the app registers and no path without its route, served at /openapi.json and rendered at /docs
with the bundle shipped in the package. No model: the app is built, or served with
tests/fakes.py's FakeEngine (these tests are about HTTP, not recognition)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from openapi_spec_validator import validate

from terra.api.docs import load_document
from terra.app import create_app
from tests.conftest import TOKEN, ServerFactory, make_config, post_fragment

METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def registered(app: web.Application) -> set[tuple[str, str]]:
    """(METHOD, path template) of every route; HEAD comes with each GET (aiohttp's allow_head)."""
    routes = set()
    for route in app.router.routes():
        if route.method == "HEAD" or route.resource is None:
            continue
        routes.add((route.method, route.resource.canonical))
    return routes


def documented(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in METHODS
    }


def undocumented(app: web.Application, document: dict[str, Any]) -> set[tuple[str, str]]:
    return registered(app) - documented(document)


def test_document_is_valid_openapi() -> None:
    document = load_document()
    validate(document)  # raises with the first error
    assert document["openapi"].startswith("3.")


def test_every_route_is_documented_and_every_path_registered(tmp_path: Path) -> None:
    app = create_app(make_config(tmp_path))
    document = load_document()
    assert undocumented(app, document) == set(), "routes missing from terra/api/openapi.yaml"
    assert documented(document) - registered(app) == set(), "documented paths with no route"


def test_a_new_route_without_documentation_is_caught(tmp_path: Path) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    app = create_app(make_config(tmp_path))
    app.router.add_get("/conferences/{conference_id}/secret", handler)
    assert undocumented(app, load_document()) == {("GET", "/conferences/{conference_id}/secret")}


def test_every_operation_documents_its_errors() -> None:
    """Each operation that takes a token names its 401, with the dialect's error shape."""
    document = load_document()
    shapes = {
        "/rest/v1/": "SaluteError",
        "/api/v1/": "Detail",
    }
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method not in METHODS or not operation.get("security"):
                continue
            assert "401" in operation["responses"], (method, path)
            response = operation["responses"]["401"]
            ref = response.get("$ref", "")
            name = ref.rsplit("/", 1)[-1]
            body = document["components"]["responses"][name] if ref else response
            schema = body["content"]["application/json"]["schema"]["$ref"]
            expected = next((s for p, s in shapes.items() if path.startswith(p)), "Detail")
            assert schema.endswith("/" + expected), (method, path, schema)


async def test_served_document_and_docs_page(make_fast_server: ServerFactory) -> None:
    client = await make_fast_server()
    response = await client.get("/openapi.json")
    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.json() == load_document()

    page = await client.get("/docs")
    assert page.status == 200
    assert page.content_type == "text/html"
    html = await page.text()
    assert 'spec-url="/openapi.json"' in html
    assert "http" not in html, "the page loads nothing from another origin"
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]

    bundle = await client.get("/docs/redoc.standalone.js")
    assert bundle.status == 200
    assert bundle.content_type == "application/javascript"
    body = await bundle.read()
    assert body.startswith(b"/*! For license information please see redoc.standalone.js")
    assert len(body) > 500_000


async def test_the_minutes_answers_match_exactly_one_documented_json_schema(
    make_fast_server: ServerFactory,
) -> None:
    """GET /minutes answers JSON of two kinds: a compile's state and the minutes
    (``format=json``), documented as ``oneOf``. MinutesJson required nothing, so every state
    answer matched both and broke the document's contract (schemathesis' response
    conformance: "valid under more than one of the schemas"). Each answer must match one."""
    import jsonschema

    document = load_document()
    schema = {
        **document["paths"]["/minutes/{conference_id}"]["get"]["responses"]["200"]["content"][
            "application/json"
        ]["schema"],
        "components": document["components"],
    }
    client = await make_fast_server()
    status, _ = await post_fragment(client, conference_id="conf-doc", online=False)
    assert status == 200
    answers: list[dict[str, Any]] = []
    deadline = time.monotonic() + 60
    while not answers or "version" not in answers[-1]:
        assert time.monotonic() < deadline, answers
        response = await client.get("/minutes/conf-doc", params={"token": TOKEN, "format": "json"})
        assert response.status == 200
        answers.append(await response.json())
        await asyncio.sleep(0.05)  # polling, as a client does: the compile runs meanwhile
    assert answers[0]["status"] == "queueplacing"
    for answer in answers:
        jsonschema.validate(answer, schema)
