"""Positive controls for the canary scanners: each finds a canary where one is, so a clean scan elsewhere means
something. The quickstart playbook's scanner (playbooks/files/quickstart_data.py scan) and tests/snapshot_helpers.py
canary_hits run over planted files and a real null-cipher store chunk and manifest, which grep cannot see into."""
import json
import os
import subprocess
import sys

import bson

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import files, store
from snapshot_helpers import canary_hits

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCANNER = os.path.join(ROOT, "playbooks", "files", "quickstart_data.py")
CANARY = "kmipbackup-quickstart-canary"


def quickstart_scan(*paths):
    p = subprocess.run([sys.executable, SCANNER, "scan", CANARY] + list(paths), capture_output=True, text=True, timeout=60, check=True)
    return json.loads(p.stdout)


def test_quickstart_scanner_sees_compressed_store_objects_names_and_plain_files(tmp_path):
    root = str(tmp_path / "store")
    js = store.JobStore(root, "plain")  # the null cipher (key "none"), as an unencrypted job writes: zstd, not sealed
    docs = b"".join(bson.encode({"_id": "%s-ticket-%d" % (CANARY, i), "customer": i % 7, "open": i % 2 == 0}) for i in range(50))
    js.put_chunk("c" * 64, docs, "none", None)
    js.put_manifest("20260101T000000Z-00000001", {"namespaces": [{"ns": "shop.tickets-" + CANARY, "i": i} for i in range(20)]},
                    "none", None)
    grep = subprocess.run(["grep", "-rlF", CANARY, root], capture_output=True, text=True)
    assert grep.returncode == 1, grep.stdout  # plain grep misses both: their content is compressed

    other = str(tmp_path / "other")
    files.ensure_private_dir(other)
    files.atomic_write(os.path.join(other, "log.txt"), ("noise " + CANARY.upper() + "\n").encode())
    files.atomic_write(os.path.join(other, "tickets-%s.bson" % CANARY), b"")
    files.atomic_write(os.path.join(other, "clean.txt"), b"kmipbackup-quickstart-canar")
    single = str(tmp_path / "restoreInfo.txt")  # a file given by its path, as the quickstart gives restoreInfo.txt
    files.atomic_write(single, CANARY.encode())

    found = quickstart_scan(root, other, single)
    assert found["self_test"] is True and found["frames"] >= 2, found
    hits = sorted(os.path.relpath(h, str(tmp_path)) for h in found["hits"])
    store_hits = [h for h in hits if h.startswith("store/")]
    assert len(store_hits) == 2 and any("/chunks/" in h for h in store_hits) and any("/manifests/" in h for h in store_hits), hits
    assert sorted(set(hits) - set(store_hits)) == ["other/log.txt", "other/tickets-%s.bson" % CANARY, "restoreInfo.txt"], hits
    assert quickstart_scan(os.path.join(other, "clean.txt"))["hits"] == []

    # the tests' scanner agrees
    assert sorted(os.path.relpath(h, str(tmp_path)) for h in canary_hits(root, CANARY)) == store_hits
