#!/usr/bin/env python3
"""Probability that ONE start of Lloyd's K-means reaches the published optimum, per case and start
method ("random": K distinct input points uniformly by line; "kpp": k-means++ D^2 seeding).

Independent pure-stdlib implementation (no numpy, no kmr code in the measurement). Optional
cross-check of the Lloyd loop against kmr.kmeans_reference on a few hundred starts.

Usage: python3 tests/starts.py [--seeds 20000] [--procs 2] [--crosscheck 60]
"""
import argparse
import math
import multiprocessing
import os
import random
import statistics
import sys
import time

sys.dont_write_bytecode = True
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KS = {1: 2, 2: 3, 3: 2, 4: 3, 5: 5}
MAX_ITER = 100
CONF = 0.999
TARGET = 1e-3


def read_points(path):
    points = []
    with open(path, "r", newline="") as fh:
        text = fh.read()
    for line in text.splitlines():          # handles \n, \r\n, no final newline
        line = line.strip()
        if not line:
            continue
        points.append(tuple(float(f.strip()) for f in line.split(",")))
    return points


def read_expected(path):
    with open(path, "r", newline="") as fh:
        return sorted(l.strip() for l in fh.read().splitlines() if l.strip())


def sqdist(p, c):
    s = 0.0
    for a, b in zip(p, c):
        d = a - b
        s += d * d
    return s


def lloyd(points, centroids, max_iter=MAX_ITER):
    """Returns (centroids, iterations). Ties -> lowest index; empty cluster keeps its centroid;
    means = fsum/count; stop when the new centroid list equals the old one exactly."""
    cents = [tuple(c) for c in centroids]
    k = len(cents)
    dim = len(points[0])
    it = 0
    while it < max_iter:
        it += 1
        buckets = [[[] for _ in range(dim)] for _ in range(k)]
        for p in points:
            best, bi = sqdist(p, cents[0]), 0
            for j in range(1, k):
                d = sqdist(p, cents[j])
                if d < best:
                    best, bi = d, j
            b = buckets[bi]
            for dd in range(dim):
                b[dd].append(p[dd])
        new = []
        for j in range(k):
            b = buckets[j]
            n = len(b[0])
            new.append(tuple(math.fsum(col) / n for col in b) if n else cents[j])
        moved = new != cents
        cents = new
        if not moved:
            break
    return cents, it


def start_random(points, k, rng):
    order = list(points)
    rng.shuffle(order)
    chosen = []
    for p in order:
        if p not in chosen:
            chosen.append(p)
            if len(chosen) == k:
                return chosen
    raise ValueError("fewer than K distinct points")


def start_kpp(points, k, rng):
    chosen = [points[rng.randrange(len(points))]]
    d2 = [sqdist(p, chosen[0]) for p in points]
    while len(chosen) < k:
        total = math.fsum(d2)
        if total <= 0.0:
            raise ValueError("fewer than K distinct points")
        target = rng.random() * total
        acc = 0.0
        idx = None
        for i, w in enumerate(d2):
            if w <= 0.0:
                continue
            idx = i                      # last positive-weight index (guards rounding at the top)
            acc += w
            if acc > target:
                break
        c = points[idx]
        chosen.append(c)
        d2 = [min(w, sqdist(p, c)) for w, p in zip(d2, points)]
    return chosen


METHODS = {"random": start_random, "kpp": start_kpp}


def fmt(cents):
    return sorted(",".join(map(repr, c)) for c in cents)


def wilson(hits, n, conf=CONF):
    z = statistics.NormalDist().inv_cdf(0.5 + conf / 2)
    p = hits / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def restarts(p, target=TARGET):
    """Smallest r >= 1 with (1-p)^r < target."""
    if p <= 0:
        return math.inf
    if p >= 1:
        return 1
    r = max(1, math.floor(math.log(target) / math.log1p(-p)))
    while (1 - p) ** r >= target:
        r += 1
    while r > 1 and (1 - p) ** (r - 1) < target:
        r -= 1
    return r


def run_one(job):
    case, method, seeds = job
    points = read_points(f"{DATA}/case{case}_points.txt")
    expected = read_expected(f"{DATA}/case{case}_expected.txt")
    k = KS[case]
    start = METHODS[method]
    hits = 0
    capped = 0
    t0 = time.time()
    for seed in range(seeds):
        rng = random.Random(seed)
        cents, it = lloyd(points, start(points, k, rng))
        if it >= MAX_ITER:
            capped += 1
        if fmt(cents) == expected:
            hits += 1
    return case, method, len(points), hits, seeds, capped, time.time() - t0


def crosscheck(per, data=DATA):
    """Compare lloyd() with kmr.kmeans_reference on `per` starts per case and method."""
    sys.path.insert(0, ROOT)
    try:
        import kmr
    except (ImportError, SystemExit) as exc:
        return f"skipped: import kmr failed ({exc})"
    total = agree = iters_agree = kpp_total = kpp_agree = 0
    for case in KS:
        points = read_points(f"{data}/case{case}_points.txt")
        kpts = [p for _, p in kmr.parse_points(open(f"{data}/case{case}_points.txt", newline="").read().splitlines(), "x")]
        assert kpts == points, f"parse mismatch case {case}"
        for method, start in METHODS.items():
            for seed in range(per):
                init = start(points, KS[case], random.Random(seed))
                mine, my_it = lloyd(points, init)
                ref, ref_it = kmr.kmeans_reference(points, init, MAX_ITER)
                total += 1
                same = [tuple(c) for c in ref] == mine and all(
                    repr(a) == repr(b) for c1, c2 in zip(ref, mine) for a, b in zip(c1, c2))
                agree += same
                iters_agree += (my_it == ref_it)
            # the D^2 draw itself: same random stream through kmr's Split.weigh + weighted_index
            if method == "kpp":
                columns = kmr.to_columns(points, len(points[0]))
                for seed in range(per):
                    rng = random.Random(seed)
                    theirs = [points[rng.randrange(len(points))]]
                    split = kmr.Split(columns)
                    while len(theirs) < KS[case]:
                        split.weigh(seed, theirs, "k-means++")
                        theirs.append(points[kmr.weighted_index(split.weights, rng.random())])
                    kpp_total += 1
                    kpp_agree += theirs == start_kpp(points, KS[case], random.Random(seed))
    return f"{agree}/{total} starts: identical final centroids (bitwise, incl. repr); " \
           f"{iters_agree}/{total} same iteration count; k-means++ draw: {kpp_agree}/{kpp_total} " \
           f"starts identical to kmr's Split.weigh+weighted_index on the same random stream"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=20000)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--crosscheck", type=int, default=60, help="starts per case and method (0: skip)")
    args = ap.parse_args()

    # sanity: CRLF copy of case 1 parses to the same points
    assert read_points(f"{DATA}/case1_points_crlf.txt") == read_points(f"{DATA}/case1_points.txt")
    for case in KS:
        pts = read_points(f"{DATA}/case{case}_points.txt")
        print(f"case{case}: {len(pts)} points, {len(set(pts))} distinct, dim {len(pts[0])}", flush=True)

    t0 = time.time()
    jobs = [(c, m, args.seeds) for c in (5, 2, 4, 3, 1) for m in METHODS]   # big first
    with multiprocessing.Pool(args.procs) as pool:
        results = pool.map(run_one, jobs, chunksize=1)
    results.sort()
    print(f"\nmeasurement wall time {time.time() - t0:.1f}s, seeds per cell {args.seeds}, "
          f"Wilson {CONF:.1%}, target miss prob {TARGET:g}\n")
    print("| case | K | points | method | p | 99.9% interval | r from p | r from p_low |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for case, method, npts, hits, n, capped, secs in results:
        p = hits / n
        lo, hi = wilson(hits, n)
        print(f"| {case} | {KS[case]} | {npts} | {'k-means++' if method == 'kpp' else 'random'} | "
              f"{p:.4f} ({hits}/{n}) | [{lo:.4f}, {hi:.4f}] | {restarts(p)} | {restarts(lo)} |")
    print()
    for case, method, npts, hits, n, capped, secs in results:
        print(f"case{case} {method}: {capped} runs hit the {MAX_ITER}-iteration cap, {secs:.1f}s")
    if args.crosscheck:
        t1 = time.time()
        print(f"\ncross-check vs kmr.kmeans_reference: {crosscheck(args.crosscheck)} "
              f"({time.time() - t1:.1f}s)")


if __name__ == "__main__":
    main()
