"""storage: the object_store option checked before anything is written, redacted, and described without credentials."""
import pytest

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import config, job_config, objectstore, storage, store
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import ConfigError

OS = {"bucket": "kb-backups", "prefix": "/site-a/", "endpoint_url": "https://s3.example.com:9000/",
      "access_key": "AKIDEXAMPLE", "secret_key": "s3cr3t-otter", "session_token": "tok-otter"}


def test_normalize_defaults_and_rules():
    out = storage.normalize_object_store(OS)
    assert out["prefix"] == "site-a" and out["endpoint_url"] == "https://s3.example.com:9000"
    assert out["addressing_style"] == "path" and out["connect_timeout"] == 10.0 and out["read_timeout"] == 60.0
    for bad, msg in ((dict(OS, bucket="Bad_Bucket"), "not a valid bucket name"), (dict(OS, bucket="ab"), "not a valid bucket"),
                     (dict(OS, bucket="192.168.1.1"), "not a valid bucket"), (dict(OS, bucket="a..b"), "not a valid bucket"),
                     (dict(OS, addressing_style="host"), "use one of path, virtual, auto"),
                     (dict(OS, endpoint_url="ftp://h"), "not an endpoint URL"),
                     (dict(OS, endpoint_url="https://u:pw-otter@h"), "not an endpoint URL"),
                     (dict(OS, secret_key=None), "both access_key and secret_key"),
                     (dict(OS, prefix="a/../b"), "not a valid prefix"), (dict(OS, read_timeout=0), "read_timeout"),
                     (dict(OS, ca_bundle="/nonexistent/ca.pem"), "ca_bundle"), (dict(OS, colour="red"), "Unknown")):
        with pytest.raises(ConfigError, match=msg) as e:
            storage.normalize_object_store(bad)
        assert "otter" not in str(e.value)


def test_redact_and_describe_hide_secrets():
    red = storage.redact(OS)
    assert red["secret_key"] == red["session_token"] == config.REDACTED and red["access_key"] == "AKIDEXAMPLE"
    assert OS["secret_key"] == "s3cr3t-otter"  # a copy
    cfg = {"job": "j", "source": {"uri": "mongodb://h"}, "object_store": OS}
    assert "otter" not in str(job_config.redact(cfg))
    text = storage.describe(object_store=OS)
    assert text == "bucket kb-backups prefix site-a at https://s3.example.com:9000/" and "otter" not in text
    assert storage.describe(object_store={"bucket": "b"}) == "bucket b at AWS S3"
    assert storage.describe("/srv/store") == "/srv/store" and storage.describe(data_dir="/var/x") == "/var/x/store"


def test_open_storage_picks_the_backend(tmp_path):
    with pytest.raises(ConfigError, match="not both"):
        storage.open_storage(str(tmp_path), OS)
    fs = storage.open_storage(data_dir=str(tmp_path), create=True)
    assert isinstance(fs, store.FileStorage) and fs.root == str(tmp_path / "store") and (tmp_path / "store").is_dir()
    s3 = storage.open_storage(object_store=OS)
    assert isinstance(s3, objectstore.S3Storage) and s3.root == "s3://kb-backups/site-a" and s3.parallelism > 1
    assert isinstance(storage.job_storage({"job": "j", "store": str(tmp_path)}), store.FileStorage)
    assert isinstance(storage.job_storage({"job": "j", "store": None, "object_store": OS}, str(tmp_path)), objectstore.S3Storage)
