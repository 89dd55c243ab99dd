"""The module base (ansible_module.KmipBackupModule): shared specs, one report of a core that cannot be imported,
one way a core error becomes a failure (msg, error_kind, the fields the core attached)."""
import json

import pytest
from ansible.module_utils.testing import patch_module_args

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import ansible_module
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.ansible_module import KmipBackupModule
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import ConfigError, KmipError


def run(capsys, args, fn=None, **kw):
    """The module's JSON result for args (fn: what the module runs)."""
    with patch_module_args(args), pytest.raises(SystemExit):
        module = KmipBackupModule(kw.pop("spec", {}), **kw)
        module.run(fn or (lambda: {"changed": False}))
    return json.loads(capsys.readouterr().out)


def test_shared_specs_are_merged_with_the_core_defaults(capsys):
    out = run(capsys, {}, shared=("store_reader",), spec=dict(job=dict(type="str")))
    args = out["invocation"]["module_args"]
    assert args["kmip_port"] == 5696 and args["kmip_protocol"] == "kmip_1_2" and args["data_dir"] == "/var/lib/kmipbackup"
    assert set(ansible_module.store_reader_spec()) <= set(args)


def test_a_core_that_cannot_be_imported_is_reported_without_echoing_the_arguments(capsys):
    out = run(capsys, {"job": "x", "client_cert_password": "s3cret"}, spec=lambda: 1 / 0,
              import_error="Traceback...\nModuleNotFoundError: No module named 'yaml'\n")
    assert out["failed"] and out["error_kind"] == "missing_requirement" and "No module named 'yaml'" in out["msg"]
    assert "s3cret" not in json.dumps(out) and "requirements/runtime.txt" in out["msg"]


def test_a_core_error_fails_with_its_message_kind_and_details(capsys):
    def refuse():
        e = ConfigError("no, nothing changed")
        e.details = {"master_key_users": {"41": ["snapshot a"]}}
        raise e
    out = run(capsys, {}, refuse)
    assert out["failed"] and out["msg"] == "no, nothing changed" and out["error_kind"] == "ConfigError"
    assert out["master_key_users"] == {"41": ["snapshot a"]}

    def denied():
        raise KmipError("denied", kind="permission_denied")
    assert run(capsys, {}, denied)["error_kind"] == "permission_denied"


def test_warnings_become_ansibles_and_a_diff_only_in_diff_mode(capsys):
    out = run(capsys, {}, lambda: {"changed": True, "warnings": ["look"], "diff": {"before": {}, "after": {}}})
    assert [w["event"]["msg"] for w in out["warnings"]] == ["look"] and "diff" not in out
    out = run(capsys, {"_ansible_diff": True}, lambda: {"changed": True, "diff": {"before": {}, "after": {"a": 1}}})
    assert out["diff"] == {"before": {}, "after": {"a": 1}}


def test_a_pymongo_error_fails_as_mongodb_and_other_errors_stay_tracebacks(capsys):
    """pymongo is imported only where MongoDB is used; its errors still fail the module with error_kind mongodb."""
    import pymongo.errors

    def lost():
        raise pymongo.errors.ServerSelectionTimeoutError("127.0.0.1:1: connection refused")
    out = run(capsys, {}, lost)
    assert out["failed"] and out["error_kind"] == "mongodb" and "ServerSelectionTimeoutError" in out["msg"], out
    with patch_module_args({}), pytest.raises(ZeroDivisionError):
        KmipBackupModule({}).run(lambda: 1 / 0)
