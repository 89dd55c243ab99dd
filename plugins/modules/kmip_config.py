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
  - With O(verify=true), makes a TLS handshake with each server and checks its certificate and host name against O(ca_file)
    before writing anything; one server failing the check fails the module and writes nothing.
  - Client certificates are per group, see M(kmipbackup.mongodb.group_kmip).
author: kmipbackup developers (@kmipbackup)
extends_documentation_fragment:
  - kmipbackup.mongodb.attributes
  - kmipbackup.mongodb.kmip
  - kmipbackup.mongodb.kmip.DAEMON_USER
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
  idempotent:
    support: full
options:
  servers:
    description:
      - KMIP server host names or IP addresses, tried in this order (failover).
      - An entry may carry its own port as V(host:port) (V([address]:port) for IPv6); otherwise O(port) applies.
      - The client checks each server's certificate against the host name given here.
      - Required when O(state=present).
    type: list
    elements: str
  port:
    description: The KMIP port of the servers that do not name their own.
    type: int
    default: 5696
  ca_file:
    description:
      - PEM file with the CA certificate(s) that sign the KMIP servers' certificates.
      - Must exist and hold CA certificates. Required when O(state=present).
    type: path
  connect_timeout:
    description: Seconds to wait for a connection and TLS handshake with one server.
    type: float
    default: 5.0
  connect_retries:
    description:
      - Extra rounds through the server list after every server failed with a transient error (refused, reset, timed out),
        with backoff between rounds. Permanent errors (unknown CA, host name mismatch, permission denied) fail at once.
    type: int
    default: 2
  protocol:
    description:
      - V(kmip_1_2) wraps data keys with KMIP Encrypt/Decrypt using AES-256-GCM on the server (the master key never leaves it;
        the authenticated-encryption fields need a server that accepts KMIP 1.4 messages for Encrypt and Decrypt).
      - V(legacy) is for KMIP 1.0/1.1 servers; it fetches the master key with KMIP Get and wraps locally with AES key wrap
        with padding (RFC 5649), holding the master key in memory only.
      - Keys wrapped in the V(legacy) mode (RFC 5649) unwrap under V(kmip_1_2) only with O(allow_legacy_unwrap=true).
    type: str
    choices: [kmip_1_2, legacy]
    default: kmip_1_2
  allow_legacy_unwrap:
    description:
      - With O(protocol=kmip_1_2), also unwrap keys wrapped in the V(legacy) mode (RFC 5649), which fetches the master
        key from the KMIP server with KMIP Get. Set it only while a job still has keys wrapped when its protocol was
        V(legacy) (a rotation rewraps the head key; older snapshots keep their keys).
      - With V(false), such a record in the snapshot store is refused as an integrity error naming the keyring entry, so
        a record planted in the store cannot make the daemon or a restore pull a master key out of the server.
    type: bool
    default: false
  state:
    description: V(present) writes the configuration; V(absent) removes C(kmip.yml).
    type: str
    choices: [present, absent]
    default: present
  verify:
    description:
      - Make a TLS handshake with every server, checking its certificate and host name against O(ca_file), and report each result.
      - Runs in check mode too (it changes nothing).
    type: bool
    default: false
seealso:
  - module: kmipbackup.mongodb.group_kmip
'''

EXAMPLES = r'''
- name: Configure two KMIP servers, tried in order, and check their certificates
  kmipbackup.mongodb.kmip_config:
    servers:
      - kmip1.example.com
      - kmip2.example.com
    port: 5696
    ca_file: /etc/pki/kmip/ca.pem
    verify: true

- name: A KMIP 1.1 server
  kmipbackup.mongodb.kmip_config:
    servers: [kmip-old.example.com]
    ca_file: /etc/pki/kmip/ca.pem
    protocol: legacy

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
'''

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.kmipbackup.mongodb.plugins.module_utils import ansible_module, certs, config, kmip
from ansible_collections.kmipbackup.mongodb.plugins.module_utils.errors import ConfigError


def present(module, config_dir, path, before):
    p = module.params
    if not p["servers"]:
        raise ConfigError("servers is required with state=present: list the KMIP server host names")
    ca_file = os.path.abspath(p["ca_file"])
    certs.load_ca_certs(ca_file)
    cfg = config.KmipConfig(servers=p["servers"], ca_file=ca_file, port=p["port"], connect_timeout=p["connect_timeout"],
                            connect_retries=p["connect_retries"], protocol=p["protocol"],
                            allow_legacy_unwrap=p["allow_legacy_unwrap"])
    servers = [{"server": s, "host": h, "port": port, "ok": None, "reason": "not verified (verify=false)"}
               for s, (h, port) in zip(cfg.servers, cfg.addresses(), strict=True)]
    if p["verify"]:
        servers = [kmip.verify_server(cfg, s) for s in cfg.servers]
        bad = [r for r in servers if not r["ok"]]
        if bad:
            module.fail_json(msg="KMIP server verification failed, nothing written: " + "; ".join(r["reason"] for r in bad),
                             servers=servers, path=path, config=before or {})
    after = cfg.to_dict()
    changed = before != after
    if changed and not module.check_mode:
        config.save_kmip_config(config_dir, cfg, p["daemon_user"])
    return changed, after, servers


def main():
    spec = dict(
        servers=dict(type="list", elements="str"),
        port=dict(type="int", default=config.DEFAULT_PORT),
        ca_file=dict(type="path"),
        connect_timeout=dict(type="float", default=5.0),
        connect_retries=dict(type="int", default=2),
        protocol=dict(type="str", default="kmip_1_2", choices=list(config.PROTOCOLS)),
        allow_legacy_unwrap=dict(type="bool", default=False),
        state=dict(type="str", default="present", choices=["present", "absent"]),
        verify=dict(type="bool", default=False),
    )
    spec.update(ansible_module.config_dir_spec())
    spec.update(ansible_module.daemon_user_spec())
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True,
                           required_if=[("state", "present", ("servers", "ca_file"))])
    ansible_module.hide_userinfo(module, module.params["servers"])  # a user:password@host entry is refused, never echoed
    config_dir = module.params["config_dir"]
    ansible_module.call(module, config.check_config_dir, config_dir, module.params["daemon_user"])
    path = config.kmip_path(config_dir)
    before = ansible_module.call(module, config.read_raw, path)
    if before is not None and not isinstance(before, dict):
        before = {"unparsable": True}
    result = dict(path=path)
    if module.params["state"] == "present":
        changed, after, servers = ansible_module.call(module, present, module, config_dir, path, before)
        result.update(config=after, servers=servers)
    else:
        changed, after = before is not None, None
        if changed and not module.check_mode:
            ansible_module.call(module, config.delete_kmip_config, config_dir, module.params["daemon_user"])
        result.update(config={})
    if module._diff:
        result["diff"] = ansible_module.diff(before, after)
    module.exit_json(changed=changed, **result)


if __name__ == "__main__":
    main()
