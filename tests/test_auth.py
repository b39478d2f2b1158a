"""The one token check (terra/api/auth.py): constant-time match, and anything that is not a
valid text token is a 401, never a 500."""

from __future__ import annotations

import pytest

from terra.api.auth import check_token, token_matches
from terra.api.errors import Unauthorized

TOKENS = ("first", "второй")


@pytest.mark.parametrize("token", ["first", "второй", "второй".encode(), b"first"])
def test_known_tokens_pass(token: str | bytes) -> None:
    check_token(TOKENS, token)


@pytest.mark.parametrize(
    "token",
    [
        "firs",
        "first ",
        "\ud800",  # a lone surrogate, as json.loads('"\\ud800"') gives
        "fir\udcffst",
        b"\xff\xfe",  # not UTF-8
        "first\ufffd",  # what a lenient decoder makes of bad bytes
        12345,
        ["first"],
        {"token": "first"},
    ],
)
def test_other_tokens_are_401(token: object) -> None:
    assert not token_matches(TOKENS, token)
    with pytest.raises(Unauthorized, match="invalid token"):
        check_token(TOKENS, token)


@pytest.mark.parametrize("token", [None, "", b""])
def test_a_missing_token_says_so(token: object) -> None:
    with pytest.raises(Unauthorized, match="token is required"):
        check_token(TOKENS, token)
