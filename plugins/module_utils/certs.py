# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Client-certificate checks for KMIP (no Ansible imports). PRIVATE to the collection.

A group's credential is a PEM holding the certificate (optionally followed by
intermediates) and its private key, or a certificate file plus a key file; the key may be
encrypted with a password. check_client_certificate() tells, one clear error per problem,
whether a KMIP server would accept it: readable, password right, key matches, valid now,
clientAuth usage, exactly one CN (the KMIP identity), chains to the configured CA.
Decrypted key material stays in memory; nothing here writes a file.
"""
from __future__ import annotations

import dataclasses
import datetime
import re

from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import CertificateError

try:
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    CRYPTOGRAPHY_IMPORT_ERROR = None
except ImportError as e:
    CRYPTOGRAPHY_IMPORT_ERROR = e

DEFAULT_WARN_DAYS = 30
_KEY_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?-----END \1PRIVATE KEY-----", re.S)
_MAX_CHAIN = 8


def _require():
    if CRYPTOGRAPHY_IMPORT_ERROR is not None:
        raise CertificateError("the Python package cryptography is required on this host: install it (pip install cryptography)",
                               kind="missing_library")


@dataclasses.dataclass
class CertInfo:
    identity: str              # the single CN: the client's identity at the KMIP server
    subject: str
    issuer: str
    not_after: str             # ISO 8601, UTC
    days_left: int
    fingerprint_sha256: str
    warnings: list

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Credential:
    certificate: object        # x509.Certificate (the leaf)
    chain: list                # intermediates found with it, in file order
    key: object                # private key object (in memory only)
    warnings: list


def _read(path, what):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise CertificateError("%s %s does not exist: give the path of a PEM file" % (what, path), kind="unreadable") from None
    except OSError as e:
        raise CertificateError("cannot read %s %s: %s" % (what, path, e.strerror or e), kind="unreadable") from e


def _certs_in(data, path, what):
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CertificateError("%s %s holds no PEM certificate: give a PEM file with -----BEGIN CERTIFICATE----- blocks"
                               % (what, path), kind="unreadable") from None


def load_ca_certs(ca_file: str) -> list:
    """The certificates in a PEM CA file; each must be a CA certificate."""
    _require()
    certs = _certs_in(_read(ca_file, "CA file"), ca_file, "CA file")
    for c in certs:
        try:
            is_ca = c.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = c.issuer == c.subject  # an old-style self-signed root without extensions
        if not is_ca:
            raise CertificateError("CA file %s holds a certificate that is not a CA (%s): give the CA's certificate, not a leaf"
                                   % (ca_file, c.subject.rfc4514_string()), kind="not_ca")
    return certs


def _load_key(data, path, password):
    m = _KEY_BLOCK.search(data)
    if not m:
        return None
    block = m.group(0)
    pw = password.encode("utf-8") if password else None
    warnings = []
    try:
        key = serialization.load_pem_private_key(block, password=pw)
    except TypeError:
        if pw is None:
            raise CertificateError("the private key in %s is encrypted: set client_cert_password" % path, kind="password") from None
        key = serialization.load_pem_private_key(block, password=None)
        warnings.append("client_cert_password is set but the private key in %s is not encrypted" % path)
    except ValueError:
        if pw is not None:
            raise CertificateError("cannot decrypt the private key in %s: client_cert_password is wrong" % path, kind="password") from None
        raise CertificateError("the private key in %s cannot be parsed: give a PEM private key" % path, kind="unreadable") from None
    return key, warnings


def _public_bytes(pub):
    return pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_credential(cert_file: str, key_file: str | None = None, password: str | None = None) -> Credential:
    """Read a client credential; CertificateError(kind=unreadable|password|key_mismatch) when unusable."""
    _require()
    data = _read(cert_file, "client certificate file")
    certs = _certs_in(data, cert_file, "client certificate file")
    key_path = key_file or cert_file
    loaded = _load_key(_read(key_file, "client key file") if key_file else data, key_path, password)
    if loaded is None:
        if key_file:
            raise CertificateError("client key file %s holds no PEM private key" % key_file, kind="unreadable")
        raise CertificateError("%s holds no private key: append the key to the PEM or set client_key_file" % cert_file,
                               kind="unreadable")
    key, warnings = loaded
    mine = _public_bytes(key.public_key())
    leaves = [c for c in certs if _public_bytes(c.public_key()) == mine]
    if not leaves:
        raise CertificateError("the private key in %s does not belong to the certificate in %s: give the matching key"
                               % (key_path, cert_file), kind="key_mismatch")
    leaf = leaves[0]
    return Credential(certificate=leaf, chain=[c for c in certs if c is not leaf], key=key, warnings=warnings)


def _issued_by(cert, issuer):
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


def _chains_to(leaf, intermediates, roots, now):
    cert = leaf
    pool = list(intermediates)
    for _depth in range(_MAX_CHAIN):
        for root in roots:
            if _issued_by(cert, root):
                return True
        nxt = next((c for c in pool if _issued_by(cert, c)), None)
        if nxt is None or not nxt.not_valid_before_utc <= now <= nxt.not_valid_after_utc:
            return False
        pool.remove(nxt)
        cert = nxt
    return False


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def check_client_certificate(cert_file: str, key_file: str | None = None, password: str | None = None, ca_file: str | None = None,
                             warn_days: int = DEFAULT_WARN_DAYS, now: datetime.datetime | None = None) -> CertInfo:
    """Validate a KMIP client credential and return its CertInfo; CertificateError with .kind
    (unreadable, password, key_mismatch, expired, not_yet_valid, no_client_auth, cn, untrusted)."""
    cred = load_credential(cert_file, key_file, password)
    cert = cred.certificate
    now = now or datetime.datetime.now(datetime.timezone.utc)
    subject = cert.subject.rfc4514_string()
    not_after = cert.not_valid_after_utc
    if now > not_after:
        raise CertificateError("the client certificate %s (%s) expired on %s: issue a new one and configure it"
                               % (cert_file, subject, not_after.isoformat()), kind="expired")
    if now < cert.not_valid_before_utc:
        raise CertificateError("the client certificate %s (%s) is not valid before %s: check the host's clock or the certificate"
                               % (cert_file, subject, cert.not_valid_before_utc.isoformat()), kind="not_yet_valid")
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        client_auth = ExtendedKeyUsageOID.CLIENT_AUTH in eku
    except x509.ExtensionNotFound:
        client_auth = False  # KMIP servers (PyKMIP among them) demand the clientAuth usage explicitly
    if not client_auth:
        raise CertificateError("the client certificate %s (%s) lacks the clientAuth extended key usage, so KMIP servers refuse it: "
                               "issue one with extendedKeyUsage = clientAuth" % (cert_file, subject), kind="no_client_auth")
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        raise CertificateError("the client certificate %s (%s) has %d common names (CN); it needs exactly one, the KMIP identity"
                               % (cert_file, subject, len(cns)), kind="cn")
    if ca_file:
        roots = load_ca_certs(ca_file)
        if not _chains_to(cert, cred.chain, roots, now):
            raise CertificateError("the client certificate %s (%s, issued by %s) is not signed by the CA in %s, so the KMIP server "
                                   "will not trust it: use a certificate from that CA (or add its intermediates to the PEM)"
                                   % (cert_file, subject, cert.issuer.rfc4514_string(), ca_file), kind="untrusted")
    days_left = (not_after - now).days
    warnings = list(cred.warnings)
    if days_left < warn_days:
        warnings.append("the client certificate %s (CN=%s) expires in %d days (%s): renew it"
                        % (cert_file, cns[0].value, days_left, not_after.isoformat()))
    return CertInfo(identity=cns[0].value, subject=subject, issuer=cert.issuer.rfc4514_string(),
                    not_after=not_after.isoformat(), days_left=days_left, fingerprint_sha256=fingerprint(cert),
                    warnings=warnings)
