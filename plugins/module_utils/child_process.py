# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Starting the collection's helper processes: the restore's replay process (pitr_replay) and the daemon's post-image
builder (post_images). Standard library only (no Ansible imports). PRIVATE to the collection.

Each is a fresh interpreter (`python -I -S -c bootstrap(module)`: no site, no user site, no PYTHON* variables) whose
only environment variable is the parent's sys.path, so it imports its module the way the parent did (from PYTHONPATH in
tests, from AnsiballZ's zip in a module run, from the daemon's install); standard input and output are two unbuffered
pipes, standard error goes to /dev/null, and no other descriptor is inherited. Secrets, if any, go over standard input."""
from __future__ import annotations

import errno
import json
import subprocess
import sys

PATH_VARIABLE = "KMIPBACKUP_CHILD_SYS_PATH"  # the parent's sys.path (JSON): the child's only environment variable


def bootstrap(module: str) -> str:
    """What the child of module runs: sys.path as the parent's, then module.main()."""
    return ("import json, os, sys; sys.path[:] = json.loads(os.environ.pop(%r)); "
            "from %s import main; main()" % (PATH_VARIABLE, module))


def spawn(code: str) -> subprocess.Popen:
    """The started child running code (bootstrap()); OSError when it cannot start (strerror says why)."""
    if not sys.executable:
        raise OSError(errno.ENOENT, "no Python interpreter to start it with")
    return subprocess.Popen(  # pylint: disable=consider-using-with  # the caller ends it
        [sys.executable, "-I", "-S", "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, close_fds=True, bufsize=0, env={PATH_VARIABLE: json.dumps(sys.path)})
