"""What a restore module run imports (issue 13: the restore playbook's fixed cost): no pymongo before a MongoDB target
is used, no point-in-time code (SQLCipher head) for a snapshot restore, and PyKMIP without its SQLAlchemy-based pie
client, which still imports on demand."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CODE = """
import sys
from ansible_collections.kmipbackup.mongodb.plugins.module_utils import ansible_module, kmip, restore_request
kmip._require()
print(sorted(m for m in ("pymongo", "sqlalchemy", "kmip.pie", "sqlcipher3") if m in sys.modules))
from kmip import enums  # what PyKMIP's own modules import from the package
from kmip.pie import objects  # whoever wants the pie client still gets it
print(enums.Operation.GET.name, objects.SymmetricKey.__name__)
"""


def test_a_restore_module_run_imports_only_what_it_uses():
    p = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=os.path.join(ROOT, ".build", "collections")))
    assert p.returncode == 0, p.stderr
    assert p.stdout.split("\n")[:2] == ["[]", "GET SymmetricKey"], p.stdout
