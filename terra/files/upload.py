"""A request body streamed to disk: one chunk in memory at a time (aiofiles), written to a
temp file in the target folder, fsynced, renamed into place. Nothing is left behind when
the body is too large or the client goes away."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path

import aiofiles
import aiofiles.os
from aiohttp import StreamReader

from terra.spool import TEMP_PREFIX, fsync_dir, make_dirs

CHUNK_BYTES = 256 * 1024


class UploadTooLarge(Exception):
    """The body is longer than the limit."""


async def in_memory(data: bytes) -> AsyncIterator[bytes]:
    """Bytes already in memory (a decoded ``data:`` URI) as a stream of one chunk."""
    yield data


class UploadStalled(TimeoutError):
    """No byte of the body arrived for ``idle_s`` seconds."""


async def request_body(
    first: bytes, rest: StreamReader, idle_s: float | None = None
) -> AsyncIterator[bytes]:
    """A request body whose first chunk was read already (to refuse an empty one).
    With ``idle_s``, :class:`UploadStalled` when no byte arrives for that long (a large
    upload may take its time; a stalled one holds its connection no longer)."""
    yield first
    while True:
        try:
            async with asyncio.timeout(idle_s):
                chunk = await rest.read(CHUNK_BYTES)
        except TimeoutError as e:
            raise UploadStalled(f"no byte of the body arrived for {idle_s:g} s") from e
        if not chunk:
            return
        yield chunk


async def save_stream(
    chunks: AsyncIterable[bytes], path: Path, limit: int, *, fsync: bool = True
) -> int:
    """Write ``chunks`` to ``path`` atomically and return their size in bytes;
    :class:`UploadTooLarge` as soon as they pass ``limit``."""
    await asyncio.to_thread(make_dirs, path.parent, fsync)
    tmp = path.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex}")
    size = 0
    try:
        async with aiofiles.open(tmp, "wb") as f:
            async for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise UploadTooLarge(f"the body is larger than {limit} bytes")
                await f.write(chunk)
            await f.flush()
            if fsync:
                await aiofiles.os.wrap(os.fsync)(f.fileno())
        await aiofiles.os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            await aiofiles.os.remove(tmp)
        raise
    if fsync:
        await aiofiles.os.wrap(fsync_dir)(path.parent)
    return size
