"""The captions page and the minutes viewer in a real browser (Debian's chromium, driven by
playwright) while the real server with the real model is fed the shared English stand-up
meeting, three participants, through terra's own stream client.

Screenshots go to test-artifacts/ (kept by CI as artifacts); with TERRA_UPDATE_SCREENSHOTS=1
they also replace the README's docs/captions.png and docs/minutes-viewer.png.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from terra.streamclient import ParticipantSource, StreamSettings, stream_participants
from tests.conftest import ROOT, SPEECH, TOKEN, ServerFactory, normalise

pytestmark = [pytest.mark.model, pytest.mark.browser]

CHROMIUM = Path("/usr/bin/chromium")
HAVE_CHROMIUM = CHROMIUM.exists()
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MEETING = SPEECH / "meetings" / "standup_en"
PEOPLE = {"maria": "Maria", "peter": "Peter", "john": "John"}
VIEWER_TOKEN = "viewer-of-the-standup"
CONFERENCE = "standup-1"
ARTIFACTS = ROOT / "test-artifacts"
DOCS = ROOT / "docs"
WAIT_MS = 120_000


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    if not HAVE_CHROMIUM:
        pytest.fail("Debian's chromium is not installed (scripts/test installs it)")
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            await launched.close()


async def screenshot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    await page.screenshot(path=str(path))
    assert path.stat().st_size > 10_000  # a page was drawn, not a blank
    if os.environ.get("TERRA_UPDATE_SCREENSHOTS") == "1":
        DOCS.mkdir(exist_ok=True)
        shutil.copyfile(path, DOCS / name)


async def lines(page: Any) -> list[dict[str, str]]:
    result: list[dict[str, str]] = await page.eval_on_selector_all(
        "#lines li",
        """items => items.map(li => ({
            id: li.dataset.id || "", status: li.dataset.status,
            speaker: li.querySelector('.speaker').textContent,
            text: li.querySelector('.text').textContent}))""",
    )
    return result


async def test_captions_page_and_minutes_viewer(make_server: ServerFactory, browser: Any) -> None:
    client = await make_server(server={"tokens": [TOKEN], "viewer_tokens": [VIEWER_TOKEN]})
    base = f"http://127.0.0.1:{client.port}"
    live_url = f"{base}/live/{CONFERENCE}?token={VIEWER_TOKEN}"
    context = await browser.new_context(viewport={"width": 1200, "height": 760})
    page = await context.new_page()

    started = asyncio.Event()
    progress_seen: list[str] = []

    def on_elems(participant_id: str, elems: list[dict[str, Any]]) -> None:
        started.set()

    participants = [
        ParticipantSource(pid, name, MEETING / f"{pid}.flac") for pid, name in PEOPLE.items()
    ]
    streaming = asyncio.ensure_future(
        stream_participants(
            StreamSettings(
                url=base,
                conference_id=CONFERENCE,
                chunk_ms=2000,
                speed=2.0,
                token=TOKEN,
                lang="en",
                offline=True,
                tail_silence_ms=2000,
            ),
            participants,
            on_elems=on_elems,
        )
    )
    await asyncio.wait_for(started.wait(), 60)  # the conference is live: open the page
    await page.goto(live_url)
    await page.wait_for_selector('#status[data-state="live"]', timeout=WAIT_MS)
    # A progress line (grey) appears while someone talks...
    progress = await page.wait_for_selector('li.line[data-status="progress"]', timeout=WAIT_MS)
    assert progress is not None
    progress_seen.append(await progress.get_attribute("data-id") or "")
    finals = await streaming
    # ...and is replaced by its final (or dropped, when it settled as no text at all).
    await page.wait_for_function(
        """id => { const li = document.querySelector(`li[data-id="${id}"]`);
                   return !li || li.dataset.status === "final"; }""",
        arg=progress_seen[0],
        timeout=WAIT_MS,
    )

    expected = [
        (PEOPLE[pid], elem["id"], elem["text"])
        for pid, elems in finals.items()
        for elem in elems
        if elem["text"].strip()
    ]
    assert {name for name, _, _ in expected} == set(PEOPLE.values())
    # Every participant's every final is on the page, with the speaker's name.
    await page.wait_for_function(
        """ids => ids.every(id => {
               const li = document.querySelector(`li[data-id="${id}"]`);
               return li && li.dataset.status === "final"; })""",
        arg=[i for _, i, _ in expected],
        timeout=WAIT_MS,
    )
    shown = {line["id"]: line for line in await lines(page)}
    for name, combination, text in expected:
        assert shown[combination]["speaker"] == name
        assert shown[combination]["text"] == text
    assert not [line for line in shown.values() if line["status"] == "progress"]
    chips = await page.eval_on_selector_all("#speakers .chip", "cs => cs.map(c => c.textContent)")
    assert sorted(chips) == sorted(PEOPLE.values())
    await screenshot(page, "captions.png")

    # A second tab, opened after the meeting, gets the whole conference from the snapshot.
    late = await context.new_page()
    await late.goto(live_url)
    await late.wait_for_function(
        "n => document.querySelectorAll('#lines li').length >= n", arg=len(expected)
    )
    assert await lines(late) == await lines(page)

    # The minutes viewer: the compile's progress, then the phrases, search and downloads.
    minutes = await context.new_page()
    await minutes.goto(f"{base}/minutes/{CONFERENCE}/view?token={VIEWER_TOKEN}")
    await minutes.wait_for_selector("#lines li", timeout=WAIT_MS)
    phrases = await lines(minutes)
    assert {p["speaker"] for p in phrases} == set(PEOPLE.values())
    said = normalise(" ".join(p["text"] for p in phrases))
    for words in ("payment service", "new database", "mobile release", "same time"):
        assert words in said, words
    links = await minutes.eval_on_selector_all(
        "#downloads a", "as => as.map(a => [a.dataset.format, a.href])"
    )
    assert [f for f, _ in links] == ["xml", "json", "srt", "vtt", "md"]
    for fmt, href in links:
        response = await minutes.request.get(href)
        assert response.status == 200, (fmt, await response.text())
        body = await response.text()
        assert "database" in body.lower(), fmt
        if fmt in ("srt", "vtt"):
            assert "-->" in body
    await screenshot(minutes, "minutes-viewer.png")
    await minutes.fill("#search", "release")
    visible = await minutes.eval_on_selector_all(
        "#lines li:not(.hidden) .text", "ts => ts.map(t => t.textContent)"
    )
    assert visible and all("release" in v.lower() for v in visible)
    await context.close()
