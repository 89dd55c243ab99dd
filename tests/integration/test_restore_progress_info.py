"""restore_progress_info through a real ansible-playbook against real async jobs: its action plugin (what playbooks
run) and its module (run on the host), a running job's progress line, a finished job's result, a failed job's message,
a missing results file, check mode."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RPI = "kmipbackup.mongodb.restore_progress_info"


def test_action_follows_an_async_job(ansible, tmp_path):
    record = str(tmp_path / "progress" / "r.json")
    os.makedirs(os.path.dirname(record), mode=0o700)
    poll = {RPI: {"results_file": "{{ r0.results_file }}", "progress_file": record, "wait": 0}}
    r = ansible.run([
        {"ansible.builtin.command": "sleep 4", "async": 60, "poll": 0},
        poll,                                                                                # running, no record yet
        {"ansible.builtin.copy": {"dest": record, "content": json.dumps({"line": "restore of snapshot s: 12.5 %"})}},
        poll,                                                                                # running, its line
        {RPI: dict(poll[RPI], wait=30)},                                                     # waits for the end
        {"ansible.builtin.command": "false", "async": 60, "poll": 0},
        {RPI: {"results_file": "{{ r5.results_file }}", "progress_file": record, "wait": 30}},  # a failed job
        {RPI: {"results_file": str(tmp_path / "nojob"), "progress_file": record}},            # a wrong file
    ])
    assert r[1]["finished"] is False and r[1]["line"] == "restore starting" and not r[1].get("failed"), r.output
    assert r[3]["finished"] is False and r[3]["line"] == "restore of snapshot s: 12.5 %", r.output
    done = r[4]
    assert done["finished"] is True and done["line"] == "" and 1 < done["waited"] < 30 and done["changed"] is False, r.output
    assert done["result"]["rc"] == 0 and done["result"]["cmd"] == ["sleep", "4"] and "invocation" not in done["result"]
    assert r[6]["failed"] and r[6]["finished"] is True and r[6]["rc"] == 1 and r[6]["waited"] < 30, r.output
    assert r[7]["failed"] and "async results file %s is missing" % (tmp_path / "nojob") in r[7]["msg"], r.output


def test_action_in_check_mode(ansible, tmp_path):
    results = tmp_path / "job"
    results.write_text(json.dumps({"changed": True, "documents": 3}))
    r = ansible.run([{RPI: {"results_file": str(results), "progress_file": str(tmp_path / "none.json")}}], check=True)
    assert r[0]["finished"] is True and r[0]["result"] == {"changed": True, "documents": 3} and not r[0].get("skipped"), r.output


def test_module_reads_the_same_files_on_the_host(tmp_path):
    """The module (the action plugin's stand-in where a module run is wanted) on the same files."""
    results, record = tmp_path / "job", tmp_path / "r.json"
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, ".build", "collections"))

    def run(**args):
        argsfile = tmp_path / "args.json"
        argsfile.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": dict(dict(results_file=str(results), progress_file=str(record), wait=0), **args)}))
        p = subprocess.run([sys.executable, os.path.join(ROOT, "plugins", "modules", "restore_progress_info.py"), str(argsfile)],
                           env=env, capture_output=True, text=True)
        return json.loads(p.stdout)
    results.write_text(json.dumps({"started": True, "finished": False, "ansible_job_id": "1"}))
    record.write_text(json.dumps({"line": "restore of snapshot s: 1 %"}))
    out = run(wait=0.3)
    assert out["finished"] is False and out["line"] == "restore of snapshot s: 1 %" and out["waited"] >= 0.3, out
    results.write_text(json.dumps({"changed": True, "documents": 3, "warnings": ["careful"]}))
    out = run()
    assert out["finished"] is True and out["result"] == {"changed": True, "documents": 3} and "careful" in json.dumps(out["warnings"]), out
    results.write_text(json.dumps({"failed": True, "msg": "Snapshot x is missing", "error_kind": "catalog entry"}))
    out = run()
    assert out["failed"] and out["msg"] == "Snapshot x is missing" and out["error_kind"] == "catalog entry", out
    results.unlink()
    out = run()
    assert out["failed"] and "is missing" in out["msg"], out
