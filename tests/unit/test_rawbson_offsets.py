"""rawbson.doc_offsets and split_bson_docs: BSON documents back to back, found by their length prefixes; anything
else (cut short, a length under 5, a length past the end) is refused rather than walked."""
import itertools
import struct

import bson
import pytest

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import rawbson

DOCS = [bson.encode({"_id": n, "s": "x" * (n * 37 % 300), "nested": {"a": [n] * (n % 4)}}) for n in range(50)]
DATA = b"".join(DOCS)


def test_offsets_and_split_give_back_each_document():
    offs = rawbson.doc_offsets(DATA)
    assert [DATA[a:b] for a, b in itertools.pairwise(offs)] == DOCS and offs[-1] == len(DATA)
    assert rawbson.split_bson_docs(DATA) == DOCS
    assert rawbson.doc_offsets(b"") == [0] and rawbson.split_bson_docs(b"") == []


@pytest.mark.parametrize("bad", [
    DATA[:-1],                            # the last document cut short
    DATA + b"\x05\x00",                   # a length prefix cut short
    DATA + struct.pack("<i", 4) + b"\0",  # a length under the smallest document's (5): walking it would not move on
    struct.pack("<i", -8) + DATA,         # negative: walking it would go back
    struct.pack("<i", len(DATA) * 2) + DATA[4:],  # past the end
], ids=["cut", "prefix-cut", "under-5", "negative", "past-end"])
def test_data_that_is_not_whole_documents_is_refused(bad):
    assert rawbson.doc_offsets(bad) is None
    with pytest.raises(ValueError, match="does not split into BSON documents"):
        rawbson.split_bson_docs(bad)
