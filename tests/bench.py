"""Benchmark: kmr (M=R=2, default and --combiner) against the fastest single-process pure-Python
Lloyd's iteration we could write, on the same seeded data and initial centroids. Prints a table.

    python tests/bench.py            # the table (tox -e bench)
    python tests/bench.py --big      # also 10M 2-D points with --combiner: time and peak RSS

Data comes from make_points (seeded Gaussian blobs) and is cached in .bench/.
"""

import argparse
import functools
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
CACHE = ROOT / ".bench"
ITERATIONS = 5


def make_points(count, dim, clusters, seed):
    """Seeded Gaussian blobs around `clusters` random centres, in random order."""
    rng = random.Random(seed)
    centres = [[rng.uniform(-100, 100) for _ in range(dim)] for _ in range(clusters)]
    lines = []
    for _ in range(count):
        centre = centres[rng.randrange(clusters)]
        lines.append(",".join(repr(rng.gauss(c, 12.0)) for c in centre))
    return lines


def dataset(count, dim, clusters=8, seed=1):
    """Path of a cached data file and of its init file (the first K distinct points)."""
    CACHE.mkdir(exist_ok=True)
    path = CACHE / f"points-{count}-{dim}-{clusters}-{seed}.txt"
    init = CACHE / f"init-{count}-{dim}-{clusters}-{seed}.txt"
    if not path.exists():
        lines = make_points(count, dim, clusters, seed)
        path.write_text("\n".join(lines) + "\n")
        init.write_text("\n".join(list(dict.fromkeys(lines))[:clusters]) + "\n")
    return path, init


# -- the baseline ----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def baseline_step(clusters, dim):
    """One Lloyd iteration as a single unrolled loop that assigns each point and drops its
    coordinates straight into its cluster's buckets; the means are fsum / count afterwards."""
    xs = [f"x{d}" for d in range(dim)]
    code = ["def step(columns, centroids):",
            f"    ({', '.join('(' + ''.join(f'c{k}_{d}, ' for d in range(dim)) + ')' for k in range(clusters))},)"
            " = centroids",
            f"    buckets = [[[] for _ in range({dim})] for _ in range({clusters})]",
            *[f"    add{d} = [b[{d}].append for b in buckets]" for d in range(dim)],
            f"    for {', '.join(xs)}, in zip(*columns):"]
    for k in range(clusters):
        diffs = "; ".join(f"d{d} = x{d} - c{k}_{d}" for d in range(dim))
        total = " + ".join(f"d{d} * d{d}" for d in range(dim))
        code += [f"        {diffs}; b = {total}; k = 0"] if k == 0 else \
                [f"        {diffs}; d = {total}", f"        if d < b: b = d; k = {k}"]
    code += [f"        add{d}[k](x{d})" for d in range(dim)]
    code += ["    return [tuple(math.fsum(v) / len(v) for v in b) if b[0] else c",
             "            for b, c in zip(buckets, centroids)]"]
    namespace = {"math": math}
    exec("\n".join(code), namespace)
    return namespace["step"]


def baseline(path, init, iterations):
    """Parse once, then Lloyd iterations; returns (centroids, parse s, [iteration s])."""
    started = time.perf_counter()
    with open(path) as lines:
        rows = [tuple(map(float, line.split(","))) for line in lines if line.strip()]
    columns = [list(column) for column in zip(*rows)]
    del rows
    parse = time.perf_counter() - started
    centroids = [tuple(map(float, line.split(","))) for line in Path(init).read_text().split()]
    step = baseline_step(len(centroids), len(columns))
    times = []
    for _ in range(iterations):
        started = time.perf_counter()
        new = step(columns, centroids)
        times.append(time.perf_counter() - started)
        if new == centroids:
            break
        centroids = new
    return centroids, parse, times


# -- kmr, measured in a process of its own ---------------------------------------------------------

def peak_rss_mb(pid="self"):
    """Peak resident set size of a process, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure_kmr(spec):
    """Run one job in this process (the master) and report timings and peak RSS per role."""
    import kmr
    options = kmr.JobOptions(input_path=spec["path"], mappers=2, reducers=2, clusters=spec["clusters"],
                             iterations=spec["iterations"], data_dir=spec["data_dir"], init=spec["init"],
                             combine=spec["combine"], rpc_timeout=600)
    master = kmr.Master(options)
    started = time.perf_counter()
    try:
        result = master.run()
        rss = {role: max(peak_rss_mb(w.process.pid) for w in workers)
               for role, workers in (("mapper", master.mappers), ("reducer", master.reducers))}
    finally:
        master.stop_workers()
    return {"whole": time.perf_counter() - started, "startup": result.startup_seconds,
            "iterations": [s.seconds for s in result.best.iterations], "rss_master": peak_rss_mb(),
            "rss_mapper": rss["mapper"], "rss_reducer": rss["reducer"],
            "centroids": [list(c) for c in result.centroids]}


def run_measured(**spec):
    """measure_kmr in a fresh interpreter, so RSS and start-up are the real thing."""
    spec["data_dir"] = str(CACHE / "run")
    out = subprocess.run([sys.executable, __file__, "--measure", json.dumps(spec)], check=True,
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return json.loads(out.stdout.splitlines()[-1])


def sample_end_to_end():
    """The bundled sample through the real command line (5 spawned workers): wall s, median iteration s."""
    started = time.perf_counter()
    summary = CACHE / "sample.json"
    subprocess.run([sys.executable, str(ROOT / "kmr.py"), "--role", "master", "-M", "3", "-R", "2", "-K", "2",
                    "-n", "20", "--seed", "1", "--data-dir", str(CACHE / "sample"), "--summary", str(summary), "-q"],
                   cwd=ROOT, check=True, capture_output=True)
    wall = time.perf_counter() - started
    return wall, statistics.median(i["seconds"] for i in json.loads(summary.read_text())["iterations"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--big", action="store_true", help="also 10M points, combiner mode")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure_kmr(json.loads(args.measure))))
        return
    wall, per_iteration = sample_end_to_end()
    print(f"bundled sample, end to end with 5 spawned workers: {wall:.2f} s; median iteration {per_iteration * 1000:.1f} ms\n")
    cases = [(10_000, 2), (100_000, 2), (1_000_000, 2), (100_000, 16)]
    if args.big:
        cases.append((10_000_000, 2))
    header = (f"{'N':>10} {'D':>3} {'mode':9} {'start-up':>9} {'iteration':>10} {'whole job':>10} "
              f"{'RSS MiB master/mapper/reducer':>30} {'vs baseline':>12}")
    print(header)
    print("-" * len(header))
    for count, dim in cases:
        path, init = dataset(count, dim)
        if count <= 1_000_000:
            expected, parse, times = baseline(path, init, ITERATIONS)
            base = statistics.median(times)
            print(f"{count:>10} {dim:>3} {'baseline':9} {'-':>9} {base:>9.3f}s {parse + sum(times):>9.2f}s "
                  f"{'(one process)':>30} {1:>11.2f}x")
        modes = ["combiner"] if count > 1_000_000 else ["default", "combiner"]
        for mode in modes:
            got = run_measured(path=str(path), init=str(init), clusters=8, iterations=len(times) if count <= 1_000_000
                               else 3, combine=mode == "combiner")
            if count <= 1_000_000:
                exact = [tuple(c) for c in got["centroids"]] == [tuple(c) for c in expected]
                assert exact, "kmr and the baseline disagree"   # both are Lloyd's with fsum means
            iteration = statistics.median(got["iterations"])
            rss = f"{got['rss_master']:.0f}/{got['rss_mapper']:.0f}/{got['rss_reducer']:.0f}"
            ratio = f"{iteration / base:.2f}x" if count <= 1_000_000 else "-"
            print(f"{count:>10} {dim:>3} {mode:9} {got['startup']:>8.2f}s {iteration:>9.3f}s {got['whole']:>9.2f}s "
                  f"{rss:>30} {ratio:>12}", flush=True)


if __name__ == "__main__":
    main()
