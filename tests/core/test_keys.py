"""Chunk keys: a key names its whole prefix inside one namespace, and nothing else."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache.core.keys import (
    DEFAULT_CHUNK_TOKENS,
    KEY_BYTES,
    EngineKeySettings,
    Namespace,
    chunk_keys,
    token_bytes,
)

NS = Namespace(model="meta-llama/Llama-3.1-8B-Instruct", revision="main")
TOKENS = list(range(1000, 1000 + 4 * DEFAULT_CHUNK_TOKENS + 17))  # 4 full chunks + 17 tokens

token_ids = st.integers(min_value=0, max_value=2**32 - 1)


def test_keys_are_32_bytes_one_per_full_chunk():
    keys = chunk_keys(TOKENS, NS)
    assert len(keys) == 4
    assert all(isinstance(k, bytes) and len(k) == KEY_BYTES for k in keys)
    assert len(set(keys)) == 4
    assert len(NS.root_key()) == KEY_BYTES


# Derived independently from the documented encoding (length-prefixed namespace fields, v2: PP
# size and rank and the LoRA adapter after the salt; 10-byte tags, little-endian uint32 tokens,
# partial count as uint32) with hashlib alone when this test was written.
GOLDEN_FULL = "d9ba584a87e33d840028dd3d5fcdcb405ca6980a524853a5e3ff9f9fbc0ddc14"
GOLDEN_PARTIAL = "beeb8517bec35dba00749fad75aa84a1f752555a18434da4195b8259578387d7"


def test_keys_are_stable_across_processes_and_versions():
    # A golden value: every process (connector, router, other hosts) must derive the same keys,
    # and a change of encoding must be deliberate (bump the domain tags).
    ns = Namespace(model="m")
    keys = chunk_keys([1, 2, 3, 4, 5, 6], ns, chunk_tokens=4, include_partial=True)
    assert keys[0].hex() == GOLDEN_FULL
    assert keys[1].hex() == GOLDEN_PARTIAL


def test_equal_prefixes_give_equal_keys():
    other = TOKENS[: 2 * DEFAULT_CHUNK_TOKENS] + [7] * (3 * DEFAULT_CHUNK_TOKENS)
    assert chunk_keys(TOKENS, NS)[:2] == chunk_keys(other, NS)[:2]
    assert chunk_keys(TOKENS, NS)[2:] != chunk_keys(other, NS)[2:5]


@pytest.mark.parametrize("chunk", [0, 1, 3])
@pytest.mark.parametrize("offset", [0, 100, DEFAULT_CHUNK_TOKENS - 1])
def test_changing_one_token_changes_its_chunk_and_every_later_key(chunk, offset):
    changed = list(TOKENS)
    changed[chunk * DEFAULT_CHUNK_TOKENS + offset] += 1
    before, after = chunk_keys(TOKENS, NS), chunk_keys(changed, NS)
    assert before[:chunk] == after[:chunk]
    assert all(b != a for b, a in zip(before[chunk:], after[chunk:], strict=True))
    assert not set(before[chunk:]) & set(after)


@pytest.mark.parametrize(
    "change",
    [
        {"tenant_salt": b"tenant-b"},
        {"model": "meta-llama/Llama-3.1-70B-Instruct"},
        {"revision": "v2"},
        {"kv_layout": "layers,tokens,2,kv_heads,head_dim"},
        {"kv_dtype": "bfloat16"},
        {"world_size": 2, "rank": 1},
        {"world_size": 2, "rank": 0},
        {"pp_size": 2, "pp_rank": 1},
        {"pp_size": 2, "pp_rank": 0},
        {"lora": "sql-adapter"},
    ],
)
def test_namespaces_that_differ_in_any_field_have_disjoint_keys(change):
    base = dataclasses.replace(NS, tenant_salt=b"tenant-a")
    other = dataclasses.replace(base, **change)
    base_keys = {base.root_key(), *chunk_keys(TOKENS, base, include_partial=True)}
    other_keys = {other.root_key(), *chunk_keys(TOKENS, other, include_partial=True)}
    assert not base_keys & other_keys


def test_namespace_fields_are_length_prefixed():
    ab_c = Namespace(model="ab", revision="c")
    a_bc = Namespace(model="a", revision="bc")
    assert ab_c.root_key() != a_bc.root_key()
    assert (
        Namespace(model="m", kv_dtype="f", tenant_salt=b"x").root_key()
        != Namespace(model="m", kv_dtype="fx", tenant_salt=b"").root_key()
    )


def test_equal_namespaces_give_equal_root_keys():
    first, second = Namespace(model="m", tenant_salt=b"s"), Namespace(model="m", tenant_salt=b"s")
    assert first.root_key() == second.root_key()


def test_partial_chunk_is_keyed_only_when_asked():
    full = chunk_keys(TOKENS, NS)
    with_partial = chunk_keys(TOKENS, NS, include_partial=True)
    assert with_partial[:-1] == full
    assert len(with_partial) == len(full) + 1
    # No trailing tokens: nothing extra to key.
    exact = TOKENS[: 4 * DEFAULT_CHUNK_TOKENS]
    assert chunk_keys(exact, NS, include_partial=True) == chunk_keys(exact, NS)


def test_partial_chunk_key_never_equals_a_full_chunk_key():
    # Same parent (the root) and the same token bytes: only the tag and count tell them apart.
    partial = chunk_keys([1, 2], NS, chunk_tokens=4, include_partial=True)
    full = chunk_keys([1, 2], NS, chunk_tokens=2)
    assert len(partial) == len(full) == 1
    assert partial != full


def test_partial_chunks_of_different_lengths_differ():
    keys = {chunk_keys([5] * n, NS, chunk_tokens=8, include_partial=True)[0] for n in range(1, 8)}
    assert len(keys) == 7


def test_empty_prompt_has_no_keys():
    assert chunk_keys([], NS) == []
    assert chunk_keys([], NS, include_partial=True) == []
    assert chunk_keys([1, 2, 3], NS, chunk_tokens=4) == []


def test_token_ids_are_little_endian_uint32():
    assert token_bytes([1, 2**32 - 1]) == b"\x01\x00\x00\x00\xff\xff\xff\xff"
    assert len(chunk_keys([2**32 - 1] * 4, NS, chunk_tokens=4)) == 1


@pytest.mark.parametrize("bad", [-1, 2**32, 2**40])
def test_token_ids_outside_uint32_raise_value_error(bad):
    with pytest.raises(ValueError):
        chunk_keys([1, 2, bad, 4], NS, chunk_tokens=2)


@pytest.mark.parametrize("chunk_tokens", [0, -1])
def test_chunk_tokens_below_one_raise_value_error(chunk_tokens):
    with pytest.raises(ValueError):
        chunk_keys(TOKENS, NS, chunk_tokens=chunk_tokens)


@pytest.mark.parametrize(
    "fields",
    [
        {"model": ""},
        {"model": "m", "world_size": 2, "rank": 2},
        {"model": "m", "rank": -1},
        {"model": "m", "world_size": 0, "rank": 0},
    ],
)
def test_invalid_namespace_raises_value_error(fields):
    with pytest.raises(ValueError):
        Namespace(**fields)


@settings(max_examples=200, deadline=None)
@given(
    prefix=st.lists(token_ids, max_size=40),
    extension=st.lists(token_ids, max_size=40),
    chunk_tokens=st.integers(min_value=1, max_value=9),
)
def test_keys_of_a_sequence_are_a_prefix_of_keys_of_any_extension(prefix, extension, chunk_tokens):
    short = chunk_keys(prefix, NS, chunk_tokens=chunk_tokens)
    long = chunk_keys(prefix + extension, NS, chunk_tokens=chunk_tokens)
    assert len(short) == len(prefix) // chunk_tokens
    assert long[: len(short)] == short
    # The partial key only extends the full chain, never rewrites it.
    with_partial = chunk_keys(prefix, NS, chunk_tokens=chunk_tokens, include_partial=True)
    assert with_partial[: len(short)] == short


def test_a_request_salt_and_adapter_move_every_key_and_leave_plain_requests_as_they_were():
    plain = NS.for_request()
    assert plain == NS
    salted, adapted = NS.for_request(salt="user-7"), NS.for_request(lora="sql-adapter")
    keys = {ns: set(chunk_keys(TOKENS, ns)) for ns in (NS, salted, adapted)}
    assert not keys[NS] & keys[salted] and not keys[NS] & keys[adapted]
    assert not keys[salted] & keys[adapted]
    # the same salt twice names the same chunks (requests of one salt share KV)
    assert chunk_keys(TOKENS, NS.for_request(salt="user-7")) == chunk_keys(TOKENS, salted)


def test_engine_key_settings_travel_without_the_salt_and_rebuild_the_same_namespace():
    settings = EngineKeySettings(
        model="llama", revision="r1", kv_dtype="bfloat16", tp_size=2, pp_size=2,
        chunk_tokens=128, tenant_salt="s3cret",
    )  # fmt: skip
    published = settings.published()
    assert "s3cret" not in repr(published) and "s3cret" not in repr(settings)
    rebuilt = EngineKeySettings.from_published(published, tenant_salt="s3cret")
    assert rebuilt == settings
    assert rebuilt.namespace(1, 1) == settings.namespace(1, 1)
    assert settings.namespace().rank == 0 and settings.namespace(1, 0).rank == 1
    # without the salt the router would name other chunks than the engine's
    unsalted = EngineKeySettings.from_published(published)
    assert chunk_keys(TOKENS, unsalted.namespace()) != chunk_keys(TOKENS, settings.namespace())


@pytest.mark.parametrize("broken", [{"tp_size": "two"}, {"model": None}])
def test_malformed_published_settings_raise_value_error(broken):
    published = EngineKeySettings(model="llama").published()
    for name, value in broken.items():
        if value is None:
            del published[name]
        else:
            published[name] = value
    with pytest.raises(ValueError, match="malformed chunk namespace"):
        EngineKeySettings.from_published(published)
