"""config.py: files, modes, validation and the messages that say what to do."""
import os
import stat

import pytest
import yaml

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import config
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import ConfigError


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_kmip_config_round_trip_and_modes(tmp_path):
    d = str(tmp_path / "etc")
    cfg = config.KmipConfig(servers=["kmip1", "kmip2:5697"], ca_file="/ca.pem")
    path = config.save_kmip_config(d, cfg)
    assert path == os.path.join(d, "kmip.yml")
    assert mode(d) == 0o700 and mode(path) == 0o600
    assert config.load_kmip_config(d) == cfg
    assert cfg.addresses() == [("kmip1", 5696), ("kmip2", 5697)]
    assert config.delete_kmip_config(d) is True
    assert config.delete_kmip_config(d) is False


def test_missing_kmip_config_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError) as e:
        config.load_kmip_config(str(tmp_path))
    assert str(e.value) == "no KMIP configuration at %s/kmip.yml: run kmipbackup.mongodb.kmip_config first" % tmp_path


@pytest.mark.parametrize("kw,words", [
    (dict(servers=[]), "non-empty list"),
    (dict(servers=["a"], port=0), "invalid KMIP port"),
    (dict(servers=["a"], protocol="kmip_2_0"), "invalid KMIP protocol"),
    (dict(servers=["a"], connect_timeout=0), "connect_timeout must be positive"),
    (dict(servers=["a:x"]), "invalid port in KMIP server entry"),
    (dict(servers=["a b"]), "invalid host"),
])
def test_kmip_config_validation(kw, words):
    with pytest.raises(ConfigError) as e:
        config.KmipConfig(ca_file="/ca.pem", **kw)
    assert words in str(e.value)


def test_parse_server_forms():
    assert config.parse_server("h") == ("h", 5696)
    assert config.parse_server("h:1", 5) == ("h", 1)
    assert config.parse_server("[::1]:7") == ("::1", 7)
    assert config.parse_server("[::1]", 9) == ("::1", 9)
    assert config.parse_server("::1", 9) == ("::1", 9)


def test_bad_files_name_their_path(tmp_path):
    d = str(tmp_path)
    (tmp_path / "kmip.yml").write_text("servers: [a]\nca_file: /x\nsurprise: 1\n")
    with pytest.raises(ConfigError, match="unknown keys surprise"):
        config.load_kmip_config(d)
    (tmp_path / "kmip.yml").write_text("servers: [a\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        config.load_kmip_config(d)


def test_groups(tmp_path):
    d = str(tmp_path / "etc")
    g = config.GroupConfig("payments", "/c.pem", None, "pw")
    path = config.save_group(d, g)
    assert mode(path) == 0o600 and mode(os.path.dirname(path)) == 0o700
    assert config.load_group(d, "payments") == g
    assert config.list_groups(d) == ["payments"]
    with pytest.raises(ConfigError, match="run kmipbackup.mongodb.group_kmip first"):
        config.load_group(d, "other")
    assert config.delete_group(d, "payments") is True
    assert config.list_groups(d) == []


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".", "a b", None])
def test_names_are_validated(tmp_path, name):
    with pytest.raises(ConfigError, match="invalid"):
        config.group_path(str(tmp_path), name)


def test_jobs_are_read_and_keys_collected(tmp_path):
    d = str(tmp_path)
    os.makedirs(config.jobs_dir(d))
    for job, group, uid, prev in [("a", "g1", "1", ["0"]), ("b", "g1", "2", []), ("c", "g2", "3", []), ("d", "g1", None, [])]:
        with open(config.job_path(d, job), "w") as f:
            yaml.safe_dump({"job": job, "group": group, "master_key_uid": uid, "previous_master_key_uids": prev}, f)
    assert config.list_jobs(d) == ["a", "b", "c", "d"]
    assert config.load_job(d, "c")["group"] == "g2"
    assert config.master_key_uids(d, group="g1") == {"1": ["a"], "0": ["a"], "2": ["b"]}
    with pytest.raises(ConfigError, match="backup_job_encryption"):
        config.load_job(d, "zzz")


@pytest.mark.parametrize("entry", ["admin:s3cr%40tPw@kmip.example.com", "admin:s3cr%40tPw@kmip.example.com:5696",
                                   "kmips://admin:s3cr%40tPw@kmip.example.com"])
def test_server_entry_with_password_is_refused_masked(entry):
    """A user:password@host entry: the error says KMIP takes no password and never echoes it."""
    with pytest.raises(ConfigError) as e:
        config.parse_server(entry)
    assert "take no user or password" in str(e.value) and "admin:********@kmip.example.com" in str(e.value)
    assert "s3cr" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        config.KmipConfig(servers=["kmip1.example.com", entry], ca_file="/ca.pem")
    assert "s3cr" not in str(e.value)


def test_userinfo_secrets_and_mask():
    uri = "mongodb://bob:p%40ss:w0rd@db1.example.com,db2/?replicaSet=rs0"
    assert config.userinfo_secrets(uri) == {"p%40ss:w0rd", "p@ss:w0rd"}
    assert config.mask_userinfo(uri) == "mongodb://bob:********@db1.example.com,db2/?replicaSet=rs0"
    assert config.userinfo_secrets("mongodb://bob@db1/") == set() and config.mask_userinfo("[::1]:5696") == "[::1]:5696"
