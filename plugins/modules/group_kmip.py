#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r'''
module: group_kmip
short_description: Set the KMIP client certificate of a group of backup jobs
version_added: 0.1.0
description:
  - Records the KMIP client certificate a group's backup jobs use, in C(groups/<group>.yml) under O(config_dir)
    (mode C(0600), as it holds the key password). Ops Manager's C(kmipClientCertPath) and C(kmipClientCertPassword).
  - O(client_cert_file) is required when O(state=present).
  - Validates the certificate before writing anything, against the CA file of the KMIP configuration
    (M(kmipbackup.mongodb.kmip_config) must have run); a bad certificate or a wrong password fails and writes nothing.
  - The checks are the key password, the key matching the certificate, validity dates (with a warning when it expires
    within O(expiry_warning_days)), the clientAuth extended key usage, exactly one common name (the KMIP identity), and
    a chain to the configured CA.
  - With O(verify=true), connects to the KMIP server with the certificate and checks it can use every master key recorded
    for the group's jobs (C(jobs/*.yml) with this group, current and previous keys), naming any it cannot.
author: kmipbackup developers (@kmipbackup)
extends_documentation_fragment:
  - kmipbackup.mongodb.attributes
  - kmipbackup.mongodb.kmip
  - kmipbackup.mongodb.kmip.CLIENT_CERT
  - kmipbackup.mongodb.kmip.DAEMON_USER
  - kmipbackup.mongodb.kmip.FILE_OWNER
  - kmipbackup.mongodb.requirements
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
    details:
      - The password is shown redacted.
  idempotent:
    support: full
options:
  group:
    description: Name of the group (letters, digits, V(_), V(.) and V(-)).
    type: str
    required: true
  expiry_warning_days:
    description: Warn when the certificate expires within this many days.
    type: int
    default: 30
  state:
    description: V(present) records the certificate; V(absent) removes the group's file.
    type: str
    choices: [present, absent]
    default: present
  verify:
    description:
      - Connect to the KMIP server with the certificate and check access to every master key of the group's jobs.
      - Runs in check mode too (it changes nothing).
    type: bool
    default: false
seealso:
  - module: kmipbackup.mongodb.kmip_config
'''

EXAMPLES = r'''
- name: Give the payments group its KMIP client certificate and check it reaches the group's keys
  kmipbackup.mongodb.group_kmip:
    group: payments
    client_cert_file: /etc/pki/kmip/payments.pem
    client_cert_password: "{{ vault_payments_kmip_password }}"
    verify: true

- name: Certificate and key in separate files
  kmipbackup.mongodb.group_kmip:
    group: reporting
    client_cert_file: /etc/pki/kmip/reporting.crt
    client_key_file: /etc/pki/kmip/reporting.key

- name: Forget a group
  kmipbackup.mongodb.group_kmip:
    group: reporting
    state: absent
'''

RETURN = r'''
path:
  description: Path of the group's file.
  returned: always
  type: str
  sample: /etc/kmipbackup/groups/payments.yml
identity:
  description: The certificate's common name, the identity the KMIP server knows the group by.
  returned: when O(state=present)
  type: str
  sample: payments
subject:
  description: The certificate's subject.
  returned: when O(state=present)
  type: str
  sample: CN=payments,O=Example
not_after:
  description: End of the certificate's validity (ISO 8601, UTC).
  returned: when O(state=present)
  type: str
  sample: "2027-11-27T18:26:58+00:00"
days_left:
  description: Whole days until the certificate expires.
  returned: when O(state=present)
  type: int
fingerprint_sha256:
  description: SHA-256 fingerprint of the certificate.
  returned: when O(state=present)
  type: str
cert_warnings:
  description: Warnings about the certificate (for example that it expires soon); also shown as Ansible warnings.
  returned: when O(state=present)
  type: list
  elements: str
keys_checked:
  description: With O(verify=true), each master key of the group's jobs and whether the certificate can use it.
  returned: when O(verify=true)
  type: list
  elements: dict
  contains:
    uid:
      description: The master key UID.
      type: str
    jobs:
      description: Jobs that record this key.
      type: list
      elements: str
    ok:
      description: Whether the key is usable.
      type: bool
    kind:
      description: Why not (V(permission_denied), V(not_found), V(not_active)).
      type: str
    reason:
      description: The error message.
      type: str
error_kind:
  description: The kind of error (for example V(permission_denied), V(catalog entry), V(ConfigError), V(mongodb)).
  returned: on failure
  type: str
  sample: permission_denied
'''

import os
import traceback

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import ansible_module
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.ansible_module import KmipBackupModule

try:
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import certs, config, kmip
    IMPORT_ERROR = None
except ImportError:
    IMPORT_ERROR = traceback.format_exc()


def check_keys(kcfg, grp, config_dir):
    """[{uid, jobs, ok, kind, reason}] for every master key of the group's jobs."""
    uids = config.master_key_uids(config_dir, group=grp.group)
    out = []
    with kmip.KmipClient(kcfg, grp) as client:
        client.ping()  # TLS and identity are accepted, even for a group without keys yet
        for uid, err in client.check_keys(sorted(uids)):
            item = {"uid": uid, "jobs": uids[uid], "ok": True, "kind": None, "reason": None}
            if err is not None:
                item.update(ok=False, kind=err.kind, reason=str(err))
            out.append(item)
    return out


def present(module, config_dir):
    """(GroupConfig, result fields): the certificate checked (and its keys, with verify)."""
    p = module.params
    kcfg = config.load_kmip_config(config_dir)
    cert_file = os.path.abspath(p["client_cert_file"])
    key_file = os.path.abspath(p["client_key_file"]) if p["client_key_file"] else None
    info = certs.check_client_certificate(cert_file, key_file, p["client_cert_password"], ca_file=kcfg.ca_file,
                                          warn_days=p["expiry_warning_days"])
    grp = config.GroupConfig(group=p["group"], client_cert_file=cert_file, client_key_file=key_file,
                             client_cert_password=p["client_cert_password"] or None)
    result = info.to_dict()
    result["cert_warnings"] = result.pop("warnings")
    if p["verify"]:
        keys = check_keys(kcfg, grp, config_dir)
        result["keys_checked"] = keys
        bad = [k for k in keys if not k["ok"]]
        if bad:
            named = "; ".join("%s (jobs %s): %s" % (k["uid"], ", ".join(k["jobs"]), k["reason"]) for k in bad)
            module.fail_json(msg="the certificate of group %s (CN=%s) cannot use %d master key(s), nothing written: %s"
                             % (grp.group, info.identity, len(bad), named), error_kind="verification", **result)
    return grp, result


def run(module):
    p = module.params
    config.check_config_dir(p["config_dir"], p["daemon_user"])
    owner = config.file_owner(p["file_owner"], p["file_group"], p["daemon_user"])
    path = config.group_path(p["config_dir"], p["group"])
    before = config.read_raw(path)
    if before is not None and not isinstance(before, dict):
        before = {"unparsable": True}
    result = dict(path=path)
    if p["state"] == "present":
        grp, info = present(module, p["config_dir"])
        after = grp.to_dict()
        changed = before != after
        if changed and not module.check_mode:
            config.save_group(p["config_dir"], grp, p["daemon_user"])
        changed |= config.set_owner(p["config_dir"], ["groups/" + os.path.basename(path)], owner, p["daemon_user"],
                                    module.check_mode)
        result.update(info, warnings=list(info["cert_warnings"]))
    else:
        after = None
        changed = before is not None
        if changed and not module.check_mode:
            config.delete_group(p["config_dir"], p["group"], p["daemon_user"])
    return dict(result, changed=changed, diff=ansible_module.diff(before, after))


def argument_spec():
    return dict(
        ansible_module.client_cert_spec(),
        group=dict(type="str", required=True),
        expiry_warning_days=dict(type="int", default=certs.DEFAULT_WARN_DAYS),
        state=dict(type="str", default="present", choices=["present", "absent"]),
        verify=dict(type="bool", default=False),
    )


SHARED = ("config_dir", "daemon_user", "file_owner")  # the base's shared options this module takes


def main():
    module = KmipBackupModule(argument_spec, shared=SHARED, import_error=IMPORT_ERROR,
                              required_if=[("state", "present", ("client_cert_file",))])
    module.run(run, module)


if __name__ == "__main__":
    main()
