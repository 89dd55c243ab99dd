"""kmip_config and group_kmip through real ansible-playbook runs against real PyKMIP servers."""
import base64
import os
import stat

import pytest
import yaml

import kmipbackup_lab as lab
from ansible_collections.kmipbackup.mongodb.plugins.module_utils import config, kmip

KC = "kmipbackup.mongodb.kmip_config"
GK = "kmipbackup.mongodb.group_kmip"


@pytest.fixture(scope="module")
def wrong_host_server(lab_dir, pki):
    info = lab.start_kmip_server(os.path.join(lab_dir, "kmip-wrong-host-modules"), pki, server=pki["wrong_host"])
    yield info
    lab.stop(info["pid"], timeout=1)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def kc(cd, pki, servers, **kw):
    return {KC: dict(dict(kmip_servers=servers, kmip_ca_file=pki["ca"], config_dir=cd), **kw)}


def gk(cd, grp, cert, **kw):
    return {GK: dict(dict(group=grp, client_cert_file=cert, config_dir=cd), **kw)}


def test_kmip_config_check_mode_write_idempotence_diff_absent(ansible, tmp_path, pki, kmip_server, kmip_server2):
    cd = str(tmp_path / "etc")
    servers = ["127.0.0.1:%d" % kmip_server["port"], "localhost:%d" % kmip_server2["port"]]
    cd0, cd2 = str(tmp_path / "etc0"), str(tmp_path / "etc2")
    task = kc(cd, pki, servers, verify=True, kmip_protocol="legacy", kmip_connect_timeout=2)
    absent = {KC: dict(state="absent", config_dir=cd2)}
    r = ansible.run([task, task, dict(kc(cd, pki, servers), check_mode=True),
                     kc(cd2, pki, servers), absent, absent, dict(kc(cd0, pki, servers, verify=True), check_mode=True)], diff=True)
    c = r[6]
    assert c["changed"] is True and not c.get("failed"), r.output
    assert c["diff"]["before"] == {} and c["diff"]["after"]["servers"] == servers
    assert [s["ok"] for s in c["servers"]] == [True, True]
    assert not os.path.exists(cd0)  # check mode created nothing
    assert r[0]["changed"] is True and r[1]["changed"] is False, r.output
    assert r[2]["changed"] is True  # back to the default protocol would change it
    path = os.path.join(cd, "kmip.yml")
    assert mode(cd) == 0o700 and mode(path) == 0o600
    cfg = config.load_kmip_config(cd)
    assert (cfg.servers, cfg.protocol, cfg.connect_timeout, cfg.port) == (servers, "legacy", 2.0, 5696)
    assert [x["changed"] for x in r.results[3:6]] == [True, True, False]
    assert not os.path.exists(os.path.join(cd2, "kmip.yml"))


def test_kmip_config_failures_write_nothing(ansible, tmp_path, pki, kmip_server, wrong_host_server, dead_port):
    cd = str(tmp_path / "etc")
    good = "127.0.0.1:%d" % kmip_server["port"]
    r = ansible.run([
        kc(cd, pki, [good, "127.0.0.1:%d" % wrong_host_server["port"]], verify=True),
        kc(cd, pki, [good], kmip_ca_file=pki["other_ca"], verify=True),
        kc(cd, pki, ["127.0.0.1:%d" % dead_port], verify=True, kmip_connect_timeout=1),
        kc(cd, pki, [good], kmip_ca_file=pki["clients"]["group1"]["cert"]),
        kc(cd, pki, [good], kmip_ca_file=str(tmp_path / "missing.pem")),
        kc(cd, pki, ["bad host"]),
        gk(cd, "g1", pki["clients"]["group1"]["pem"]),
    ])
    assert all(x.get("failed") for x in r.results), r.output
    assert "not valid for the host name 127.0.0.1" in r[0]["msg"]
    assert [s["ok"] for s in r[0]["servers"]] == [True, False]
    assert r[0]["servers"][1]["kind"] == "hostname_mismatch"
    assert "does not trust" in r[1]["msg"] and r[1]["servers"][0]["kind"] == "untrusted_server"
    assert "connection refused" in r[2]["msg"]
    assert "is not a CA" in r[3]["msg"]
    assert "does not exist" in r[4]["msg"]
    assert "invalid host" in r[5]["msg"]
    assert "run kmipbackup.mongodb.kmip_config first" in r[6]["msg"]
    assert not os.path.exists(cd)


@pytest.fixture
def configured(tmp_path, pki, kmip_server):
    """A config dir with kmip.yml (the module that writes it is tested above)."""
    cd = str(tmp_path / "etc")
    config.save_kmip_config(cd, config.KmipConfig(servers=["127.0.0.1:%d" % kmip_server["port"]], ca_file=pki["ca"]))
    return cd


def test_group_kmip_bad_certificates_each_fail_with_their_own_error(ansible, configured, pki):
    cd = configured
    bad, enc, c1, c2 = pki["bad"], pki["encrypted"], pki["clients"]["group1"], pki["clients"]["group2"]
    r = ansible.run([
        gk(cd, "g", bad["other_ca"]["pem"]),
        gk(cd, "g", bad["expired"]["pem"]),
        gk(cd, "g", bad["no_client_auth"]["pem"]),
        gk(cd, "g", bad["two_cn"]["pem"]),
        gk(cd, "g", enc["pem"], client_cert_password="not-the-password"),
        gk(cd, "g", enc["pem"]),
        gk(cd, "g", c1["cert"], client_key_file=c2["key"]),
        gk(cd, "../g", c1["pem"]),
    ])
    msgs = [x.get("msg", "") for x in r.results]
    assert all(x.get("failed") for x in r.results), r.output
    assert "is not signed by the CA in" in msgs[0]
    assert "expired on" in msgs[1]
    assert "lacks the clientAuth extended key usage" in msgs[2]
    assert "has 2 common names" in msgs[3]
    assert "client_cert_password is wrong" in msgs[4]
    assert "is encrypted: set client_cert_password" in msgs[5]
    assert "does not belong to the certificate" in msgs[6]
    assert "invalid group name" in msgs[7]
    assert "not-the-password" not in r.everything(invocation=True)
    assert not os.path.exists(config.groups_dir(cd))


def test_group_kmip_check_mode_idempotence_diff_and_expiry_warning(ansible, configured, pki):
    cd = configured
    enc, c1 = pki["encrypted"], pki["clients"]["group1"]
    task = gk(cd, "g1", enc["pem"], client_cert_password=enc["password"], verify=True)
    r = ansible.run([dict(task, check_mode=True)], diff=True)
    assert r[0]["changed"] is True and r[0]["identity"] == "group1", r.output
    assert not os.path.exists(config.groups_dir(cd))  # check mode created nothing

    r = ansible.run([task, task, gk(cd, "g1", enc["pem"], client_cert_password=enc["password"] + "-new"),
                     gk(cd, "g2", c1["cert"], client_key_file=c1["key"]), gk(cd, "g3", pki["bad"]["expiring"]["pem"])], diff=True)
    assert r[0]["changed"] is True and r[1]["changed"] is False, r.output
    assert r[0]["diff"]["after"]["client_cert_password"] == "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER"
    assert r[0]["keys_checked"] == []
    assert r[2]["failed"] and "client_cert_password is wrong" in r[2]["msg"]
    assert r[3]["changed"] and r[3]["identity"] == "group1"
    assert r[4]["changed"] and r[4]["days_left"] < 30 and "expires in" in r[4]["cert_warnings"][0]
    assert "expires in" in r.output  # shown as an Ansible warning too
    assert enc["password"] not in r.everything(invocation=True)
    path = config.group_path(cd, "g1")
    assert mode(path) == 0o600 and mode(config.groups_dir(cd)) == 0o700
    assert config.load_group(cd, "g1").client_cert_password == enc["password"]

    # a changed password shows as changed, still redacted; then state=absent
    absent = {GK: dict(group="g3", state="absent", config_dir=cd)}
    r = ansible.run([gk(cd, "g2", c1["pem"], client_cert_password="Canary-pw-7f3a"), dict(absent, check_mode=True), absent, absent],
                    diff=True)
    assert r[0]["changed"] and r[0]["diff"]["after"]["client_cert_password"] == "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER"
    assert "Canary-pw-7f3a" not in r.everything(invocation=True)
    assert [x["changed"] for x in r.results[1:]] == [True, True, False]
    assert config.list_groups(cd) == ["g1", "g2"]


def write_job(cd, job, group, uid, previous=()):
    os.makedirs(config.jobs_dir(cd), mode=0o700, exist_ok=True)
    with open(config.job_path(cd, job), "w") as f:
        yaml.safe_dump({"job": job, "group": group, "encryption": True, "master_key_uid": uid,
                        "previous_master_key_uids": list(previous)}, f)


def test_group_kmip_verify_names_unreachable_keys(ansible, configured, pki):
    cd = configured
    enc = pki["encrypted"]
    kcfg = config.load_kmip_config(cd)
    with kmip.KmipClient(kcfg, config.GroupConfig("g1", enc["pem"], None, enc["password"])) as c:
        current, previous = c.create_master_key("modules-current"), c.create_master_key("modules-previous")
    write_job(cd, "orders", "g1", current, [previous])
    write_job(cd, "audit", "g1", current)
    write_job(cd, "other", "gX", "424242")
    ok = gk(cd, "g1", enc["pem"], client_cert_password=enc["password"], verify=True)
    r = ansible.run([ok, gk(cd, "g1", pki["clients"]["group2"]["pem"], verify=True)], diff=True)
    assert r[0]["changed"] is True, r.output
    assert {(k["uid"], tuple(k["jobs"]), k["ok"]) for k in r[0]["keys_checked"]} == {
        (current, ("audit", "orders"), True), (previous, ("orders",), True)}
    # group2's certificate is another identity: denied both keys, named, nothing written
    assert r[1]["failed"]
    assert "cannot use 2 master key(s)" in r[1]["msg"] and current in r[1]["msg"] and previous in r[1]["msg"]
    assert {k["kind"] for k in r[1]["keys_checked"]} == {"permission_denied"}
    assert config.load_group(cd, "g1").client_cert_file == enc["pem"]

    write_job(cd, "gone", "g1", "999999")
    r = ansible.run([ok])
    assert r[0]["failed"] and "999999 (jobs gone)" in r[0]["msg"] and "no key with UID 999999" in r[0]["msg"]


def pem_body_lines(pem_bytes):
    """The base64 lines of every PRIVATE KEY block in a PEM: the key material as it would be copied."""
    lines, inside = [], False
    for line in pem_bytes.decode().splitlines():
        if line.startswith("-----BEGIN") and "PRIVATE KEY" in line:
            inside = True
        elif line.startswith("-----END"):
            inside = False
        elif inside and len(line) >= 40:
            lines.append(line)
    return lines


def key_material(path, password=None):
    """Needles for a client key: its PEM body as stored, and the decrypted key as PKCS#8 PEM body and DER hex."""
    from cryptography.hazmat.primitives import serialization
    data = open(path, "rb").read()
    key = serialization.load_pem_private_key(data, password.encode() if password else None)
    plain_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return pem_body_lines(data) + pem_body_lines(plain_pem) + [der.hex(), base64.b64encode(der).decode()]


def leaks(text, needles):
    return [n[:24] for n in needles if n in text]


def test_group_kmip_keeps_key_material_and_password_out_of_output_and_config(ansible, configured, pki):
    """group_kmip reads the client key (decrypting it with the password) to check and use it. What is honest to
    promise: no key material (the PEM body, or the decrypted key) reaches Ansible's output at any verbosity, the
    results, or any file under config_dir (groups/*.yml reference the key by path); the password reaches no output
    (no_log, the echoed arguments included) and exactly one file: groups/<group>.yml, 0600, as the value of
    client_cert_password, where the daemon needs it (like Ops Manager's kmipClientCertPassword)."""
    cd = configured
    enc, c1 = pki["encrypted"], pki["clients"]["group1"]
    pw = enc["password"]
    wrong = "zqWrongKeyPw-9137"
    secrets = key_material(enc["pem"], pw) + key_material(c1["key"])
    assert len(secrets) >= 12  # EC P-256 keys: a few PEM lines each
    tasks = [dict(gk(cd, "g1", enc["pem"], client_cert_password=pw, verify=True), check_mode=True),
             gk(cd, "g1", enc["pem"], client_cert_password=pw, verify=True),
             gk(cd, "g1", enc["pem"], client_cert_password=pw, verify=True),
             gk(cd, "g1", enc["pem"], client_cert_password=wrong),
             gk(cd, "g2", c1["cert"], client_key_file=c1["key"], verify=True),
             gk(cd, "g3", c1["cert"], client_key_file=pki["clients"]["group2"]["key"])]
    r = ansible.run(tasks, diff=True, verbosity=3)
    assert [x["changed"] for x in r.results[:3]] == [True, True, False] and r[4]["changed"], r.output[-4000:]
    assert r[3]["failed"] and "client_cert_password is wrong" in r[3]["msg"]
    assert r[5]["failed"] and "does not belong to the certificate" in r[5]["msg"]
    # control: -vvv printed every result and the echoed arguments, redacted
    assert '"keys_checked"' in r.output and '"module_args"' in r.output and "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER" in r.output
    text = r.everything(invocation=True)
    assert leaks(text, secrets + [pw, wrong]) == []

    found = {}
    for root, _, names in os.walk(cd):
        for n in names:
            p = os.path.join(root, n)
            with open(p) as f:
                found[os.path.relpath(p, cd)] = f.read()
            assert mode(p) == 0o600, p
    assert sorted(found) == ["groups/g1.yml", "groups/g2.yml", "kmip.yml"]
    for name, body in found.items():
        assert leaks(body, secrets + [wrong]) == [], name
        assert pw not in body.replace("client_cert_password: %s\n" % pw, ""), name
    assert found["groups/g1.yml"].count(pw) == 1 and yaml.safe_load(found["groups/g1.yml"])["client_cert_password"] == pw
    # control: the needles are the key material as stored in the lab's key files
    assert leaks(open(enc["pem"]).read(), secrets) and leaks(open(c1["key"]).read(), secrets)
