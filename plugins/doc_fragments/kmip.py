# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations


class ModuleDocFragment(object):

    # The daemon host's configuration folder, shared by every module that reads or writes it.
    DOCUMENTATION = r'''
options:
  config_dir:
    description:
      - The configuration folder of the daemon host.
      - Holds C(kmip.yml), C(groups/<group>.yml) and C(jobs/<job>.yml); created with mode C(0700), files C(0600).
    type: path
    default: /etc/kmipbackup
'''

    # KMIP access of the modules that read a job's store (snapshot_restore, snapshot_info): a daemon host's
    # configuration, or everything given as options on a fresh host.
    ACCESS = r'''
options:
  group:
    description:
      - The group whose configured certificate (C(groups/<group>.yml) in O(config_dir)) is used.
      - Defaults to the job's group when the job is declared in O(config_dir). Ignored when O(client_cert_file) is set.
    type: str
  kmip_servers:
    description:
      - KMIP servers (host or host:port), tried in order. Give them to work without O(config_dir)'s C(kmip.yml).
      - Requires O(kmip_ca_file) and O(client_cert_file).
    type: list
    elements: str
  kmip_port:
    description: Port of the O(kmip_servers) without an explicit port.
    type: int
    default: 5696
  kmip_ca_file:
    description: PEM file of the CA that signs the KMIP servers' certificates (with O(kmip_servers)).
    type: path
  kmip_protocol:
    description: V(kmip_1_2) (KMIP Encrypt/Decrypt wrapping) or V(legacy) (KMIP 1.0/1.1 servers), with O(kmip_servers).
    type: str
    choices: [kmip_1_2, legacy]
    default: kmip_1_2
  kmip_allow_legacy_unwrap:
    description:
      - With O(kmip_servers) and O(kmip_protocol=kmip_1_2), also unwrap keyring records wrapped in the legacy mode
        (RFC 5649), which fetches the master key from the KMIP server. Only for a job whose keys were wrapped while its
        protocol was V(legacy); otherwise such a record is refused as an integrity error (it is not what this
        configuration writes, so it may be planted to pull the master key out of the server).
      - On a daemon host, C(allow_legacy_unwrap) in C(kmip.yml) (M(kmipbackup.mongodb.kmip_config)) is used instead.
    type: bool
    default: false
  kmip_connect_timeout:
    description: Seconds to wait for a KMIP connection, with O(kmip_servers).
    type: float
    default: 5
  client_cert_file:
    description:
      - PEM file of a KMIP client certificate provisioned for the snapshot's master keys (the group's, a reissued one
        of the same identity, or another one the KMIP server grants), with its key unless O(client_key_file) is set.
    type: path
  client_key_file:
    description: PEM file of the client certificate's private key, when it is not in O(client_cert_file).
    type: path
  client_cert_password:
    description: Password of an encrypted client key.
    type: str
  data_dir:
    description:
      - The daemon host's data folder, read (never written) for the Backup Daemon's own record of the job's last
        snapshot (C(status/<job>.json)); a store whose catalog is older than that record was rolled back, which fails
        as an integrity error. Absent on a fresh host, where only the store's own catalog head is checked.
      - Also where the default store is (C(store) in it) when the job's configuration names none. No directory or
        archive target of M(kmipbackup.mongodb.snapshot_restore) may be, be inside or contain it.
    type: path
    default: /var/lib/kmipbackup
'''

    # Who may own the folders the writing modules write into.
    DAEMON_USER = r'''
options:
  daemon_user:
    description:
      - The Backup Daemon's user (the C(backup_daemon) role's C(backup_daemon_user)), by name or uid.
      - The configuration folder and the data folder this module writes into must be owned by root, by the user the
        module runs as, or by this user, and must not be writable by their group or others; otherwise the module fails
        and changes nothing (it does not tighten them).
      - Inside them, files and folders are opened without following symbolic links; a link where a file or folder is
        expected is refused. New files and folders take the owner of the folder they are created in.
    type: str
    default: kmipbackup
'''
