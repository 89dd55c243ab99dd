"""files.py: atomic private writes, and owner inheritance when running as root."""
import os
import stat

import pytest

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import files


def test_atomic_write_private_modes(tmp_path):
    folder = files.ensure_private_dir(str(tmp_path / "a" / "b"))
    target = os.path.join(folder, "f.yml")
    files.write_yaml(target, {"k": "v"})
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(os.path.dirname(folder)).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert files.read_yaml(target) == {"k": "v"}
    assert [n for n in os.listdir(folder) if n.startswith(".tmp-")] == []


def test_failed_write_leaves_old_content(tmp_path):
    target = str(tmp_path / "f")
    files.atomic_write(target, b"old")
    with pytest.raises(TypeError):
        files.atomic_write(target, object())
    assert files.read_bytes(target) == b"old"
    assert os.listdir(str(tmp_path)) == ["f"]


@pytest.mark.skipif(os.geteuid() != 0, reason="owner inheritance applies to root only")
def test_root_writes_inherit_folder_owner(tmp_path):
    folder = str(tmp_path / "conf")
    os.mkdir(folder, 0o700)
    os.chown(folder, 65534, 65534)  # nobody: as the backup_daemon role's user would own it
    files.write_yaml(os.path.join(folder, "kmip.yml"), {"a": 1})
    sub = files.ensure_private_dir(os.path.join(folder, "groups"))
    for path in (os.path.join(folder, "kmip.yml"), sub):
        st = os.stat(path)
        assert (st.st_uid, st.st_gid) == (65534, 65534)
