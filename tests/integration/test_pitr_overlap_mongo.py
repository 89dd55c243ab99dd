"""The point-in-time fast path into a real MongoDB-wire target (SecantusDB), from this process (whose pymongo
clients keep monitor threads running while the replay process is started): the target then holds, document for document
and byte for byte, what the capture's head held at the point; a replay process killed mid-way fails the restore and
leaves no trace of it in the target."""
import uuid

import pymongo
import pytest
from bson.codec_options import CodecOptions
from bson.raw_bson import RawBSONDocument

from pitr_overlap_helpers import build_lab, restore_to_mongodb


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    lab = build_lab(tmp_path_factory.mktemp("overlap"))
    yield lab
    lab["head"].close()


def target_image(mc, rename):
    out = {}
    for src, dst in rename.items():
        for coll in mc[dst].list_collection_names():
            docs = mc[dst].get_collection(coll, codec_options=CodecOptions(document_class=RawBSONDocument)).find()
            out["%s.%s" % (src, coll)] = sorted(d.raw for d in docs)
    return out


def test_fast_path_into_mongodb_equals_the_head(lab, mongo_server):
    mc = pymongo.MongoClient(mongo_server["uri"])
    mc.admin.command("ping")  # its monitor threads run from here on
    point = max(p for p in lab["images"] if p < lab["ddl"])
    suffix = uuid.uuid4().hex[:8]
    rename = {"d": "ovl_d_" + suffix, "e": "ovl_e_" + suffix}
    path, error = restore_to_mongodb(str(lab["tmp"] / "store"), lab["provider"], point, mongo_server["uri"], rename)
    assert (path, error) == ("overlap", None)
    want = {ns: sorted(docs) for ns, docs in lab["images"][point].items() if docs}
    assert target_image(mc, rename) == want
    marker = mc["kmipbackup_restore"]["restoreInfo"].find_one({"snapshot_id": {"$regex": "@%d\\.%d$" % point}})
    assert marker["state"] == "complete"
    assert "Documents: %d\n" % sum(len(d) for d in lab["images"][point].values()) in marker["restoreInfo"]
    killed = {"d": "ovl_k_" + suffix, "e": "ovl_ke_" + suffix}
    path, error = restore_to_mongodb(str(lab["tmp"] / "store"), lab["provider"], point, mongo_server["uri"], killed, kill=True)
    assert path == "overlap" and error.startswith("RestoreError") and "killed by signal 9" in error
    assert not set(killed.values()) & set(mc.list_database_names())
    mc.close()
