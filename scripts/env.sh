# Source me: puts the virtualenv and the collection on the paths Ansible and Python use.
_kb_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PATH="$_kb_root/.venv/bin:$PATH"
export ANSIBLE_COLLECTIONS_PATH="$_kb_root/.build/collections"
export PYTHONPATH="$_kb_root/.build/collections${PYTHONPATH:+:$PYTHONPATH}"
export ANSIBLE_PYTHON_INTERPRETER="$_kb_root/.venv/bin/python"
export ANSIBLE_LOCALHOST_WARNING=false ANSIBLE_INVENTORY_UNPARSED_WARNING=false
export LC_ALL=C.UTF-8
unset _kb_root
