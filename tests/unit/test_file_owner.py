"""Explicit ownership of configuration files (the modules' file_owner and file_group): config.file_owner checks the
owner before anything is written, config.set_owner sets it through descriptors, never through a link."""
import os

import pytest

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import config
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import ConfigError, UnsafePathError

ME = str(os.geteuid())


def written(tmp_path):
    cd = str(tmp_path / "etc")
    config.save_group(cd, config.GroupConfig(group="g1", client_cert_file="/x.pem"), ME)
    return cd


def test_nothing_given_changes_nothing(tmp_path):
    cd = written(tmp_path)
    assert config.file_owner(None, None, ME) == (-1, -1)
    assert config.set_owner(cd, ["groups/g1.yml"], (-1, -1), ME) is False


def test_the_current_owner_is_no_change_and_a_missing_file_is_one(tmp_path):
    cd = written(tmp_path)
    ids = config.file_owner(ME, str(os.getegid()), ME)
    assert config.set_owner(cd, ["groups/g1.yml"], ids, ME) is False
    assert config.set_owner(cd, ["groups/g2.yml"], ids, ME, check_mode=True) is True


def test_an_owner_config_dir_may_not_have_is_refused_before_anything(tmp_path):
    with pytest.raises(ConfigError, match="may not own config_dir"):
        config.file_owner("4242", None, ME)
    with pytest.raises(UnsafePathError, match="No user"):
        config.file_owner("no-such-user-kb", None, ME)
    with pytest.raises(UnsafePathError, match="No group"):
        config.file_owner(None, "no-such-group-kb", ME)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files to another user needs root")
def test_owner_and_group_are_set_on_the_folder_the_file_and_config_dir_check_mode_changes_nothing(tmp_path):
    cd = written(tmp_path)
    ids = config.file_owner("65534", "65534", "65534")
    paths = [cd, os.path.join(cd, "groups"), os.path.join(cd, "groups", "g1.yml")]
    assert config.set_owner(cd, ["groups/g1.yml"], ids, "65534", check_mode=True) is True
    assert all(os.stat(p).st_uid == 0 for p in paths)
    assert config.set_owner(cd, ["groups/g1.yml"], ids, "65534") is True
    assert all((os.stat(p).st_uid, os.stat(p).st_gid) == (65534, 65534) for p in paths)
    assert config.set_owner(cd, ["groups/g1.yml"], ids, "65534") is False
    os.symlink("/etc/passwd", os.path.join(cd, "groups", "g2.yml"))  # a planted link is refused, never followed
    with pytest.raises(UnsafePathError, match="symbolic link"):
        config.set_owner(cd, ["groups/g2.yml"], ids, "65534")
    assert os.stat("/etc/passwd").st_uid == 0
