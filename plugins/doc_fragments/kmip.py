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

    # The KMIP connection: the same flat kmip_* options in every module that takes them (kmip_config writes them to
    # kmip.yml; snapshot_info and snapshot_restore use them instead of a daemon host's kmip.yml). Which are required
    # depends on the module and is checked by it.
    CONNECTION = r'''
options:
  kmip_servers:
    description:
      - KMIP server host names or IP addresses, tried in this order (failover).
      - An entry may carry its own port as V(host:port) (V([address]:port) for IPv6); otherwise O(kmip_port) applies.
      - The client checks each server's certificate against the host name given here.
    type: list
    elements: str
  kmip_port:
    description: The KMIP port of the O(kmip_servers) that do not name their own.
    type: int
    default: 5696
  kmip_ca_file:
    description: PEM file with the CA certificate(s) that sign the KMIP servers' certificates.
    type: path
  kmip_connect_timeout:
    description: Seconds to wait for a connection and TLS handshake with one server.
    type: float
    default: 5.0
  kmip_protocol:
    description:
      - V(kmip_1_2) wraps data keys with KMIP Encrypt/Decrypt using AES-256-GCM on the server (the master key never leaves
        it; the authenticated-encryption fields need a server that accepts KMIP 1.4 messages for Encrypt and Decrypt).
      - V(legacy) is for KMIP 1.0/1.1 servers; it fetches the master key with KMIP Get and wraps locally with AES key wrap
        with padding (RFC 5649), holding the master key in memory only.
    type: str
    choices: [kmip_1_2, legacy]
    default: kmip_1_2
  kmip_allow_legacy_unwrap:
    description:
      - With O(kmip_protocol=kmip_1_2), also unwrap keys wrapped in the V(legacy) mode (RFC 5649), which fetches the master
        key from the KMIP server with KMIP Get. Set it only while a job still has keys wrapped when its protocol was
        V(legacy) (a rotation rewraps the head key; older snapshots keep their keys).
      - With V(false), such a record in the snapshot store is refused as an integrity error naming the keyring entry, so
        a record planted in the store cannot make the daemon or a restore pull a master key out of the server.
    type: bool
    default: false
'''

    # A KMIP client certificate: the same options in group_kmip (which records it) and the store readers.
    CLIENT_CERT = r'''
options:
  client_cert_file:
    description:
      - PEM file with a KMIP client certificate (optionally followed by intermediate CA certificates) and, unless
        O(client_key_file) is set, its private key.
    type: path
  client_key_file:
    description: PEM file with the private key, when it is not in O(client_cert_file).
    type: path
  client_cert_password:
    description: Password of an encrypted private key.
    type: str
'''

    # KMIP access of the modules that read a job's store (snapshot_restore, snapshot_info), with CONNECTION and
    # CLIENT_CERT: a daemon host's configuration, or everything given as options on a fresh host.
    ACCESS = r'''
options:
  group:
    description:
      - The group whose configured certificate (C(groups/<group>.yml) in O(config_dir)) is used.
      - Defaults to the job's group when the job is declared in O(config_dir). Ignored when O(client_cert_file) is set.
      - Without O(kmip_servers), the KMIP servers come from O(config_dir)'s C(kmip.yml); with them (and O(kmip_ca_file)
        and O(client_cert_file), a certificate provisioned for the snapshot's master keys) no configuration is read,
        as on a fresh host.
    type: str
  config_dir:
    description:
      - The daemon host's configuration folder; read (never written) for the job's store and group, and for the KMIP
        configuration when O(kmip_servers) is not given. Not needed on a fresh host.
    type: path
    default: /etc/kmipbackup
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
        expected is refused. New files and folders take the owner of the folder they are created in, unless the
        module sets an explicit owner (C(file_owner) and C(file_group), where it has them).
    type: str
    default: kmipbackup
'''

    # Explicit ownership of what the configuration-writing modules write (as openssl_privatekey's owner and group).
    FILE_OWNER = r'''
options:
  file_owner:
    description:
      - User (name or uid) that owns O(config_dir) and the file this module writes there (and the folder it is in),
        usually the Backup Daemon's user so that it can read its configuration; set (and reported as a change) when it
        differs, also when the content is unchanged.
      - Must be root, the user the module runs as, or O(daemon_user) (the owners O(config_dir) may have).
      - When not set, new files and folders take the owner of the folder they are created in and nothing is changed
        on existing ones.
    type: str
  file_group:
    description: Group (name or gid) of O(config_dir) and the file this module writes there, as O(file_owner).
    type: str
'''
