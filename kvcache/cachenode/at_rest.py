"""Encryption at rest for the disk tier: AES-256-GCM, one fresh random nonce per record.

A record's plaintext header (its chunk key, size, checksum, meta) is not secret but is bound to the
ciphertext as associated data, so a record cannot be moved to another key's name, truncated, or
have its header edited without `open` refusing it. Random 96-bit nonces keep the chance of a repeat
negligible up to about 2^32 records per key (NIST SP 800-38D); rotate the key long before that.
This module never touches a file and never logs.
"""

from __future__ import annotations

import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16


class AtRestCipher:
    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"the at-rest key must be {KEY_BYTES} bytes, got {len(key)}")
        self._aead = AESGCM(key)

    def seal(self, plaintext: Any, associated: bytes) -> tuple[bytes, bytes]:
        """(nonce, ciphertext with its 16-byte tag) for one record."""
        nonce = os.urandom(NONCE_BYTES)
        return nonce, self._aead.encrypt(nonce, plaintext, associated)

    def open(self, nonce: Any, ciphertext: Any, associated: bytes) -> bytes | None:
        """The plaintext, or None when the key is wrong or any byte was changed."""
        try:
            return self._aead.decrypt(nonce, ciphertext, associated)
        except InvalidTag:
            return None
