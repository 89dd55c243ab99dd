# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations


class ModuleDocFragment(object):

    # Every module (the info modules add INFO_MODULE).
    DOCUMENTATION = r'''
options: {}
attributes:
  action_group:
    description: Use C(group/kmipbackup.mongodb.kmipbackup) in C(module_defaults) to set defaults for this module.
    support: full
    membership:
      - kmipbackup.mongodb.kmipbackup
  check_mode:
    description: Can run in C(check_mode) and return changed status prediction without modifying target.
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in C(check_mode)), when in diff mode. Secrets are redacted.
  idempotent:
    description:
      - When run twice in a row outside check mode, with the same arguments, the second invocation indicates no change.
      - This assumes that the system controlled/queried by the module has not changed in a relevant way.
'''

    # Read-only modules.
    INFO_MODULE = r'''
options: {}
attributes:
  check_mode:
    support: full
    details:
      - This action does not modify state.
    description: Can run in C(check_mode) and return changed status prediction without modifying target.
  diff_mode:
    support: N/A
    details:
      - This action does not modify state.
    description: Will return details on what has changed (or possibly needs changing in C(check_mode)), when in diff mode.
  idempotent:
    support: full
    details:
      - This action does not modify state.
    description:
      - When run twice in a row outside check mode, with the same arguments, the second invocation indicates no change.
'''
