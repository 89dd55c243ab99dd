# -*- coding: utf-8 -*-
# Copyright: kmipbackup developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The fixed overhead of the restore playbook (issue 13: under 2 s on a warm host): the wall time of
`ansible-playbook kmipbackup.mongodb.restore` minus the restore's own core time (the module result's "seconds").

A small lab (a PyKMIP server over mutual TLS, SecantusDB for --target mongodb) and a tiny encrypted job (one snapshot
of --docs documents in 4 collections, in a folder store) are set up once; then each round runs the playbook once per
variant, fresh-host style (kmip_servers, kmip_ca_file, client_cert_file), into a new target. It prints, per variant,
the medians over the rounds of the wall time, the core time and their difference, and the median time of each task
(benchmarks/callback_plugins/overhead_probe.py). Run it through benchmarks/run's environment:

  . scripts/env.sh && python benchmarks/playbook_overhead.py --rounds 5
  python benchmarks/playbook_overhead.py --progress both --target mongodb
  python benchmarks/playbook_overhead.py --become  # progress from the background launch and polls (become, ssh passwords)
  # old code against new in the same run: a collection tree of the old code as a second variant
  mkdir -p /tmp/old/ansible_collections/kmipbackup/mongodb && git archive <rev> | tar -x -C $_
  python benchmarks/playbook_overhead.py --variant old=/tmp/old --variant new=.build/collections
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, os.path.join(ROOT, "tools"), os.path.join(ROOT, ".build", "collections")]

JOB = "overhead"


def make_job(work, docs, kmip_port, pki):
    """A folder store with one encrypted snapshot of `docs` generated documents; returns the store's path."""
    from ansible_collections.kmipbackup.mongodb.plugins.module_utils import config, kmip, snapshot, store
    from bench import build_head
    from data import Generator
    head_path = os.path.join(work, "head", "head.db")
    os.makedirs(os.path.dirname(head_path), mode=0o700)
    build_head(head_path, Generator(7), docs)
    kc = config.KmipConfig(servers=["127.0.0.1:%d" % kmip_port], ca_file=pki["ca"])
    root = os.path.join(work, "store")
    with kmip.KmipClient(kc, config.GroupConfig("bench", pki["clients"]["bench"]["pem"])) as c:
        uid = c.create_master_key("overhead-master")
        from ansible_collections.kmipbackup.mongodb.plugins.module_utils import head
        h = head.Head(head_path, bytes(range(32)))
        js = store.JobStore(root, JOB)
        snapshot.take_snapshot(h, js, store.Keys(js, c), JOB, uid, True)
        h.close()
    return root


def median(values):
    values = sorted(values)
    n = len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def run_once(work, collections, ev, n):
    """One ansible-playbook run: {wall, core, tasks, start} (start: launch to the playbook's start, the controller's)."""
    probe = os.path.join(work, "probe-%d.json" % n)
    env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=collections, ANSIBLE_CALLBACK_PLUGINS=os.path.join(HERE, "callback_plugins"),
               ANSIBLE_CALLBACKS_ENABLED="overhead_probe", OVERHEAD_PROBE_FILE=probe, ANSIBLE_HOME=os.path.join(work, ".ansible"),
               ANSIBLE_LOCALHOST_WARNING="false", ANSIBLE_INVENTORY_UNPARSED_WARNING="false", ANSIBLE_RETRY_FILES_ENABLED="false")
    inventory = os.path.join(work, "inventory.ini")
    with open(inventory, "w") as f:
        f.write("localhost ansible_connection=local ansible_python_interpreter=%s\n" % sys.executable)
    cmd = [os.path.join(os.path.dirname(sys.executable), "ansible-playbook"), "-i", inventory, "kmipbackup.mongodb.restore",
           "-e", json.dumps(ev)]
    launched, t0 = time.time(), time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=work)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError("restore.yml failed:\n%s\n%s" % (p.stdout[-4000:], p.stderr[-2000:]))
    with open(probe) as f:
        data = json.load(f)
    os.unlink(probe)
    return {"wall": wall, "core": data["core_seconds"] or 0.0, "tasks": data["tasks"], "start": data["playbook_start"] - launched}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--docs", type=int, default=2000, help="documents in the job (~600 bytes each)")
    ap.add_argument("--target", choices=("dir", "mongodb"), default="dir")
    ap.add_argument("--progress", choices=("on", "off", "both"), default="on", help="restore_progress (default on, as restore.yml)")
    ap.add_argument("--become", action="store_true", help="with ansible_become=true (to the same user): restore.yml's "
                    "progress then comes from the restore launched in the background and polled, not from a side thread")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=COLLECTIONS_PATH",
                    help="a collections path holding ansible_collections/kmipbackup/mongodb (default: this tree's .build)")
    ap.add_argument("--work", help="work folder (default a new one under /var/tmp, removed at the end)")
    ap.add_argument("--tasks", action="store_true", help="print each task's median time too")
    opts = ap.parse_args(argv)
    import kmipbackup_lab as lab
    variants = [v.split("=", 1) for v in opts.variant] or [["this", os.path.join(ROOT, ".build", "collections")]]
    variants = [(name, os.path.abspath(path)) for name, path in variants]
    progress = {"on": [True], "off": [False], "both": [True, False]}[opts.progress]
    work = opts.work or tempfile.mkdtemp(prefix="kb-overhead-", dir="/var/tmp")
    os.makedirs(work, exist_ok=True)
    pids = []
    try:
        pki = lab.make_pki(os.path.join(work, "pki"), ("bench",))
        kmip = lab.start_kmip_server(os.path.join(work, "kmip"), pki)
        pids.append(kmip["pid"])
        mongo = None
        if opts.target == "mongodb":
            mongo = lab.start_mongo_server(os.path.join(work, "mongo"))
            pids.append(mongo["pid"])
        root = make_job(work, opts.docs, kmip["port"], pki)
        base = dict(job=JOB, store=root, kmip_servers=["127.0.0.1:%d" % kmip["port"]], kmip_ca_file=pki["ca"],
                    client_cert_file=pki["clients"]["bench"]["pem"], restore_progress_dir=os.path.join(work, "progress"),
                    ansible_become=opts.become)
        runs = {}
        n = 0
        print("warm-up run, then %d round(s) of %s" % (opts.rounds, ", ".join(
            "%s/progress=%s" % (name, pr) for name, _ in variants for pr in progress)), flush=True)
        for rnd in range(opts.rounds + 1):
            for name, path in variants:
                for pr in progress:
                    n += 1
                    ev = dict(base, restore_progress=pr)
                    if mongo:
                        from data import namespaces
                        dbs = {ns.split(".")[0] for ns, _s, _c in namespaces(opts.docs)}
                        ev.update(target_mongodb={"uri": mongo["uri"]}, rename_databases={db: "r%d%s" % (n, db) for db in dbs})
                    else:
                        ev["target_dir"] = os.path.join(work, "out-%d" % n)
                    r = run_once(work, path, ev, n)
                    if ev.get("target_dir"):
                        shutil.rmtree(ev["target_dir"])
                    if rnd:  # round 0 warms the caches
                        runs.setdefault((name, pr), []).append(r)
        print("load: %s" % subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
        print("%-28s %8s %8s %10s %14s" % ("variant", "wall s", "core s", "overhead s", "to play start"))
        for (name, pr), rs in runs.items():
            print("%-28s %8.2f %8.2f %10.2f %14.2f   (overheads: %s)" % (
                "%s progress=%s" % (name, pr), median([r["wall"] for r in rs]), median([r["core"] for r in rs]),
                median([r["wall"] - r["core"] for r in rs]), median([r["start"] for r in rs]),
                ", ".join("%.2f" % (r["wall"] - r["core"]) for r in rs)))
            if opts.tasks:
                for task in rs[-1]["tasks"]:
                    print("    %6.3f  %s" % (median([r["tasks"].get(task, 0.0) for r in rs]), task))
    finally:
        for pid in pids:
            lab.stop(pid)
        if not opts.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
