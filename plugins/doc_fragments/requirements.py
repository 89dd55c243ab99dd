# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations


class ModuleDocFragment(object):

    # What every module needs on the host it runs on (requirements/runtime.txt).
    DOCUMENTATION = r'''
options: {}
requirements:
  # requirements/runtime.txt pins them
  - pymongo
  - pykmip
  - cryptography
  - sqlcipher3-binary
  - zstandard
  - PyYAML
  - fastcrc
notes:
  - A failure returns RV(error_kind) with the kind of error (for example V(permission_denied), V(catalog entry),
    V(ConfigError), V(mongodb), V(missing_requirement)) besides C(msg).
'''
