#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations

DOCUMENTATION = r'''
module: kmip_config
short_description: Configure the KMIP servers of a backup daemon host
version_added: 0.1.0
description:
  - Writes the daemon host's KMIP server configuration, C(kmip.yml) in O(config_dir), atomically with mode C(0600).
  - The same settings as Ops Manager's C(backup.kmip.server.host), C(backup.kmip.server.port) and C(backup.kmip.server.ca.file).
  - O(kmip_servers) and O(kmip_ca_file) are required when O(state=present); the CA file must exist and hold CA certificates.
  - With O(verify=true), makes a TLS handshake with each server and checks its certificate and host name against
    O(kmip_ca_file) before writing anything; one server failing the check fails the module and writes nothing.
  - Client certificates are per group, see M(kmipbackup.mongodb.group_kmip).
author: kmipbackup developers (@kmipbackup)
extends_documentation_fragment:
  - kmipbackup.mongodb.attributes
  - kmipbackup.mongodb.kmip
  - kmipbackup.mongodb.kmip.CONNECTION
  - kmipbackup.mongodb.kmip.DAEMON_USER
  - kmipbackup.mongodb.kmip.FILE_OWNER
  - kmipbackup.mongodb.requirements
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
  idempotent:
    support: full
options:
  kmip_connect_retries:
    description:
      - Extra rounds through the server list after every server failed with a transient error (refused, reset, timed out),
        with backoff between rounds. Permanent errors (unknown CA, host name mismatch, permission denied) fail at once.
    type: int
    default: 2
  state:
    description: V(present) writes the configuration; V(absent) removes C(kmip.yml).
    type: str
    choices: [present, absent]
    default: present
  verify:
    description:
      - Make a TLS handshake with every server, checking its certificate and host name against O(kmip_ca_file), and report each result.
      - Runs in check mode too (it changes nothing).
    type: bool
    default: false
seealso:
  - module: kmipbackup.mongodb.group_kmip
'''

EXAMPLES = r'''
- name: Configure two KMIP servers, tried in order, and check their certificates
  kmipbackup.mongodb.kmip_config:
    kmip_servers:
      - kmip1.example.com
      - kmip2.example.com
    kmip_port: 5696
    kmip_ca_file: /etc/pki/kmip/ca.pem
    verify: true

- name: A KMIP 1.1 server
  kmipbackup.mongodb.kmip_config:
    kmip_servers: [kmip-old.example.com]
    kmip_ca_file: /etc/pki/kmip/ca.pem
    kmip_protocol: legacy

- name: Remove the KMIP configuration
  kmipbackup.mongodb.kmip_config:
    state: absent
'''

RETURN = r'''
path:
  description: Path of the configuration file.
  returned: always
  type: str
  sample: /etc/kmipbackup/kmip.yml
config:
  description: The configuration as written (empty when O(state=absent)).
  returned: always
  type: dict
  sample:
    servers: [kmip1.example.com, kmip2.example.com]
    port: 5696
    ca_file: /etc/pki/kmip/ca.pem
    connect_timeout: 5.0
    connect_retries: 2
    protocol: kmip_1_2
servers:
  description: Each server with its address and, with O(verify=true), the result of the TLS check.
  returned: when O(state=present)
  type: list
  elements: dict
  contains:
    server:
      description: The entry as configured.
      type: str
    host:
      description: Host name or address.
      type: str
    port:
      description: Port used.
      type: int
    ok:
      description: Whether the certificate and host name checks passed (null without O(verify)).
      type: bool
    reason:
      description: What was checked, or why it failed.
      type: str
    kind:
      description: The kind of failure (V(unreachable), V(hostname_mismatch), V(untrusted_server), V(protocol)).
      type: str
      returned: on failure
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


def configure(module, config_dir, path, before):
    """(changed, configuration after, servers) for state=present."""
    p = module.params
    ca_file = os.path.abspath(p["kmip_ca_file"])
    certs.load_ca_certs(ca_file)
    cfg = config.KmipConfig(servers=p["kmip_servers"], ca_file=ca_file, port=p["kmip_port"],
                            connect_timeout=p["kmip_connect_timeout"], connect_retries=p["kmip_connect_retries"],
                            protocol=p["kmip_protocol"], allow_legacy_unwrap=p["kmip_allow_legacy_unwrap"])
    servers = [{"server": s, "host": h, "port": port, "ok": None, "reason": "not verified (verify=false)"}
               for s, (h, port) in zip(cfg.servers, cfg.addresses(), strict=True)]
    if p["verify"]:
        servers = [kmip.verify_server(cfg, s) for s in cfg.servers]
        bad = [r for r in servers if not r["ok"]]
        if bad:
            module.fail_json(msg="KMIP server verification failed, nothing written: " + "; ".join(r["reason"] for r in bad),
                             servers=servers, path=path, config=before or {}, error_kind="verification")
    after = cfg.to_dict()
    changed = before != after
    if changed and not module.check_mode:
        config.save_kmip_config(config_dir, cfg, p["daemon_user"])
    return changed, after, servers


def run(module):
    p = module.params
    config.check_config_dir(p["config_dir"], p["daemon_user"])
    owner = config.file_owner(p["file_owner"], p["file_group"], p["daemon_user"])
    path = config.kmip_path(p["config_dir"])
    before = config.read_raw(path)
    if before is not None and not isinstance(before, dict):
        before = {"unparsable": True}
    result = dict(path=path)
    if p["state"] == "present":
        changed, after, servers = configure(module, p["config_dir"], path, before)
        changed |= config.set_owner(p["config_dir"], ["kmip.yml"], owner, p["daemon_user"], module.check_mode)
        result.update(config=after, servers=servers)
    else:
        changed, after = before is not None, None
        if changed and not module.check_mode:
            config.delete_kmip_config(p["config_dir"], p["daemon_user"])
        result.update(config={})
    return dict(result, changed=changed, diff=ansible_module.diff(before, after))


def argument_spec():
    return dict(
        ansible_module.kmip_connection_spec(retries=True),
        state=dict(type="str", default="present", choices=["present", "absent"]),
        verify=dict(type="bool", default=False),
    )


SHARED = ("config_dir", "daemon_user", "file_owner")  # the base's shared options this module takes


def main():
    # a user:password@host entry in kmip_servers is refused, and its password never echoed
    module = KmipBackupModule(argument_spec, shared=SHARED, import_error=IMPORT_ERROR,
                              required_if=[("state", "present", ("kmip_servers", "kmip_ca_file"))],
                              secret_values=[lambda p: p["kmip_servers"]])
    module.run(run, module)


if __name__ == "__main__":
    main()
