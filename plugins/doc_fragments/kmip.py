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
