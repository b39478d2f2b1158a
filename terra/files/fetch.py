"""Fetching audio a client names by URL, and posting webhooks, without becoming an SSRF proxy.

Only ``http``/``https``; every address a host resolves to (and every IP literal, and every
redirect hop) must be public unless the configured allow-list admits it; bodies are capped
in size and requests in time. ``data:`` URIs are decoded here too.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import socket
from collections.abc import Sequence
from urllib.parse import unquote_to_bytes

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

MAX_REDIRECTS = 3

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


async def read_at_most(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, or its first ``limit + 1`` bytes when it is longer (the caller refuses it):
    what another server answers never costs more memory than that."""
    data = await response.content.read(limit + 1)
    while len(data) <= limit and (more := await response.content.read(limit + 1 - len(data))):
        data += more
    return data


class FetchError(RuntimeError):
    """The audio could not be had; the message says why, for the client."""


def parse_networks(allow: Sequence[str]) -> tuple[Network, ...]:
    """``127.0.0.1``, ``10.0.0.0/8``, ``::1`` … as networks (a ValueError names a bad one)."""
    return tuple(ipaddress.ip_network(item.strip(), strict=False) for item in allow if item.strip())


def check_address(address: str, allow: Sequence[Network]) -> None:
    """Refuse private, loopback, link-local, multicast and reserved addresses not allowed."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in network for network in allow):
        return
    if not ip.is_global or ip.is_multicast or ip.is_reserved or ip.is_unspecified:
        raise FetchError(f"the address {ip} is not public: refused")


class GuardedResolver(AbstractResolver):
    """The default resolver, refusing any answer that :func:`check_address` refuses."""

    def __init__(self, allow: Sequence[Network]) -> None:
        self._inner = DefaultResolver()
        self._allow = tuple(allow)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            check_address(result["host"], self._allow)
        return results

    async def close(self) -> None:
        await self._inner.close()


_NUMERIC_LABEL = re.compile(r"[0-9]+|0[xX][0-9a-fA-F]*")
_CANONICAL_IPV4 = re.compile(r"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}")


def ends_in_a_number(host: str) -> bool:
    """Whether a URL parser following WHATWG reads ``host`` as an IPv4 address: its last
    label is decimal or 0x-hex (``2130706433``, ``127.1``, ``0177.0.0.1``, ``0x7f.1``, ``0``)."""
    labels = host.removesuffix(".").split(".")
    return bool(labels) and _NUMERIC_LABEL.fullmatch(labels[-1]) is not None


def check_url(url: URL, allow: Sequence[Network]) -> None:
    if url.scheme not in ("http", "https") or not url.host:
        raise FetchError(f"only http(s) URLs can be fetched, not {url.scheme or 'a bare path'}:")
    host = url.host.strip("[]")
    if ends_in_a_number(host) and not _CANONICAL_IPV4.fullmatch(host):
        # Resolvers and HTTP clients disagree on what these mean (127.1 is 127.0.0.1 to
        # inet_aton): refuse them rather than guess.
        raise FetchError(f"the host {host[:60]!r} is an IPv4 address in a non-canonical form")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return  # a name: the resolver checks what it resolves to
    check_address(host, allow)


# What a data: URI may declare: no type, or one that can carry audio.
_AUDIO_TYPES = ("", "application/octet-stream", "application/ogg")
_AUDIO_FAMILIES = ("audio/", "video/")


def decode_data_uri(uri: str, max_bytes: int) -> bytes:
    """The bytes of ``data:[<type>][;<parameter>]...[;base64],<data>``, read as WHATWG's
    data: URL processor does (the data percent-decoded, ASCII white space in base64 ignored)
    but strictly: base64 that is not well-formed, no data, more than ``max_bytes``, or a
    type that cannot be audio (``text/plain``, ``image/png``, a ``charset``) is refused."""
    header, comma, payload = uri.partition(",")
    if not comma or not header.startswith("data:"):
        raise FetchError("a data: URI needs a comma between its header and its data")
    media_type, *parameters = (part.strip() for part in header[5:].lower().split(";"))
    is_base64 = parameters[-1:] == ["base64"]
    if not (media_type in _AUDIO_TYPES or media_type.startswith(_AUDIO_FAMILIES)) or any(
        p.startswith("charset=") for p in parameters
    ):
        raise FetchError(f"the data: URI's type {header[5:80]!r} is not audio")
    if len(payload) > max_bytes * 4 // 3 + 4:
        raise FetchError(f"the data: URI is larger than {max_bytes} bytes")
    data = unquote_to_bytes(payload)
    if is_base64:
        try:
            data = base64.b64decode(data.translate(None, b" \t\n\f\r"), validate=True)
        except (binascii.Error, ValueError) as e:
            raise FetchError(f"the data: URI is not valid base64: {e}") from e
    if not data:
        raise FetchError("the data: URI holds no data")
    if len(data) > max_bytes:
        raise FetchError(f"the data: URI is larger than {max_bytes} bytes")
    return data


class Fetcher:
    """One guarded HTTP client for audio downloads and webhooks (one per dialect service)."""

    def __init__(self, allow: Sequence[str], max_bytes: int, timeout_s: float) -> None:
        self._allow = parse_networks(allow)
        self._max_bytes = max_bytes
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(resolver=GuardedResolver(self._allow))
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def get(self, url: str) -> bytes:
        """The body at ``url`` (redirects followed, each hop checked), or :class:`FetchError`."""
        if url.startswith("data:"):
            return decode_data_uri(url, self._max_bytes)
        target = URL(url)
        try:
            for _ in range(MAX_REDIRECTS + 1):
                check_url(target, self._allow)
                async with self._client().get(target, allow_redirects=False) as response:
                    if (
                        response.status in (301, 302, 303, 307, 308)
                        and "Location" in response.headers
                    ):
                        target = target.join(URL(response.headers["Location"]))
                        continue
                    if response.status != 200:
                        raise FetchError(f"fetching {url} answered HTTP {response.status}")
                    if (response.content_length or 0) > self._max_bytes:
                        raise FetchError(f"{url} is larger than {self._max_bytes} bytes")
                    data = await read_at_most(response, self._max_bytes)
                    if len(data) > self._max_bytes:
                        raise FetchError(f"{url} is larger than {self._max_bytes} bytes")
                    return data
            raise FetchError(f"fetching {url}: more than {MAX_REDIRECTS} redirects")
        except FetchError:
            raise
        except TimeoutError as e:
            raise FetchError(f"fetching {url} took longer than {self._timeout.total} s") from e
        except aiohttp.ClientError as e:
            cause = e.__cause__ if isinstance(e.__cause__, FetchError) else None
            raise FetchError(str(cause) if cause else f"fetching {url} failed: {e}") from e

    async def post_json(self, url: str, payload: object) -> int:
        """POST ``payload`` to ``url``; the HTTP status (errors raise, for the caller to retry).

        At most ``max_bytes`` of the answer are read; a longer one is cut off by closing
        the connection (a receiver can't make terra hold its answer)."""
        check_url(URL(url), self._allow)
        async with self._client().post(url, json=payload, allow_redirects=False) as response:
            read = 0
            while read < self._max_bytes and (
                chunk := await response.content.read(self._max_bytes - read)
            ):
                read += len(chunk)
            if not response.content.at_eof():
                response.close()
            return response.status
