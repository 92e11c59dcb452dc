"""Key loading: CurveZMQ pairs and allow-lists from certificate files or the environment (the two
ways a Kubernetes Secret reaches a pod), and the disk tier's at-rest key."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import zmq
import zmq.auth

from kvcache.core.secrets import (
    curve_client_keys,
    curve_server_keys,
    read_allowed_clients,
    read_at_rest_key,
    read_key_pair,
    read_public_key,
)


@pytest.fixture
def certificates(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    """(public file, secret file) of a node and two clients, made by zmq.auth."""
    return {
        name: tuple(map(Path, zmq.auth.create_certificates(tmp_path, name)))
        for name in ("node", "client-a", "client-b")
    }


def pair_of(files: tuple[Path, Path]) -> tuple[bytes, bytes]:
    public, secret = zmq.auth.load_certificate(files[1])
    assert secret is not None
    return public, secret


# ---- key pairs -----------------------------------------------------------------------------


def test_a_key_pair_loads_from_a_secret_certificate(certificates):
    public, secret = read_key_pair(str(certificates["node"][1]), env={})
    assert zmq.curve_public(secret) == public
    assert (public, secret) == pair_of(certificates["node"])


def test_a_key_pair_loads_from_the_environment_with_surrounding_whitespace(certificates):
    public, secret = pair_of(certificates["node"])
    env = {
        "KVCACHE_CURVE_PUBLIC_KEY": f" {public.decode()}\n",
        "KVCACHE_CURVE_SECRET_KEY": secret.decode(),
    }
    assert read_key_pair(None, env) == (public, secret)


def test_a_file_wins_over_the_environment(certificates):
    file_pair = pair_of(certificates["node"])
    env_public, env_secret = pair_of(certificates["client-a"])
    env = {
        "KVCACHE_CURVE_PUBLIC_KEY": env_public.decode(),
        "KVCACHE_CURVE_SECRET_KEY": env_secret.decode(),
    }
    assert read_key_pair(str(certificates["node"][1]), env) == file_pair


def test_no_key_pair_configured_is_none():
    assert read_key_pair(None, env={}) is None
    assert read_key_pair("", env={"KVCACHE_CURVE_PUBLIC_KEY": ""}) is None


def test_a_public_certificate_is_refused_as_a_key_pair(certificates):
    with pytest.raises(ValueError, match="holds no secret key"):
        read_key_pair(str(certificates["node"][0]), env={})


def test_a_missing_certificate_file_raises_os_error(tmp_path):
    with pytest.raises(OSError):
        read_key_pair(str(tmp_path / "absent.key_secret"), env={})


def test_halves_of_different_pairs_are_refused(certificates):
    public, _ = pair_of(certificates["client-a"])
    _, secret = pair_of(certificates["node"])
    env = {"KVCACHE_CURVE_PUBLIC_KEY": public.decode(), "KVCACHE_CURVE_SECRET_KEY": secret.decode()}
    with pytest.raises(ValueError, match="does not belong to the secret key"):
        read_key_pair(None, env)


@pytest.mark.parametrize(
    "secret, message",
    [
        ("short", "40-character Z85"),
        ("#" * 40, "not valid Z85"),  # every 5-character group decodes past 2**32
        ("~" * 40, "not valid Z85"),  # not in the Z85 alphabet
        ("é" * 40, "40-character Z85"),
    ],
    ids=["short", "overflow", "foreign_character", "non_ascii"],
)
def test_malformed_environment_keys_raise_value_error_naming_the_variable(
    certificates, secret, message
):
    public, _ = pair_of(certificates["node"])
    env = {"KVCACHE_CURVE_PUBLIC_KEY": public.decode(), "KVCACHE_CURVE_SECRET_KEY": secret}
    with pytest.raises(ValueError, match=f"KVCACHE_CURVE_SECRET_KEY.*{message}"):
        read_key_pair(None, env)


def test_half_a_pair_in_the_environment_is_refused(certificates):
    public, _ = pair_of(certificates["node"])
    with pytest.raises(ValueError, match="set both"):
        read_key_pair(None, {"KVCACHE_CURVE_PUBLIC_KEY": public.decode()})


# ---- allow-lists ---------------------------------------------------------------------------


def test_an_allow_list_loads_public_certificates_and_never_secret_ones(certificates, tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    for name in ("client-a", "client-b"):
        shutil.copy(certificates[name][0], allowed)
    shutil.copy(certificates["node"][1], allowed)  # a .key_secret file is not a client
    expected = {pair_of(certificates[name])[0] for name in ("client-a", "client-b")}
    assert read_allowed_clients(str(allowed), env={}) == expected


def test_an_allow_list_loads_from_the_environment_split_by_commas_or_whitespace(certificates):
    a, b = (pair_of(certificates[name])[0].decode() for name in ("client-a", "client-b"))
    for listed in (f"{a},{b}", f"{a}, {b},", f"{a}\n{b}\n"):
        assert read_allowed_clients(None, {"KVCACHE_CURVE_ALLOWED_CLIENTS": listed}) == {
            a.encode(),
            b.encode(),
        }


def test_no_allow_list_configured_is_none():
    assert read_allowed_clients(None, env={}) is None
    assert read_allowed_clients(None, {"KVCACHE_CURVE_ALLOWED_CLIENTS": " , "}) is None


def test_a_missing_or_empty_allow_list_directory_is_refused(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_allowed_clients(str(tmp_path / "absent"), env={})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        read_allowed_clients(str(tmp_path / "empty"), env={})


def test_a_malformed_allow_list_entry_is_refused():
    with pytest.raises(ValueError, match="KVCACHE_CURVE_ALLOWED_CLIENTS entry"):
        read_allowed_clients(None, {"KVCACHE_CURVE_ALLOWED_CLIENTS": "not-a-key"})


# ---- what a node and a client end up with --------------------------------------------------


def test_server_keys_bundle_the_pair_and_the_allow_list(certificates, tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    shutil.copy(certificates["client-a"][0], allowed)
    keys = curve_server_keys(str(certificates["node"][1]), str(allowed), env={})
    assert keys is not None
    assert (keys.public_key, keys.secret_key) == pair_of(certificates["node"])
    assert keys.allowed_clients == {pair_of(certificates["client-a"])[0]}
    open_node = curve_server_keys(str(certificates["node"][1]), None, env={})
    assert open_node is not None and open_node.allowed_clients is None
    assert curve_server_keys(None, None, env={}) is None


def test_an_allow_list_without_a_key_pair_is_refused(certificates):
    public, _ = pair_of(certificates["client-a"])
    with pytest.raises(ValueError, match="needs the node's own CurveZMQ key pair"):
        curve_server_keys(None, None, {"KVCACHE_CURVE_ALLOWED_CLIENTS": public.decode()})


def test_client_keys_take_the_server_key_from_a_certificate_or_z85_text(certificates):
    server_public, _ = pair_of(certificates["node"])
    client_pair = pair_of(certificates["client-a"])
    for server in (str(certificates["node"][0]), server_public.decode()):
        keys = curve_client_keys(server, str(certificates["client-a"][1]), env={})
        assert keys is not None
        assert keys.server_public_key == server_public
        assert (keys.public_key, keys.secret_key) == client_pair
    from_env = curve_client_keys(None, None, {"KVCACHE_CURVE_SERVER_KEY": server_public.decode()})
    assert from_env is not None and from_env.server_public_key == server_public


def test_a_client_without_its_own_pair_gets_a_fresh_valid_one(certificates):
    server_public, _ = pair_of(certificates["node"])
    first = curve_client_keys(server_public.decode(), None, env={})
    second = curve_client_keys(server_public.decode(), None, env={})
    assert first is not None and second is not None
    assert zmq.curve_public(first.secret_key) == first.public_key
    assert first.public_key != second.public_key


def test_client_keys_are_none_without_a_server_key_and_refuse_a_bad_one(tmp_path):
    assert curve_client_keys(None, None, env={}) is None
    with pytest.raises(ValueError, match="neither a file nor a key"):
        curve_client_keys(str(tmp_path / "absent.key"), None, env={})


def test_read_public_key_accepts_a_secret_certificate_too(certificates):
    assert read_public_key(str(certificates["node"][1])) == pair_of(certificates["node"])[0]


# ---- the at-rest key -----------------------------------------------------------------------


def test_the_at_rest_key_loads_from_a_file_or_the_environment(tmp_path):
    key = bytes(range(32))
    (tmp_path / "at-rest").write_text(key.hex() + "\n")
    assert read_at_rest_key(str(tmp_path / "at-rest"), env={}) == key
    assert read_at_rest_key(None, {"KVCACHE_AT_REST_KEY": key.hex().upper()}) == key
    assert read_at_rest_key(None, env={}) is None


@pytest.mark.parametrize("text", ["00" * 31, "00" * 33, "zz" * 32, ""])
def test_a_malformed_at_rest_key_is_refused(tmp_path, text):
    (tmp_path / "at-rest").write_text(text)
    with pytest.raises(ValueError, match="64 hex characters"):
        read_at_rest_key(str(tmp_path / "at-rest"), env={})
