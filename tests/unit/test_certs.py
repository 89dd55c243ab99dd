"""certs.py against the lab PKI: each bad credential gives its own kind and message."""
import datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import certs
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import CertificateError


def check(pki, path, **kw):
    kw.setdefault("ca_file", pki["ca"])
    return certs.check_client_certificate(path, **kw)


def kind_of(pki, path, **kw):
    with pytest.raises(CertificateError) as e:
        check(pki, path, **kw)
    return e.value.kind, str(e.value)


def test_good_combined_pem(pki):
    info = check(pki, pki["clients"]["group1"]["pem"])
    assert info.identity == "group1"
    assert info.warnings == []
    assert 360 <= info.days_left <= 366
    assert len(info.fingerprint_sha256.split(":")) == 32


def test_separate_cert_and_key_files(pki):
    c = pki["clients"]["group2"]
    assert check(pki, c["cert"], key_file=c["key"]).identity == "group2"


def test_encrypted_key(pki):
    e = pki["encrypted"]
    assert check(pki, e["pem"], password=e["password"]).identity == "group1"
    kind, msg = kind_of(pki, e["pem"], password="wrong")
    assert kind == "password" and "client_cert_password is wrong" in msg
    kind, msg = kind_of(pki, e["pem"])
    assert kind == "password" and "is encrypted: set client_cert_password" in msg


def test_password_for_unencrypted_key_is_a_warning(pki):
    info = check(pki, pki["clients"]["group1"]["pem"], password="unused")
    assert any("not encrypted" in w for w in info.warnings)


@pytest.mark.parametrize("name,kind,words", [
    ("other_ca", "untrusted", "is not signed by the CA in"),
    ("expired", "expired", "expired on"),
    ("no_client_auth", "no_client_auth", "lacks the clientAuth extended key usage"),
    ("two_cn", "cn", "has 2 common names"),
])
def test_bad_certificates(pki, name, kind, words):
    got, msg = kind_of(pki, pki["bad"][name]["pem"])
    assert got == kind
    assert words in msg
    assert pki["bad"][name]["pem"] in msg


def test_key_not_matching_certificate(pki):
    kind, msg = kind_of(pki, pki["clients"]["group1"]["cert"], key_file=pki["clients"]["group2"]["key"])
    assert kind == "key_mismatch" and "does not belong to the certificate" in msg


def test_expiring_soon_warns(pki):
    info = check(pki, pki["bad"]["expiring"]["pem"])
    assert info.days_left < 30
    assert len(info.warnings) == 1 and "expires in" in info.warnings[0] and "CN=group1" in info.warnings[0]
    assert check(pki, pki["bad"]["expiring"]["pem"], warn_days=2).warnings == []


def test_unreadable_inputs(pki, tmp_path):
    kind, msg = kind_of(pki, str(tmp_path / "missing.pem"))
    assert kind == "unreadable" and "does not exist" in msg
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    assert kind_of(pki, str(junk))[0] == "unreadable"
    kind, msg = kind_of(pki, pki["clients"]["group1"]["cert"])
    assert kind == "unreadable" and "holds no private key" in msg


def test_ca_file_must_hold_ca_certificates(pki):
    assert len(certs.load_ca_certs(pki["ca"])) == 1
    with pytest.raises(CertificateError) as e:
        certs.load_ca_certs(pki["clients"]["group1"]["cert"])
    assert e.value.kind == "not_ca"
    with pytest.raises(CertificateError) as e:
        check(pki, pki["clients"]["group1"]["pem"], ca_file=pki["other_ca"])
    assert e.value.kind == "untrusted"


def _cert(subject, key, issuer, issuer_key, ca, days=30):
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)])).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
         .not_valid_after(now + datetime.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def test_chain_through_intermediate_in_the_pem(tmp_path):
    pem = lambda c: c.public_bytes(serialization.Encoding.PEM)  # noqa: E731
    root_key, mid_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = _cert("root", root_key, "root", root_key, True)
    mid = _cert("mid", mid_key, "root", root_key, True)
    leaf = _cert("client", leaf_key, "mid", mid_key, False, days=400)
    key_pem = leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (tmp_path / "root.pem").write_bytes(pem(root))
    (tmp_path / "with-mid.pem").write_bytes(pem(leaf) + pem(mid) + key_pem)
    (tmp_path / "without-mid.pem").write_bytes(pem(leaf) + key_pem)
    info = certs.check_client_certificate(str(tmp_path / "with-mid.pem"), ca_file=str(tmp_path / "root.pem"))
    assert info.identity == "client"
    with pytest.raises(CertificateError) as e:
        certs.check_client_certificate(str(tmp_path / "without-mid.pem"), ca_file=str(tmp_path / "root.pem"))
    assert e.value.kind == "untrusted"
