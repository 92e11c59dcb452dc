"""Key material, read once at process start: CurveZMQ key pairs and the disk tier's at-rest key.

Kubernetes Secrets reach a pod as mounted files or as environment variables, so each key can come
from either: a CurveZMQ certificate file as written by `zmq.auth.create_certificates` (or Z85 text
in `KVCACHE_CURVE_PUBLIC_KEY` / `KVCACHE_CURVE_SECRET_KEY`), a directory of client public
certificates (or Z85 public keys, comma-separated, in `KVCACHE_CURVE_ALLOWED_CLIENTS`), and the
at-rest key as 64 hex characters in a file or in `KVCACHE_AT_REST_KEY`. Nothing here runs on the
data path; a key that is missing or malformed raises ValueError with what was expected.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path

import zmq
import zmq.auth
import zmq.utils.z85

from kvcache.core.config import CurveClientKeys, CurveServerKeys

Z85_KEY_CHARS = 40
AT_REST_KEY_BYTES = 32


def _z85_key(text: str | bytes, what: str) -> bytes:
    key = text.strip().encode() if isinstance(text, str) else text.strip()
    if len(key) != Z85_KEY_CHARS:
        raise ValueError(f"{what} must be a {Z85_KEY_CHARS}-character Z85 CurveZMQ key")
    try:
        zmq.utils.z85.decode(key)
    except (ValueError, KeyError, struct.error):  # a foreign character, or a 5-char group >= 2**32
        raise ValueError(f"{what} is not valid Z85 text") from None
    return key


def _matching_pair(public: bytes, secret: bytes, what: str) -> tuple[bytes, bytes]:
    """A pair whose halves do not belong together would fail every handshake without a word in
    any log, so it is refused at start."""
    if zmq.curve_public(secret) != public:
        raise ValueError(f"{what}: the public key does not belong to the secret key")
    return public, secret


def read_key_pair(
    path: str | None, env: Mapping[str, str] = os.environ
) -> tuple[bytes, bytes] | None:
    """(public, secret) from a certificate file with a secret key, else from the environment;
    None when neither is configured."""
    if path:
        public, secret = zmq.auth.load_certificate(path)
        if secret is None:
            raise ValueError(f"{path} holds no secret key: pass the .key_secret certificate")
        return _matching_pair(
            _z85_key(public, f"{path} public key"), _z85_key(secret, f"{path} secret key"), path
        )
    public_text, secret_text = (
        env.get("KVCACHE_CURVE_PUBLIC_KEY"),
        env.get("KVCACHE_CURVE_SECRET_KEY"),
    )
    if not public_text and not secret_text:
        return None
    if not (public_text and secret_text):
        raise ValueError("set both KVCACHE_CURVE_PUBLIC_KEY and KVCACHE_CURVE_SECRET_KEY")
    return _matching_pair(
        _z85_key(public_text, "KVCACHE_CURVE_PUBLIC_KEY"),
        _z85_key(secret_text, "KVCACHE_CURVE_SECRET_KEY"),
        "KVCACHE_CURVE_PUBLIC_KEY and KVCACHE_CURVE_SECRET_KEY",
    )


def read_public_key(path_or_key: str) -> bytes:
    """A public key from a certificate file, or given directly as Z85 text."""
    if Path(path_or_key).is_file():
        public, _ = zmq.auth.load_certificate(path_or_key)
        return _z85_key(public, f"{path_or_key} public key")
    return _z85_key(path_or_key, f"server public key {path_or_key!r} (neither a file nor a key)")


def read_allowed_clients(
    directory: str | None, env: Mapping[str, str] = os.environ
) -> frozenset[bytes] | None:
    """The client public keys a node lets in; None when no allow-list is configured.

    A directory holds public certificates (`*.key`; secret ones are never read), and the variable
    lists Z85 keys separated by commas or whitespace (neither occurs in Z85). A directory without
    certificates is refused: it would shut every client out, which is never what was meant."""
    if directory:
        if not Path(directory).is_dir():
            raise ValueError(f"allowed-clients directory {directory} does not exist")
        keys = frozenset(
            _z85_key(key, f"a certificate in {directory}")
            for key in zmq.auth.load_certificates(directory)
        )
        if not keys:
            raise ValueError(f"allowed-clients directory {directory} holds no *.key certificate")
        return keys
    listed = re.findall(r"[^,\s]+", env.get("KVCACHE_CURVE_ALLOWED_CLIENTS", ""))
    if not listed:
        return None
    return frozenset(_z85_key(key, "KVCACHE_CURVE_ALLOWED_CLIENTS entry") for key in listed)


def curve_server_keys(
    key_file: str | None, allowed_dir: str | None, env: Mapping[str, str] = os.environ
) -> CurveServerKeys | None:
    """A node's CurveZMQ settings; None (plain TCP) when no key pair is configured."""
    pair = read_key_pair(key_file, env)
    allowed = read_allowed_clients(allowed_dir, env)
    if pair is None:
        if allowed is not None:
            raise ValueError("an allow-list of clients needs the node's own CurveZMQ key pair")
        return None
    return CurveServerKeys(public_key=pair[0], secret_key=pair[1], allowed_clients=allowed)


def curve_client_keys(
    server_key: str | None, key_file: str | None, env: Mapping[str, str] = os.environ
) -> CurveClientKeys | None:
    """A client's CurveZMQ settings: the nodes' public key and the client's own pair (a client
    without a configured pair gets a fresh one, which only a node without an allow-list admits)."""
    server_key = server_key or env.get("KVCACHE_CURVE_SERVER_KEY")
    if not server_key:
        return None
    pair = read_key_pair(key_file, env) or zmq.curve_keypair()
    return CurveClientKeys(
        server_public_key=read_public_key(server_key), public_key=pair[0], secret_key=pair[1]
    )


def read_at_rest_key(path: str | None, env: Mapping[str, str] = os.environ) -> bytes | None:
    """The 32-byte AES-256-GCM key, as 64 hex characters in a file or `KVCACHE_AT_REST_KEY`."""
    if path:
        text, what = Path(path).read_text(), path
    elif env.get("KVCACHE_AT_REST_KEY"):
        text, what = env["KVCACHE_AT_REST_KEY"], "KVCACHE_AT_REST_KEY"
    else:
        return None
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise ValueError(f"{what} must hold {2 * AT_REST_KEY_BYTES} hex characters") from None
    if len(key) != AT_REST_KEY_BYTES:
        raise ValueError(f"{what} must hold {2 * AT_REST_KEY_BYTES} hex characters")
    return key
