"""files.py: atomic private writes, and owner inheritance when running as root."""
import os
import stat

import pytest

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import files, job_requests, job_status


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


# ---- privilege boundaries: nothing inside a trusted root is followed, chowned or chmodded by path ----------

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import config  # noqa: E402
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import UnsafePathError  # noqa: E402


def _victim(tmp_path):
    """A folder outside the trusted root, mode 0755, with one file: what a planted link points to."""
    v = tmp_path / "victim"
    v.mkdir()
    os.chmod(str(v), 0o755)
    (v / "keep").write_bytes(b"keep")
    return str(v)


def _state(path):
    st = os.lstat(path)
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, sorted(os.listdir(path)) if stat.S_ISDIR(st.st_mode) else None


def _private_root(tmp_path, name="data"):
    root = tmp_path / name
    root.mkdir()
    os.chmod(str(root), 0o700)
    return str(root)


def test_planted_folder_link_is_refused_not_followed(tmp_path):
    """data_dir/requests -> a foreign folder: ensure_private_dir and submit_request refuse it; the target keeps its
    mode and content (before: chmod 0700 of the target and a request folder written into it)."""
    root, victim = _private_root(tmp_path), _victim(tmp_path)
    os.symlink(victim, os.path.join(root, "requests"))
    before = _state(victim)
    with pytest.raises(UnsafePathError, match=r"requests is a symbolic link or not a folder: .*never follows links"):
        files.ensure_private_dir(os.path.join(root, "requests"))
    with pytest.raises(UnsafePathError, match="requests is a symbolic link"):
        job_requests.submit_request(root, "job1", "snapshot")
    assert _state(victim) == before


def test_planted_config_groups_link_is_refused(tmp_path):
    cd, victim = _private_root(tmp_path, "etc"), _victim(tmp_path)
    os.symlink(victim, os.path.join(cd, "groups"))
    before = _state(victim)
    with pytest.raises(UnsafePathError, match="groups is a symbolic link"):
        config.save_group(cd, config.GroupConfig(group="g1", client_cert_file="/x.pem"))
    assert _state(victim) == before


def test_planted_file_link_is_not_read(tmp_path):
    root, victim = _private_root(tmp_path), _victim(tmp_path)
    with open(os.path.join(victim, "secret.json"), "w") as f:
        f.write('{"secret": 1}')
    os.mkdir(os.path.join(root, "status"), 0o700)
    os.symlink(os.path.join(victim, "secret.json"), os.path.join(root, "status", "job1.json"))
    with pytest.raises(UnsafePathError, match="job1.json is a symbolic link"):
        job_status.read_status(root, "job1")


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777])
def test_writable_root_is_refused_not_tightened(tmp_path, mode):
    cd = _private_root(tmp_path, "etc")
    os.chmod(cd, mode)
    cfg = config.KmipConfig(servers=["kmip.example.com"], ca_file="/ca.pem")
    with pytest.raises(UnsafePathError, match=r"config_dir %s is writable by its group or by others \(mode %04o\): .*chmod "
                                              r"0700 .*nothing was changed" % (cd, mode)):
        config.save_kmip_config(cd, cfg)
    assert stat.S_IMODE(os.stat(cd).st_mode) == mode and os.listdir(cd) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="ownership checks need root")
def test_foreign_owned_root_is_refused_unless_daemon_user(tmp_path):
    cd = _private_root(tmp_path, "etc")
    os.chown(cd, 65534, 65534)  # nobody: not root and not the daemon's user
    cfg = config.KmipConfig(servers=["kmip.example.com"], ca_file="/ca.pem")
    with pytest.raises(UnsafePathError, match=r"config_dir %s is owned by nobody \(uid 65534\), not by root or the "
                                              r"daemon's user: .*set daemon_user" % cd):
        config.save_kmip_config(cd, cfg)
    assert os.listdir(cd) == []
    config.save_kmip_config(cd, cfg, daemon_user="nobody")  # nobody is the configured daemon user: accepted
    st = os.stat(os.path.join(cd, "kmip.yml"))
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65534, 0o600)


@pytest.mark.skipif(os.geteuid() != 0, reason="the chown race needs root")
def test_mkdir_then_swap_cannot_give_away_a_root_file(tmp_path, monkeypatch):
    """The daemon's user owns data_dir; between root's mkdir of a sub-folder and the owner change it swaps the new
    folder for a link to a root-only file. Before: chown/chmod by path gave that file to the daemon's user."""
    root = _private_root(tmp_path)
    os.chown(root, 65534, 65534)
    secret = str(tmp_path / "secret")
    with open(secret, "wb") as f:
        f.write(b"root only")
    os.chmod(secret, 0o600)
    real_mkdir = os.mkdir

    def racing_mkdir(path, mode=0o777, *, dir_fd=None):
        real_mkdir(path, mode, dir_fd=dir_fd)
        full = path if dir_fd is None else os.path.join(os.readlink("/proc/self/fd/%d" % dir_fd), path)
        if os.path.basename(full) == "requests":  # the attacker wins the race
            os.rmdir(full)
            os.symlink(secret, full)
    monkeypatch.setattr(os, "mkdir", racing_mkdir)
    with pytest.raises(UnsafePathError, match="requests is a symbolic link"):
        files.ensure_private_dir(os.path.join(root, "requests"))
    monkeypatch.undo()
    st = os.stat(secret)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600)
    assert files.read_bytes(secret) == b"root only"


@pytest.mark.skipif(os.geteuid() != 0, reason="owner inheritance applies to root only")
def test_folder_api_inherits_owner_by_descriptor(tmp_path):
    root = _private_root(tmp_path)
    os.chown(root, 65534, 65534)
    with files.open_root(root, owners={0, 65534}) as r, r.walk("requests", "job1") as f:
        f.write("a.json", b"{}")
    for p in ("requests", "requests/job1", "requests/job1/a.json"):
        st = os.stat(os.path.join(root, p))
        assert (st.st_uid, st.st_gid) == (65534, 65534), p
    assert stat.S_IMODE(os.stat(os.path.join(root, "requests", "job1")).st_mode) == 0o700


def test_planted_config_file_link_is_named(tmp_path):
    """kmip.yml -> a file elsewhere: refused as a link (not reported as invalid YAML, not read)."""
    cd, victim = _private_root(tmp_path, "etc"), _victim(tmp_path)
    os.symlink(os.path.join(victim, "keep"), os.path.join(cd, "kmip.yml"))
    with pytest.raises(UnsafePathError, match="kmip.yml is a symbolic link or not a file"):
        config.load_kmip_config(cd)
