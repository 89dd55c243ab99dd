import os

import pytest

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import crypto
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import IntegrityError


def test_seal_round_trip_and_nonce():
    key = crypto.new_key()
    assert len(key) == 32 and key != crypto.new_key()
    a = crypto.seal(key, b"hello", b"aad")
    b = crypto.seal(key, b"hello", b"aad")
    assert a != b and a[:12] != b[:12] and len(a) == 12 + 5 + 16
    assert crypto.open_sealed(key, a, b"aad") == b"hello"


@pytest.mark.parametrize("key", [crypto.new_key(), None], ids=["aes-gcm", "null"])
def test_seal_after_a_prefix_is_the_prefix_then_the_sealed_blob(key):
    plain = os.urandom(100_000)
    blob = crypto.seal(key, plain, b"aad", b"HEAD\x01")
    assert blob[:5] == b"HEAD\x01" and len(blob) == 5 + len(crypto.seal(key, plain, b"aad"))
    assert crypto.open_sealed(key, blob[5:], b"aad") == plain
    with pytest.raises(IntegrityError):
        crypto.open_sealed(key, blob[5:], b"other")


@pytest.mark.parametrize("key", [crypto.new_key(), None], ids=["aes-gcm", "null"])
def test_tamper_and_wrong_aad_fail_naming_object(key):
    blob = bytearray(crypto.seal(key, b"payload" * 10, b"chunk|job|abc"))
    assert crypto.open_sealed(key, bytes(blob), b"chunk|job|abc") == b"payload" * 10
    with pytest.raises(IntegrityError) as e:
        crypto.open_sealed(key, bytes(blob), b"chunk|job|other", "chunk", "abc")
    assert e.value.kind == "chunk" and e.value.object_id == "abc" and "chunk abc" in str(e.value)
    blob[-3] ^= 1
    with pytest.raises(IntegrityError):
        crypto.open_sealed(key, bytes(blob), b"chunk|job|abc", "manifest", "s1")
    with pytest.raises(IntegrityError):
        crypto.open_sealed(key, b"short", b"x")


def test_wrong_key_fails():
    blob = crypto.seal(crypto.new_key(), b"x", b"")
    with pytest.raises(IntegrityError):
        crypto.open_sealed(crypto.new_key(), blob, b"")


def test_null_cipher_is_plain_but_checksummed():
    blob = crypto.seal(None, b"visible", b"a")
    assert blob.endswith(b"visible")


def test_chunk_id_keyed_and_deterministic():
    k1, k2 = crypto.new_key(), crypto.new_key()
    assert crypto.chunk_id(k1, b"data") == crypto.chunk_id(k1, b"data")
    assert crypto.chunk_id(k1, b"data") != crypto.chunk_id(k2, b"data")
    assert len(crypto.chunk_id(k1, b"")) == 64


def test_boundary_rate_follows_size():
    is_b = crypto.boundary_threshold_fn(crypto.new_key(), 100_000)
    keys = [os.urandom(12) for _ in range(20000)]
    hits = sum(is_b(k, 1000) for k in keys)
    assert 100 < hits < 320  # expected 200: one boundary per 100 kB of 1 kB documents
    assert [is_b(k, 1000) for k in keys[:100]] == [is_b(k, 1000) for k in keys[:100]]


def test_compress_round_trip_and_garbage():
    assert crypto.decompress(crypto.compress(b"abc" * 1000)) == b"abc" * 1000
    with pytest.raises(IntegrityError):
        crypto.decompress(b"not zstd", "chunk", "x")
