"""Errors that cross the wire: a stable machine-readable code and a human message.

A node turns a `ProtocolError` raised anywhere in its request handling into an error reply with the
same code; a client turns an error reply back into the same code. Codes are strings on the wire so
they stay readable in captures and stable across releases.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    MALFORMED_HEADER = "malformed_header"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_OP = "unknown_op"
    BAD_KEY = "bad_key"
    TOO_MANY_KEYS = "too_many_keys"
    HEADER_TOO_LARGE = "header_too_large"
    VALUE_TOO_LARGE = "value_too_large"
    FRAME_MISMATCH = "frame_mismatch"
    INTERNAL = "internal"


class ProtocolError(Exception):
    """A request or reply that breaks the protocol; carries the code sent back to the peer."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
