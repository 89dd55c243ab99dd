"""Run tasks through a real `ansible-playbook` process against localhost and return each
task's registered result, plus the full stdout/stderr (for canary checks)."""
import json
import os
import subprocess
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class AnsibleResult:
    def __init__(self, results, stdout, stderr, rc):
        self.results, self.stdout, self.stderr, self.rc = results, stdout, stderr, rc

    def __getitem__(self, i):
        return self.results[i]

    def __len__(self):
        return len(self.results)

    @property
    def output(self):
        return self.stdout + self.stderr

    def results_json(self, invocation=False):
        """The registered results as JSON text, for canary scans of return values. Without `invocation` (Ansible's echo of
        the module arguments the test itself chose) unless asked: secrets must be redacted there too, so scan it for them."""
        return json.dumps(self.results if invocation else _without_invocation(self.results), sort_keys=True)

    def everything(self, invocation=True):
        """stdout, stderr and the results JSON: all the text a run showed or returned."""
        return self.output + "\n" + self.results_json(invocation)


def _without_invocation(value):
    if isinstance(value, dict):
        return {k: _without_invocation(v) for k, v in value.items() if k != "invocation"}
    if isinstance(value, list):
        return [_without_invocation(v) for v in value]
    return value


class AnsibleRunner:
    def __init__(self, workdir):
        self.workdir = workdir
        self.count = 0

    def env(self):
        env = dict(os.environ)
        env.update({
            "ANSIBLE_COLLECTIONS_PATH": os.path.join(ROOT, ".build", "collections"),
            "ANSIBLE_ROLES_PATH": os.path.join(ROOT, "roles"),
            "ANSIBLE_LOCALHOST_WARNING": "false",
            "ANSIBLE_INVENTORY_UNPARSED_WARNING": "false",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_RETRY_FILES_ENABLED": "false",
            "ANSIBLE_HOME": os.path.join(self.workdir, ".ansible"),
            "ANSIBLE_LOCAL_TEMP": os.path.join(self.workdir, ".ansible", "tmp"),
            "ANSIBLE_REMOTE_TEMP": os.path.join(self.workdir, ".ansible", "remote_tmp"),
            "LC_ALL": "C.UTF-8",
        })
        return env

    def inventory(self):
        path = os.path.join(self.workdir, "inventory.ini")
        with open(path, "w") as f:
            f.write("localhost ansible_connection=local ansible_python_interpreter=%s\n"
                    % sys.executable)
        return path

    def run_playbook(self, path, *args, extra_vars=None, timeout=900, verbosity=0):
        """verbosity: 3 adds -vvv (every task's full result, invocation included, in stdout)."""
        cmd = [os.path.join(os.path.dirname(sys.executable), "ansible-playbook"),
               "-i", self.inventory(), path] + list(args) + (["-" + "v" * verbosity] if verbosity else [])
        if extra_vars:
            cmd += ["-e", json.dumps(extra_vars)]
        p = subprocess.run(cmd, env=self.env(), capture_output=True, text=True,
                           timeout=timeout, cwd=self.workdir)
        return p

    def run(self, tasks, check=False, diff=False, extra_vars=None, timeout=900, verbosity=0):
        """Run a list of task dicts on localhost; every task registers its result and
        ignores errors, so a test can assert on failures. Returns AnsibleResult."""
        self.count += 1
        out = os.path.join(self.workdir, "results-%d.json" % self.count)
        play_tasks = []
        names = []
        for i, t in enumerate(tasks):
            t = dict(t)
            t.setdefault("ignore_errors", True)
            t["register"] = "r%d" % i
            names.append("r%d" % i)
            play_tasks.append(t)
        play_tasks.append({
            "name": "Dump results",
            "ansible.builtin.copy": {
                "content": "{{ [%s] | to_json }}" % ", ".join(names),
                "dest": out, "mode": "0600"},
            "check_mode": False, "diff": False})
        play = [{"hosts": "localhost", "gather_facts": False, "tasks": play_tasks}]
        pb = os.path.join(self.workdir, "play-%d.yml" % self.count)
        with open(pb, "w") as f:
            yaml.safe_dump(play, f)
        args = []
        if check:
            args.append("--check")
        if diff:
            args.append("--diff")
        p = self.run_playbook(pb, *args, extra_vars=extra_vars, timeout=timeout, verbosity=verbosity)
        if not os.path.exists(out):
            raise AssertionError("ansible-playbook failed (rc=%s):\n%s\n%s"
                                 % (p.returncode, p.stdout[-5000:], p.stderr[-5000:]))
        with open(out) as f:
            results = json.load(f)
        os.unlink(out)
        return AnsibleResult(results, p.stdout, p.stderr, p.returncode)
