"""Uploads streamed to disk (terra/files/upload.py): whole or nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from terra.files.upload import UploadTooLarge, save_stream


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_the_chunks_land_whole_under_the_name(tmp_path: Path) -> None:
    target = tmp_path / "uploads" / "one"
    size = await save_stream(chunks(b"RIFF", b"\0" * 1000, b"end"), target, limit=1007)
    assert size == 1007
    assert target.read_bytes() == b"RIFF" + b"\0" * 1000 + b"end"
    assert names(target.parent) == ["one"]


async def test_too_large_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "one"
    with pytest.raises(UploadTooLarge):
        await save_stream(chunks(b"x" * 600, b"y" * 600), target, limit=1000, fsync=False)
    assert names(tmp_path) == []


async def test_a_client_that_goes_away_leaves_nothing(tmp_path: Path) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"half"
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await save_stream(broken(), tmp_path / "one", limit=1000)
    assert names(tmp_path) == []
