"""source.py error texts (no server needed)."""
from pymongo import errors as mongo_errors

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import source



def test_source_errors_carry_no_server_text():
    """Server error texts can name namespaces and echo _id filters: capture errors keep only the
    error's class and code (connection failures keep host and reason)."""
    e = mongo_errors.OperationFailure("not authorized on canarydb to execute find {_id: 'canary-id'}", 13,
                                      {"codeName": "Unauthorized", "errmsg": "canarydb canary-id"})
    assert source._safe(e) == "OperationFailure code 13 Unauthorized"
    dup = mongo_errors.DuplicateKeyError("E11000 duplicate key collection: canarydb.c dup key: { _id: 'canary-id' }", 11000)
    assert "canary" not in source._safe(dup) and "11000" in source._safe(dup)
    net = mongo_errors.AutoReconnect("db1.example.com:27017: connection refused")
    assert source._safe(net) == "db1.example.com:27017: connection refused"
