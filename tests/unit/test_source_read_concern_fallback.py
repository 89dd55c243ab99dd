"""source.py's fallback when a server refuses majority reads (ReadConcernMajorityNotEnabled, code 148: a 4.x server
with enableMajorityReadConcern off). No server here refuses them, so this checks our control flow only, with the reads
replaced: what MongoDB sends is checked against the real server in tests/integration/test_source_read_concern.py."""
import pytest
from pymongo import errors as mongo_errors

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import source

REFUSED = mongo_errors.OperationFailure("majority read concern is not enabled", 148)


def _reads(monkeypatch, refuse_after=0, code=148):
    """Replace find_raw_batches: with a read concern it yields refuse_after batches, then raises code."""
    calls = []

    def find(_client, ns, _query, _batch_size=None, read_concern=None):
        calls.append(read_concern)
        if read_concern is not None:
            for i in range(refuse_after):
                yield b"majority-%d" % i
            raise mongo_errors.OperationFailure("refused", code)
        yield b"default"
    monkeypatch.setattr(source, "find_raw_batches", find)
    return calls


def test_a_refused_majority_read_is_read_again_at_the_default(monkeypatch):
    calls = _reads(monkeypatch)
    assert list(source._committed_batches(None, "db.c", {}, 10, (5, 1))) == [b"default"]
    assert calls[0]["level"] == "majority" and calls[0]["afterClusterTime"].time == 5 and calls[1] is None


def test_a_refusal_after_the_first_batch_or_another_error_is_raised(monkeypatch):
    _reads(monkeypatch, refuse_after=1)  # batches were handed on: reading again would hand them twice
    with pytest.raises(mongo_errors.OperationFailure):
        list(source._committed_batches(None, "db.c", {}))
    _reads(monkeypatch, code=13)  # not authorized: not a reason to read differently
    with pytest.raises(mongo_errors.OperationFailure):
        list(source._committed_batches(None, "db.c", {}))


def test_committed_single_reads_fall_back_the_same_way():
    seen = []

    def read(*args, read_concern=None):
        seen.append((args, read_concern))
        if read_concern is not None:
            raise REFUSED
        return "doc"
    assert source._committed(read, "client", "db.c") == "doc"
    assert seen == [(("client", "db.c"), {"level": "majority"}), (("client", "db.c"), None)]
