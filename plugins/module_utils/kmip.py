# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""KMIP sessions, master keys and data-key wrapping (no Ansible imports). PRIVATE to the collection.

We build the TLS connection ourselves (TLS 1.2+, server certificate checked against the
configured CA and the server's host name, client certificate of the group) and hand the
connected socket to PyKMIP's KMIPProxy, which only encodes and decodes messages here:
its own open() (no host-name check) and its configuration files are never used.

Wrap modes (the record's "mode" says which one made it, so either always unwraps):
- kmip-gcm: KMIP Encrypt/Decrypt with AES-256-GCM on the server; the master key never
  leaves it. The IV and tag travel in the payloads (KMIP 1.4 message encoding), and the
  associated data binds the master key UID.
- rfc5649 (protocol: legacy, KMIP 1.0/1.1 servers): KMIP Get, then AES key wrap with
  padding locally; the master key is held in memory for that call only.
unwrap() accepts an rfc5649 record only when the configuration allows it (protocol legacy, or
allow_legacy_unwrap): the mode comes from the store, and a planted record must not make a
kmip_1_2 client pull a master key out of the server.
"""
from __future__ import annotations

import base64
import errno
import importlib.util
import os
import socket
import ssl
import sys
import time

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import certs
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.config import GroupConfig, KmipConfig, parse_server
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import CertificateError, IntegrityError, KmipError
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.timeutil import Backoff

# PyKMIP is imported on first use: importing it pulls in SQLAlchemy (about a second), which
# modules that only check TLS or certificates should not pay.
kmip_attributes = enums = objects = kmip_exceptions = AttributeFactory = payloads = None
KMIPProtocol = RequestLengthMismatch = _Proxy = None


try:
    from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap_with_padding, aes_key_wrap_with_padding
except ImportError:
    pass  # certs reports the missing library first

MODE_GCM = "kmip-gcm"
MODE_RFC5649 = "rfc5649"
GCM_IV_BYTES = 12
GCM_TAG_BYTES = 16
_TRANSIENT_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EHOSTUNREACH,
                     errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN, errno.EPIPE}
_BACKOFF_BASE = 0.25
_BACKOFF_MAX = 5.0


def _skip_package_init():
    """Register PyKMIP's package without running its __init__, which imports the pie client and through it SQLAlchemy
    (about 0.35 s of a restore's 0.8 s module run) for names this client does not use; its only name the core
    modules import from the package (enums) is set. Submodules (kmip.pie too, for whoever wants it) import as usual."""
    if "kmip" in sys.modules:
        return
    spec = importlib.util.find_spec("kmip")
    if spec is None or spec.submodule_search_locations is None:
        return  # missing: the imports below report it
    package = importlib.util.module_from_spec(spec)
    sys.modules["kmip"] = package
    try:
        from kmip.core import enums as kmip_enums
    except BaseException:
        del sys.modules["kmip"]
        raise
    package.enums = kmip_enums


def _require():
    """Import PyKMIP once; KmipError when it is missing. Lazy on purpose: PyKMIP (and the SQLAlchemy it pulls in)
    takes about 0.4 s to import, which every module run and daemon start would pay even when it never talks
    to KMIP (an unencrypted job, kmip_config's file checks, snapshot_info on an unencrypted store)."""
    global kmip_attributes, enums, objects, kmip_exceptions, AttributeFactory, payloads, KMIPProtocol, RequestLengthMismatch
    global _Proxy
    if _Proxy is not None:
        return
    try:
        _skip_package_init()
        from kmip.core import attributes as kmip_attributes
        from kmip.core import enums, objects
        from kmip.core import exceptions as kmip_exceptions
        from kmip.core.factories.attributes import AttributeFactory
        from kmip.core.messages import payloads
        from kmip.services.kmip_client import KMIPProxy
        from kmip.services.kmip_protocol import KMIPProtocol, RequestLengthMismatch
    except ImportError as e:
        raise KmipError("the Python package pykmip is required on this host: install it (pip install pykmip)", kind="protocol") from e

    class Proxy(KMIPProxy):
        """KMIPProxy over a socket we connected and verified; never reads a PyKMIP config file."""

        def __init__(self, sock):
            super().__init__(host="localhost", port=1, config_file=os.devnull, timeout=1)
            self.socket = sock
            self.protocol = KMIPProtocol(sock)

        def open(self):
            raise RuntimeError("connections are opened by kmipbackup's KmipClient")

    _Proxy = Proxy


def _b64(data):
    return base64.b64encode(data).decode("ascii")


def _unb64(record, field):
    try:
        return base64.b64decode(record[field], validate=True)
    except (KeyError, TypeError, ValueError):
        raise IntegrityError("wrapped key record for master key %s has no valid %r field: the record is damaged"
                             % (record.get("master_key_uid"), field), kind="wrapped_key") from None


def _aad(uid):
    return b"kmipbackup wrapped data key v1\x00" + str(uid).encode("utf-8")


def tls_context(ca_file: str, cert_file: str | None = None, key_file: str | None = None, password: str | None = None) -> ssl.SSLContext:
    """Our client TLS context: TLS 1.2+, CERT_REQUIRED against ca_file, host-name check on."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    try:
        ctx.load_verify_locations(cafile=ca_file)
    except (OSError, ssl.SSLError) as e:
        raise KmipError("cannot load the KMIP CA file %s (%s): give a PEM file of CA certificates in kmip_config's ca_file"
                        % (ca_file, getattr(e, "strerror", None) or e), kind="unknown_ca") from e
    if cert_file:
        # A callback, never a prompt on a terminal; the decrypted key stays inside OpenSSL's memory.
        pw = (password or "").encode("utf-8")
        try:
            ctx.load_cert_chain(cert_file, key_file, password=lambda: pw)
        except (OSError, ssl.SSLError) as e:
            raise KmipError("cannot load the client certificate %s (%s): check it with kmipbackup.mongodb.group_kmip"
                            % (cert_file, getattr(e, "strerror", None) or getattr(e, "reason", None) or e), kind="bad_client_cert") from e
    return ctx


def _describe(exc):
    if isinstance(exc, ssl.SSLError):
        return getattr(exc, "verify_message", None) or exc.reason or str(exc)
    if isinstance(exc, socket.gaierror):
        return "cannot resolve the host name (%s)" % exc.strerror
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def _classify_connect_error(exc, host, port, ca_file, cert_file):
    """None for a transient failure (try the next server / retry), else the permanent KmipError."""
    where = "%s:%d" % (host, port)
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
            return KmipError("the KMIP server at %s presents a certificate that is not valid for the host name %s: "
                             "use the host name in its certificate (or reissue it for this name)" % (where, host),
                             kind="hostname_mismatch", servers=[where])
        return KmipError("the KMIP server at %s presents a certificate that the CA file %s does not trust (%s): "
                         "set kmip_config's ca_file to the CA that signed the server's certificate"
                         % (where, ca_file, _describe(exc)), kind="untrusted_server", servers=[where])
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").upper()
        if "UNKNOWN_CA" in reason:
            return KmipError("the KMIP server at %s does not trust the client certificate %s (TLS alert unknown CA): "
                             "use a client certificate signed by a CA the server trusts" % (where, cert_file),
                             kind="unknown_ca", servers=[where])
        if "UNSUPPORTED_CERTIFICATE" in reason:
            return KmipError("the KMIP server at %s refused the client certificate %s as unsupported: most often it lacks the "
                             "clientAuth extended key usage; issue one with it" % (where, cert_file), kind="no_client_auth", servers=[where])
        if "CERTIFICATE_EXPIRED" in reason:
            return KmipError("the KMIP server at %s refused the client certificate %s as expired: issue a new one and configure it "
                             "with kmipbackup.mongodb.group_kmip" % (where, cert_file), kind="bad_client_cert", servers=[where])
        if any(s in reason for s in ("CERTIFICATE", "HANDSHAKE_FAILURE", "ACCESS_DENIED")):
            return KmipError("the KMIP server at %s rejected the TLS handshake (%s): the client certificate %s is missing, "
                             "expired or not accepted; check it with kmipbackup.mongodb.group_kmip" % (where, exc.reason, cert_file),
                             kind="bad_client_cert", servers=[where])
        if "WRONG_VERSION" in reason or "PROTOCOL" in reason or "VERSION" in reason:
            return KmipError("the KMIP server at %s does not speak TLS 1.2 or newer (%s): upgrade its TLS settings"
                             % (where, exc.reason), kind="protocol", servers=[where])
        return None  # e.g. an EOF in the middle of a handshake: treat as transient
    if isinstance(exc, (socket.timeout, TimeoutError, socket.gaierror)):
        return None
    if isinstance(exc, OSError) and (exc.errno in _TRANSIENT_ERRNOS or exc.errno is None):
        return None
    if isinstance(exc, OSError):
        return KmipError("cannot connect to the KMIP server at %s: %s" % (where, _describe(exc)), kind="unreachable", servers=[where])
    return None


def _connect(ctx, host, port, connect_timeout):
    sock = socket.create_connection((host, port), timeout=connect_timeout)
    try:
        return ctx.wrap_socket(sock, server_hostname=host)
    except BaseException:
        sock.close()
        raise


def verify_server(kmip_config: KmipConfig, entry: str) -> dict:
    """One TLS handshake with a configured server entry, checking its certificate and host name
    against the CA file. Returns {"server", "host", "port", "ok", "reason"}; a server that asks for a
    client certificate (which we do not send here) has passed the checks on its certificate."""
    host, port = parse_server(entry, kmip_config.port)
    result = {"server": entry, "host": host, "port": port, "ok": False, "reason": None}
    ctx = tls_context(kmip_config.ca_file)
    # A server that wants a client certificate ends this handshake (we send none) after we
    # have verified its certificate; an EOF or alert *before* its Certificate message proves
    # nothing. So note whether the server's Certificate message arrived.
    received = set()

    def on_message(_conn, direction, _version, _content_type, msg_type, _data):
        if direction == "read":
            received.add(msg_type)

    ctx._msg_callback = on_message  # pylint: disable=protected-access
    try:
        ssock = _connect(ctx, host, port, kmip_config.connect_timeout)
    except ssl.SSLCertVerificationError as e:
        err = _classify_connect_error(e, host, port, kmip_config.ca_file, None)
        result["reason"] = str(err)
        result["kind"] = err.kind
        return result
    except ssl.SSLError as e:
        reason = (e.reason or "").upper()
        cert_seen = ssl._TLSMessageType.CERTIFICATE in received  # pylint: disable=protected-access
        if cert_seen and any(s in reason for s in ("HANDSHAKE_FAILURE", "CERTIFICATE_REQUIRED", "CERTIFICATE", "UNEXPECTED_EOF")):
            result.update(ok=True, reason="server certificate and host name verified (the server requires a client certificate)")
        else:
            result.update(reason="TLS handshake with %s:%d failed: %s" % (host, port, _describe(e)), kind="protocol")
        return result
    except OSError as e:
        result.update(reason="cannot connect to %s:%d: %s" % (host, port, _describe(e)), kind="unreachable")
        return result
    try:
        result.update(ok=True, reason="server certificate and host name verified", tls_version=ssock.version())
    finally:
        ssock.close()
    return result


class KmipClient:
    """A KMIP session for one group's certificate, with failover, retries and reconnection.

    Connects on first use; reuses one connection for many operations (a long-lived daemon)
    and reconnects when it breaks. Every failure is a KmipError with a kind."""

    def __init__(self, kmip_config: KmipConfig, group_config: GroupConfig, op_timeout: float = 30.0) -> None:
        _require()
        self.config = kmip_config
        self.group = group_config
        self.op_timeout = op_timeout
        self.calls = 0
        self.server = None       # "host:port" of the current connection
        self._proxy = None
        self._ctx = None
        self._identity = None

    # --- connection -------------------------------------------------------------------------
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._proxy is not None:
            self._proxy.close()
            self._proxy = None
            self.server = None

    @property
    def identity(self) -> str:
        """The client certificate's CN (the KMIP identity), for messages."""
        if self._identity is None:
            try:
                self._identity = certs.check_client_certificate(self.group.client_cert_file, self.group.client_key_file,
                                                                self.group.client_cert_password).identity
            except CertificateError:
                self._identity = "?"
        return self._identity

    def _context(self):
        if self._ctx is None:
            g = self.group
            try:
                certs.load_credential(g.client_cert_file, g.client_key_file, g.client_cert_password)
            except CertificateError as e:
                raise KmipError("group %s: %s" % (g.group, e), kind="bad_client_cert") from e
            self._ctx = tls_context(self.config.ca_file, g.client_cert_file, g.client_key_file, g.client_cert_password)
        return self._ctx

    def connect(self) -> None:
        """Open a connection: servers in order, transient failures retried with backoff."""
        if self._proxy is not None:
            return
        ctx = self._context()
        tried = {}
        backoff = Backoff(_BACKOFF_BASE, _BACKOFF_MAX)
        for attempt in range(self.config.connect_retries + 1):
            if attempt:
                time.sleep(backoff.next())
            for host, port in self.config.addresses():
                try:
                    sock = _connect(ctx, host, port, self.config.connect_timeout)
                except Exception as e:  # noqa: BLE001 - classified below
                    err = _classify_connect_error(e, host, port, self.config.ca_file, self.group.client_cert_file)
                    if err is not None:
                        raise err from e
                    tried["%s:%d" % (host, port)] = _describe(e)
                    continue
                sock.settimeout(self.op_timeout)
                self._proxy = _Proxy(sock)
                self.server = "%s:%d" % (host, port)
                return
        raise KmipError("no KMIP server reachable in %d attempt(s); tried %s: start a server or fix kmip_config's servers/port"
                        % (self.config.connect_retries + 1, ", ".join("%s (%s)" % kv for kv in tried.items())), kind="unreachable",
                        servers=["%s:%d" % a for a in self.config.addresses()])

    def _version(self, op):
        if op in (enums.Operation.ENCRYPT, enums.Operation.DECRYPT):
            return enums.KMIPVersion.KMIP_1_4  # the IV, AAD and tag fields exist from KMIP 1.4 on
        return enums.KMIPVersion.KMIP_1_0 if self.config.protocol == "legacy" else enums.KMIPVersion.KMIP_1_2

    def _call(self, op, payload, uid=None):
        """Send one operation; reconnect once (with failover) when the connection broke."""
        for attempt in (0, 1):
            self.connect()
            self._proxy.kmip_version = self._version(op)
            self.calls += 1
            try:
                return self._proxy.send_request_payload(op, payload)
            except kmip_exceptions.OperationFailure as e:
                raise self._operation_error(op, e, uid) from e
            except (OSError, EOFError, RequestLengthMismatch) as e:
                server = self.server
                self.close()
                if attempt:
                    raise KmipError("the connection to the KMIP server %s broke during %s (%s): check the server and retry"
                                    % (server, op.name, _describe(e)), kind="unreachable", uid=uid, servers=[server]) from e
            except Exception as e:  # noqa: BLE001 - PyKMIP raises assorted errors on malformed replies
                self.close()
                raise KmipError("the KMIP server %s sent an unusable reply to %s (%s): check that it speaks KMIP %s"
                                % (self.server, op.name, type(e).__name__, "1.0/1.1" if self.config.protocol == "legacy" else "1.2+"),
                                kind="protocol", uid=uid) from e

    def _operation_error(self, op, e, uid):
        reason, message = e.reason, str(e)
        R = enums.ResultReason
        who = "identity %s (group %s)" % (self.identity, self.group.group)
        if reason == R.ITEM_NOT_FOUND:
            return KmipError("no key with UID %s exists on the KMIP server %s: check the UID recorded for the job"
                             % (uid, self.server), kind="not_found", uid=uid)
        if reason == R.PERMISSION_DENIED:
            if message and "Active state" in message:
                return KmipError("master key %s is not active on the KMIP server: activate it or rotate to a new key" % uid,
                                 kind="not_active", uid=uid)
            return KmipError("the KMIP server denies %s access to key %s (%s): the key belongs to another identity; use that "
                             "group's certificate or grant access in the server's policy" % (who, uid, op.name), kind="permission_denied",
                             uid=uid)
        if reason == R.AUTHENTICATION_NOT_SUCCESSFUL:
            if "verifying the client certificate" in message:
                return KmipError("the KMIP server %s accepted the TLS connection but rejected the client certificate %s for KMIP "
                                 "requests: it lacks the clientAuth extended key usage; issue one with it"
                                 % (self.server, self.group.client_cert_file), kind="no_client_auth", uid=uid)
            return KmipError("the KMIP server %s could not take an identity from the client certificate %s (%s): it needs exactly "
                             "one common name (CN); issue one with a single CN" % (self.server, self.group.client_cert_file, message),
                             kind="bad_client_cert", uid=uid)
        if reason in (R.GENERAL_FAILURE, R.CRYPTOGRAPHIC_FAILURE) and op == enums.Operation.DECRYPT:
            return IntegrityError("the wrapped data key under master key %s failed authentication at the KMIP server: the record is "
                                  "damaged or was not wrapped by this key" % uid, kind="wrapped_key", object_id=uid)
        if reason == R.OPERATION_NOT_SUPPORTED or (message and "version" in message.lower()):
            hint = "set protocol: legacy in kmip_config" if op in (enums.Operation.ENCRYPT, enums.Operation.DECRYPT) else "check the server"
            return KmipError("the KMIP server %s does not support %s (%s): %s" % (self.server, op.name, message, hint),
                             kind="protocol", uid=uid)
        reason_name = getattr(reason, "name", reason)
        return KmipError("KMIP %s on key %s failed at %s: %s (%s)" % (op.name, uid, self.server, message, reason_name), kind="protocol", uid=uid)

    def ping(self) -> list:
        """One authenticated KMIP request (DiscoverVersions): proves the server accepts this identity."""
        resp = self._call(enums.Operation.DISCOVER_VERSIONS, payloads.DiscoverVersionsRequestPayload())
        return ["%d.%d" % (v.major, v.minor) for v in resp.protocol_versions or []]

    # --- keys -------------------------------------------------------------------------------
    def create_master_key(self, name: str) -> str:
        """Create an AES-256 key usable for Encrypt/Decrypt/WrapKey/UnwrapKey, activate it, return its UID."""
        f = AttributeFactory()
        mask = [enums.CryptographicUsageMask.ENCRYPT, enums.CryptographicUsageMask.DECRYPT,
                enums.CryptographicUsageMask.WRAP_KEY, enums.CryptographicUsageMask.UNWRAP_KEY]
        attrs = [f.create_attribute(enums.AttributeType.CRYPTOGRAPHIC_ALGORITHM, enums.CryptographicAlgorithm.AES),
                 f.create_attribute(enums.AttributeType.CRYPTOGRAPHIC_LENGTH, 256),
                 f.create_attribute(enums.AttributeType.CRYPTOGRAPHIC_USAGE_MASK, mask)]
        if name:
            attrs.append(f.create_attribute(enums.AttributeType.NAME, name))
        resp = self._call(enums.Operation.CREATE, payloads.CreateRequestPayload(
            object_type=enums.ObjectType.SYMMETRIC_KEY, template_attribute=objects.TemplateAttribute(attributes=attrs)))
        uid = resp.unique_identifier
        self._call(enums.Operation.ACTIVATE, payloads.ActivateRequestPayload(kmip_attributes.UniqueIdentifier(uid)), uid)
        return uid

    def key_info(self, uid: str) -> dict:
        """{"uid", "state", "name"} of a key (state like ACTIVE, DEACTIVATED)."""
        uid = str(uid)
        resp = self._call(enums.Operation.GET_ATTRIBUTES, payloads.GetAttributesRequestPayload(uid, ["State", "Name"]), uid)
        info = {"uid": uid, "state": None, "name": None}
        for a in resp.attributes or []:
            n = a.attribute_name.value
            if n == "State":
                info["state"] = a.attribute_value.value.name
            elif n == "Name" and info["name"] is None:
                info["name"] = a.attribute_value.name_value.value
        return info

    def check_access(self, uid: str) -> dict:
        """Raise KmipError(permission_denied|not_found|not_active) unless this identity can use key uid."""
        info = self.key_info(uid)
        if info["state"] != "ACTIVE":
            raise KmipError("master key %s is %s on the KMIP server, not ACTIVE: activate it or rotate the job to a new key"
                            % (uid, info["state"]), kind="not_active", uid=str(uid))
        return info

    def check_keys(self, uids: list) -> list:
        """[(uid, KmipError or None)] for each uid, in order: None when this identity can use the key, the error when
        check_access refused it (permission_denied, not_found or not_active); any other KmipError is raised."""
        out = []
        for uid in uids:
            try:
                self.check_access(uid)
            except KmipError as e:
                if e.kind not in ("permission_denied", "not_found", "not_active"):
                    raise
                out.append((uid, e))
            else:
                out.append((uid, None))
        return out

    def require_keys(self, uids: list, what: str = "that snapshot needs") -> list:
        """One KmipError naming every master key of uids this certificate cannot use; returns uids."""
        denied = [(uid, e.kind) for uid, e in self.check_keys(uids) if e is not None]
        if denied:
            raise KmipError("The KMIP client certificate (identity %s) cannot use the master key(s) %s %s (%s): use a "
                            "certificate provisioned for these keys (the job's group certificate or a reissued one of the "
                            "same identity)." % (self.identity, ", ".join(u for u, _kind in denied), what,
                                                 ", ".join("%s: %s" % d for d in denied)),
                            kind=denied[0][1], uid=denied[0][0])
        return list(uids)

    def revoke_key(self, uid: str, reason: str = "superseded") -> None:
        """Revoke (deactivate) a key; it stays readable for unwrapping where the server allows."""
        uid = str(uid)
        code = {"superseded": enums.RevocationReasonCode.SUPERSEDED,
                "cessation_of_operation": enums.RevocationReasonCode.CESSATION_OF_OPERATION}[reason]
        self._call(enums.Operation.REVOKE, payloads.RevokeRequestPayload(
            unique_identifier=kmip_attributes.UniqueIdentifier(uid), revocation_reason=objects.RevocationReason(code=code)), uid)

    def _get_key_bytes(self, uid):
        resp = self._call(enums.Operation.GET, payloads.GetRequestPayload(unique_identifier=uid), uid)
        secret = resp.secret
        if resp.object_type != enums.ObjectType.SYMMETRIC_KEY or secret is None:
            raise KmipError("KMIP object %s is not a symmetric key: give the UID of an AES-256 master key" % uid, kind="protocol", uid=uid)
        key = secret.key_block.key_value.key_material.value
        if len(key) != 32:
            raise KmipError("KMIP key %s is %d bits, not AES-256: use a 256-bit master key" % (uid, len(key) * 8), kind="protocol", uid=uid)
        return key

    # --- wrapping ---------------------------------------------------------------------------
    @staticmethod
    def _gcm_params():
        return kmip_attributes.CryptographicParameters(
            block_cipher_mode=enums.BlockCipherMode.GCM, cryptographic_algorithm=enums.CryptographicAlgorithm.AES,
            tag_length=GCM_TAG_BYTES)

    def wrap(self, uid: str, data_key: bytes) -> dict:
        """Wrap data_key (bytes) under master key uid; returns a JSON-safe record for unwrap()."""
        uid = str(uid)
        if not isinstance(data_key, (bytes, bytearray)) or not 16 <= len(data_key) <= 64:
            raise KmipError("a data key must be 16 to 64 bytes", kind="protocol", uid=uid)
        if self.config.protocol == "legacy":
            kek = self._get_key_bytes(uid)
            return {"master_key_uid": uid, "mode": MODE_RFC5649, "wrapped": _b64(aes_key_wrap_with_padding(kek, bytes(data_key)))}
        iv = os.urandom(GCM_IV_BYTES)
        resp = self._call(enums.Operation.ENCRYPT, payloads.EncryptRequestPayload(
            unique_identifier=uid, cryptographic_parameters=self._gcm_params(), data=bytes(data_key), iv_counter_nonce=iv,
            auth_additional_data=_aad(uid)), uid)
        if not resp.auth_tag or len(resp.auth_tag) != GCM_TAG_BYTES:
            raise KmipError("the KMIP server %s returned no AES-GCM tag for Encrypt: it does not support authenticated encryption; "
                            "set protocol: legacy in kmip_config" % self.server, kind="protocol", uid=uid)
        return {"master_key_uid": uid, "mode": MODE_GCM, "iv": _b64(resp.iv_counter_nonce or iv), "ct": _b64(resp.data),
                "tag": _b64(resp.auth_tag)}

    def unwrap(self, record: dict) -> bytes:
        """The data key (bytes) from a wrap() record, whichever mode made it."""
        if not isinstance(record, dict) or not record.get("master_key_uid"):
            raise IntegrityError("a wrapped key record must be a mapping naming its master_key_uid", kind="wrapped_key")
        uid = str(record["master_key_uid"])
        mode = record.get("mode")
        if mode == MODE_RFC5649:
            if self.config.protocol != "legacy" and not self.config.allow_legacy_unwrap:
                raise IntegrityError("its wrapped key under master key %s uses the legacy mode rfc5649 (the master key is fetched "
                                     "with KMIP Get), which this KMIP configuration (protocol kmip_1_2) does not allow: if the "
                                     "job's keys were wrapped while its protocol was legacy, set allow_legacy_unwrap: true "
                                     "(kmip_config; kmip_allow_legacy_unwrap for snapshot_restore)" % uid,
                                     kind="wrapped_key", object_id=uid)
            wrapped = _unb64(record, "wrapped")
            kek = self._get_key_bytes(uid)
            try:
                return aes_key_unwrap_with_padding(kek, wrapped)
            except InvalidUnwrap:
                raise IntegrityError("the wrapped data key under master key %s failed its integrity check: the record is damaged "
                                     "or was not wrapped by this key" % uid, kind="wrapped_key", object_id=uid) from None
        if mode == MODE_GCM:
            iv, ct, tag = _unb64(record, "iv"), _unb64(record, "ct"), _unb64(record, "tag")
            if len(tag) != GCM_TAG_BYTES or not iv:
                raise IntegrityError("the wrapped data key under master key %s has a malformed IV or tag: the record is damaged" % uid,
                                     kind="wrapped_key", object_id=uid)
            resp = self._call(enums.Operation.DECRYPT, payloads.DecryptRequestPayload(
                unique_identifier=uid, cryptographic_parameters=self._gcm_params(), data=ct, iv_counter_nonce=iv,
                auth_additional_data=_aad(uid), auth_tag=tag), uid)
            return resp.data
        raise IntegrityError("wrapped key record for master key %s has unknown mode %r (known: %s, %s)"
                             % (uid, mode, MODE_GCM, MODE_RFC5649), kind="wrapped_key", object_id=uid)
