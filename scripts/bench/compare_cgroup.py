#!/usr/bin/env python3
"""Run llama.cpp and moeflux on the same GGUF inside the same memory limit,
and print the results side by side.

The limit is a cgroup v1 memory controller
(/sys/fs/cgroup/memory/<name>/memory.limit_in_bytes), which charges the page
cache too, as a machine with that much RAM would. Creating it needs root.

llama.cpp runs through the llama-cpp-python PyPI package (default mmap
loading) via scripts/bench/llama_cpp_bench.py; moeflux via `moeflux bench`.
Both get the same prompt length, generation length and thread count. A run
killed by the cgroup's OOM killer is reported as such.

Usage:
  sudo python3 scripts/bench/compare_cgroup.py -m model.gguf --limit 5G \\
      [-p 16] [-n 16] [-t 2] [--cold | --warm] [--moeflux-args "--mem 4.5G"] [--llama-args "--repack 0"] \\
      [--python /root/venv/bin/python] [--skip-llama]
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
CG = "/sys/fs/cgroup/memory"


def parse_size(s):
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    s = s.strip().lower().rstrip("ib").rstrip("b") if s[-1:].lower() in "bi" else s.strip().lower()
    if s[-1:] in units:
        return int(float(s[:-1]) * units[s[-1]])
    return int(s)


def make_cgroup(name, limit):
    path = os.path.join(CG, name)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "memory.limit_in_bytes"), "w") as f:
        f.write(str(limit))
    # No swap to fall back on either, where the controller accounts it.
    sw = os.path.join(path, "memory.memsw.limit_in_bytes")
    if os.path.exists(sw):
        try:
            with open(sw, "w") as f:
                f.write(str(limit))
        except OSError:
            pass
    return path


def drop_caches():
    subprocess.run(["sync"])
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def run_in(cgroup, cmd, timeout):
    # The shell joins the cgroup, then becomes the command.
    wrapped = f"echo $$ > {shlex.quote(os.path.join(cgroup, 'cgroup.procs'))} && exec {cmd}"
    t0 = time.time()
    p = subprocess.run(["sh", "-c", wrapped], capture_output=True, text=True, timeout=timeout)
    return p, time.time() - t0


def max_usage(cgroup):
    try:
        with open(os.path.join(cgroup, "memory.max_usage_in_bytes")) as f:
            return int(f.read())
    except OSError:
        return None


def reset_max(cgroup):
    try:
        with open(os.path.join(cgroup, "memory.max_usage_in_bytes"), "w") as f:
            f.write("0")
    except OSError:
        pass


def last_json(text):
    start = text.find("{")
    if start < 0:
        return None
    try:
        return json.loads(text[start:])
    except json.JSONDecodeError:
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--limit", default="5G")
    ap.add_argument("-p", "--prompt", type=int, default=16)
    ap.add_argument("-n", "--n-gen", type=int, default=16)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each run")
    ap.add_argument("--warm", action="store_true",
                    help="drop the page cache, run each engine once to warm it (inside the limit), report its second run")
    ap.add_argument("--moeflux", default=os.path.join(ROOT, "target", "release", "moeflux"))
    ap.add_argument("--moeflux-args", default="")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--llama-args", default="", help="extra arguments for llama_cpp_bench.py, e.g. --repack 0")
    ap.add_argument("--timeout", type=int, default=3600)
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("this script creates a memory cgroup and drops caches: run it as root")
    limit = parse_size(a.limit)
    name = f"moeflux-compare-{os.getpid()}"
    cg = make_cgroup(name, limit)
    results = {}
    try:
        runs = []
        if not a.skip_llama:
            runs.append(("llama.cpp", f"{shlex.quote(a.python)} {shlex.quote(os.path.join(HERE, 'llama_cpp_bench.py'))} "
                         f"-m {shlex.quote(a.model)} -p {a.prompt} -n {a.n_gen} -t {a.threads} {a.llama_args}"))
        runs.append(("moeflux", f"{shlex.quote(a.moeflux)} bench -m {shlex.quote(a.model)} -p {a.prompt} -n {a.n_gen} "
                     f"-t {a.threads} --json {a.moeflux_args}"))
        for label, cmd in runs:
            if a.cold or a.warm:
                drop_caches()
            if a.warm:
                run_in(cg, cmd, a.timeout)
            reset_max(cg)
            p, wall = run_in(cg, cmd, a.timeout)
            r = last_json(p.stdout) or {}
            r["exit"] = p.returncode
            r["killed"] = p.returncode in (137, -9)
            r["wall_s"] = round(wall, 1)
            r["cgroup_max_usage"] = max_usage(cg)
            if p.returncode != 0:
                r["stderr_tail"] = p.stderr[-2000:]
            results[label] = r
    finally:
        try:
            os.rmdir(cg)
        except OSError:
            pass
    print(json.dumps({"model": a.model, "limit": limit, "cold": a.cold, "warm": a.warm, "prompt": a.prompt, "n_gen": a.n_gen,
                      "threads": a.threads, "results": results}, indent=1))
    rows = [("engine", "prompt tok/s", "decode tok/s", "cgroup peak", "note")]
    for label, r in results.items():
        note = "KILLED by the cgroup" if r.get("killed") else ("failed" if r.get("exit") else "")
        peak = r.get("cgroup_max_usage")
        rows.append((label, f"{r.get('prompt_tok_s', 0):.2f}", f"{r.get('decode_tok_s', 0):.3f}",
                     f"{peak / 2**30:.2f} GiB" if peak else "?", note))
    for row in rows:
        print("  ".join(f"{c:>16}" for c in row), file=sys.stderr)


if __name__ == "__main__":
    main()
