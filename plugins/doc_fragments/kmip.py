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
