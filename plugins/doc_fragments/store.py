# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
from __future__ import annotations


class ModuleDocFragment(object):

    # A snapshot store in an S3-compatible bucket: every module that takes a store (its folder: the module's own store
    # option) takes this instead.
    DOCUMENTATION = r'''
options:
  object_store:
    description:
      - The snapshot store in an S3-compatible bucket (AWS S3, Ceph, MinIO, SeaweedFS, ...) instead of a folder, with
        the same objects and format as a folder store, under O(object_store.prefix) in O(object_store.bucket).
      - Mutually exclusive with O(store).
      - Without O(object_store.access_key) and O(object_store.secret_key) the standard AWS credential chain is
        used (environment, shared credentials file, instance role).
      - Errors name the endpoint and bucket and say what to do; credentials never appear in results, the job
        configuration's output or the Backup Daemon's status.
    type: dict
    suboptions:
      bucket:
        description:
          - The bucket (3 to 63 lowercase letters, digits, dots and hyphens). It must exist.
        type: str
        required: true
      prefix:
        description:
          - The key prefix below which the store lives (one area per job under it); empty for the bucket's root.
        type: str
        default: ''
      endpoint_url:
        description:
          - The S3 endpoint, V(https://host[:port]) (V(http://) only for a test server). Omit for AWS S3.
        type: str
      region:
        description:
          - The bucket's region (any name for most self-hosted servers); V(us-east-1) when omitted.
        type: str
      addressing_style:
        description:
          - V(path) (most self-hosted servers), V(virtual) (bucket in the host name) or V(auto).
        type: str
        choices: [path, virtual, auto]
        default: path
      ca_bundle:
        description:
          - The PEM file of the CA that signed the endpoint's certificate, when not a public CA.
        type: path
      access_key:
        description:
          - The access key id (an identifier, shown in no output either).
        type: str
      secret_key:
        description:
          - The secret access key. Never logged nor returned.
        type: str
      session_token:
        description:
          - A session token for temporary credentials. Never logged nor returned.
        type: str
      connect_timeout:
        description:
          - Seconds to wait for a connection to the endpoint (each call is retried with backoff).
        type: float
        default: 10
      read_timeout:
        description:
          - Seconds to wait for an answer.
        type: float
        default: 60
'''
