"""Benchmark: kmr against the single-process pure-Python Lloyd script a user would write.

Prints the machine, the commands and one markdown table: every goal of the speed issue with the
measured value, its target and whether it is met.

    python3 tests/bench.py           # the table (tox -e bench); several minutes on 2 cores
    python3 tests/bench.py --quick   # smoke test: every N / 20 and 3 iterations; numbers mean nothing

The baseline parses the whole file once, then runs plain Lloyd (one unrolled assignment loop,
math.fsum means) until the centroids stop moving or the iterations run out.  It runs inside this
process, timed from opening the file to the end of its last iteration, and is the denominator of
every ratio.  kmr runs as the real command line, timed from start to exit (spawning and validation
included); its per-iteration times come from its --summary.  Both start from the same init file
and both are Lloyd with fsum means, so they must run as many iterations and end on the same
centroids bit for bit; the bench fails if they do not.

    (a) whole job: 1M points, D=2, K=8, 10 iterations, --combiner, M=R=2
    (b) median iteration (iteration 1 included) of that job, and of the same job in default mode
    (c) median iteration: 300k points in 64 blobs, K=64, --combiner, M=R=2
    (d) peak memory (VmHWM) of one standalone mapper holding 3M points, --combiner, 3 iterations
    (e) the bundled points.txt: master wall time against 5 running workers, and spawning them
    (3a) speed round three: the whole job at D=64 (200k points, K=10), 2 and 10 iterations, D=16 (500k, K=16), 2,
         and at 8M points, D=2, K=8, 6 iterations (its baseline holds the file in memory: 1.7 GiB)
    (3b) parsing and checking: a mapper's read of a whole D=64 file against the script's parse, per number
    (3c) iteration 1 at D=64 against the baseline's first iteration
    (3f) the sample's floor: interpreter, imports, compiling kmr.py, connecting, each pass
    (3e) no cliff: the (a) file with one subnormal, one huge coordinate, or mixed magnitudes, 3 iterations
    (3g) k-means|| against k-means++: the initialisation of K=64 on the (a) file and the (3a) files

Data (seeded Gaussian blobs) is generated once and cached in .bench/; what the runs write goes to
.bench/work/, emptied at each start.
"""

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KMR = ROOT / "kmr.py"
CACHE = ROOT / ".bench"
WORK = CACHE / "work"
ENV = dict(os.environ, PYTHONPATH=str(ROOT))   # the stubs, whatever the cwd
STARTED = time.perf_counter()
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # loopback, never through $http_proxy


def progress(message):
    """What the bench is doing, on stderr: stdout is only the report."""
    print(f"[{time.perf_counter() - STARTED:6.0f} s] {message}", file=sys.stderr, flush=True)


# -- data --------------------------------------------------------------------------------------------

def make_points(count, dim, clusters, seed):
    """Seeded Gaussian blobs around `clusters` random centres, in random order: one line per point."""
    rng = random.Random(seed)
    centres = [[rng.uniform(-100, 100) for _ in range(dim)] for _ in range(clusters)]
    for _ in range(count):
        centre = centres[rng.randrange(clusters)]
        yield ",".join(repr(rng.gauss(c, 12.0)) for c in centre) + "\n"


def dataset(count, dim, clusters=8, seed=1):
    """Paths of a cached data file and of its init file (its first `clusters` distinct points).

    Written through a temporary name, so an interrupted bench leaves no half file in the cache."""
    CACHE.mkdir(exist_ok=True)
    stem = f"{count}-{dim}-{clusters}-{seed}.txt"
    path, init = CACHE / f"points-{stem}", CACHE / f"init-{stem}"
    if not (path.exists() and init.exists()):
        progress(f"generating {path.name}")
        firsts = {}
        partial = path.with_suffix(".part")
        with open(partial, "w") as out:
            for line in make_points(count, dim, clusters, seed):
                out.write(line)
                if len(firsts) < clusters:
                    firsts.setdefault(line)
        init.write_text("".join(firsts))
        partial.rename(path)
    return path, init


# -- the baseline ------------------------------------------------------------------------------------

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
    """Parse once, then Lloyd until the centroids stop moving (kmr's tol 0) or `iterations` ran.

    Returns (centroids, whole run s, [s of each iteration])."""
    started = time.perf_counter()
    with open(path) as lines:
        rows = [tuple(map(float, line.split(","))) for line in lines if line.strip()]
    columns = [list(column) for column in zip(*rows)]
    del rows
    centroids = [tuple(map(float, line.split(","))) for line in Path(init).read_text().split()]
    step = baseline_step(len(centroids), len(columns))
    times = []
    for _ in range(iterations):
        begun = time.perf_counter()
        new = step(columns, centroids)
        times.append(time.perf_counter() - begun)
        if new == centroids:
            break
        centroids = new
    return centroids, time.perf_counter() - started, times


# -- kmr ---------------------------------------------------------------------------------------------

def shown(args):
    """A master command line as a user would type it in ROOT."""
    words = [os.path.relpath(a, ROOT) if isinstance(a, Path) else str(a) for a in args]
    return " ".join(["python3 kmr.py --role master", *words])


def master(args):
    """Run a master from ROOT to its exit; returns its wall time, s.  A failed run ends the bench
    with kmr's own error."""
    command = [sys.executable, str(KMR), "--role", "master", *map(str, args)]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"bench: kmr failed (exit {done.returncode}): {shown(args)}\n{done.stderr.strip()}")
    return wall


def master_with_page(args):
    """Run a master with --ui 0 while a poller thread reads its page and then /api/job once a second, as a
    browser would; returns (the master's wall time, s, successful polls). The wall time ends when the
    master does, not when the poller next looks."""
    command = [sys.executable, str(KMR), "--role", "master", *map(str, args), "--ui", "0"]
    done, polls = threading.Event(), []
    with tempfile.TemporaryFile("w+") as stderr:

        def poll():
            url = None
            while not done.wait(1.0 if polls else 0.05):
                if url is None:
                    stderr.seek(0)
                    found = re.search(r"job page: (http://\S+)", stderr.read())
                    url = found and found.group(1)
                    paths = ("", "api/job")
                else:
                    paths = ("api/job",)
                for path in paths if url else ():
                    with contextlib.suppress(OSError):
                        DIRECT.open(url + path, timeout=5).read()
                        polls.append(path)

        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        process.wait()
        wall = time.perf_counter() - started
        done.set()
        poller.join()
        if process.returncode or "api/job" not in polls:
            stderr.seek(0)
            sys.exit(f"bench: kmr failed (exit {process.returncode}) or was never polled with --ui: "
                     f"{stderr.read()[-2000:]}")
    return wall, polls.count("api/job")


def job_args(name, path, init, clusters, iterations, mappers=2, reducers=2, flags=("--combiner",)):
    """The master arguments of a measured job; its summary is WORK/name.json."""
    return ["-M", mappers, "-R", reducers, "-K", clusters, "-n", iterations, "--input", path, "--init", init,
            *flags, "-q", "--summary", WORK / f"{name}.json", "--data-dir", WORK / name]


def job(args):
    """Run a job from job_args; returns (wall s, its summary)."""
    wall = master(args)
    return wall, json.loads(Path(args[args.index("--summary") + 1]).read_text())


def check_exact(goal, summary, centroids, times):
    """Both are Lloyd with fsum means from the same centroids: the same iterations, the same
    final centroids bit for bit.  Anything else is a bug in kmr (or in the baseline)."""
    got = [tuple(c) for c in summary["final_centroids"]]
    ran = len(summary["iterations"])
    if ran != len(times) or got != centroids:
        sys.exit(f"bench: {goal}: kmr and the baseline disagree: {ran} vs {len(times)} iterations,\n"
                 f"  kmr      {got}\n  baseline {centroids}")


def checked_job(goal, args, centroids, times):
    """Run a job and check it against the baseline's run of the same file and init: (wall s, summary)."""
    progress(f"kmr {goal}")
    wall, summary = job(args)
    check_exact(goal, summary, centroids, times)
    return wall, summary


def iteration_seconds(summary):
    """Seconds of every iteration of a kmr summary, iteration 1 included."""
    return [i["seconds"] for i in summary["iterations"]]


class Worker:
    """A standalone `kmr.py --role ROLE --port 0` on loopback, and the address it prints first."""

    def __init__(self, role):
        self.role = role
        self.stderr = tempfile.TemporaryFile("w+")   # a file: a worker logs every call, a pipe would fill
        self.process = subprocess.Popen(
            [sys.executable, str(KMR), "--role", role, "--host", "127.0.0.1", "--port", "0", "--data-dir", str(WORK)],
            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        self.address = self.process.stdout.readline().strip()
        if not self.address:
            self.stop()
            self.stderr.seek(0)
            raise RuntimeError(f"a standalone {role} did not start: {self.stderr.read().strip()}")

    def peak_bytes(self):
        """Peak resident set size so far (VmHWM)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM in /proc: not Linux?")

    def stop(self):
        """SIGTERM, then SIGKILL if it has not left after 10 s."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()
        self.stderr.close()


@contextlib.contextmanager
def standalone(mappers, reducers):
    """Standalone workers for a block, and the master flags that name them; all stopped however
    the block ends."""
    workers = []
    try:
        for role, count in (("mapper", mappers), ("reducer", reducers)):
            for _ in range(count):
                workers.append(Worker(role))
        addrs = {role: ",".join(w.address for w in workers if w.role == role) for role in ("mapper", "reducer")}
        yield workers, ["--mapper-addrs", addrs["mapper"], "--reducer-addrs", addrs["reducer"]]
    finally:
        for worker in workers:
            worker.stop()


# -- the report --------------------------------------------------------------------------------------

def machine():
    """CPU model, cores and Python version, for the README to quote."""
    models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
              if line.startswith("model name")]
    return (f"{models[0] if models else platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()} ({platform.python_implementation()})")


def points(count):
    """1000000 -> 1M, 300000 -> 300k."""
    return f"{count // 10**6}M" if count % 10**6 == 0 else f"{count // 1000}k" if count % 1000 == 0 else str(count)


def secs(value):
    """Seconds to three significant digits."""
    return f"{value:.3g} s"


def ratio_row(goal, what, kmr, base, target):
    """A row whose value is kmr / baseline."""
    ratio = kmr / base
    return [goal, what, secs(kmr), secs(base), f"{ratio:.2f}x", f"<= {target:.2f}x", met(ratio <= target)]


def met(ok):
    """The met column; a miss stands out."""
    return "yes" if ok else "**no**"


def table(header, rows):
    """A markdown table, padded so it also reads as plain text; numbers right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    right = [False, False, True, True, True, True, False]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if r else "-") for w, r in zip(widths, right)) + "|"
    return "\n".join([line(header), rule, *map(line, rows)])


# -- the goals: each returns ([(goal, master arguments)], table rows, note lines) ---------------------

def median_iteration(count):
    """How the per-iteration rows say what their median covers."""
    return f"median iteration (all {count}, 1st included)"


def converged(summary):
    """Whether kmr stopped because the centroids stopped moving."""
    return "converged" if summary["converged"] else "not converged"


def goals_a_b(scale, iterations):
    """(a) and (b): 1M points, K=8; one baseline run is the denominator of both."""
    path, init = dataset(10**6 // scale, 2)
    progress(f"baseline on {path.name}")
    centroids, base_whole, base_times = baseline(path, init, iterations)
    a_args = job_args("combiner", path, init, 8, iterations)
    wall, combined = checked_job("(a, b) --combiner", a_args, centroids, base_times)
    b_args = job_args("default", path, init, 8, iterations, flags=())
    _, default = checked_job("(b) default mode", b_args, centroids, base_times)
    progress("kmr (ui): the (a) job with its page polled, and without, twice each")
    plain, paged, polls = [wall], [], 0
    for _ in range(2):
        seconds, polled = master_with_page(a_args)
        check_exact("(ui)", json.loads(Path(a_args[a_args.index("--summary") + 1]).read_text()), centroids, base_times)
        paged.append(seconds)
        polls += polled
        plain.append(master(a_args))
    base = statistics.median(base_times)
    rows = [
        ratio_row("(a)", f"whole job wall time, {points(10**6 // scale)} points, D=2, K=8, {iterations} iterations, "
                  "--combiner, M=R=2", wall, base_whole, 0.80),
        ratio_row("(b)", f"{median_iteration(len(base_times))}, same job, --combiner",
                  statistics.median(iteration_seconds(combined)), base, 0.45),
        ratio_row("(b)", f"{median_iteration(len(base_times))}, same job, default mode",
                  statistics.median(iteration_seconds(default)), base, 0.80),
        ["(ui)", "the (a) job with --ui and a browser-like poller (the page, then /api/job each second), "
         "against without (best of 2 and of 3)", secs(min(paged)), secs(min(plain)),
         f"{min(paged) / min(plain):.2f}x", "<= 1.05x", met(min(paged) <= 1.05 * min(plain))],
    ]
    notes = [f"(a, b) iteration 1 (in the medians): kmr --combiner {secs(iteration_seconds(combined)[0])}, "
             f"default {secs(iteration_seconds(default)[0])}, baseline {secs(base_times[0])}",
             f"(a, b) kmr and the baseline both ran {len(base_times)} of at most {iterations} iterations "
             f"({converged(combined)}) and ended on the same centroids, bit for bit",
             f"(a) kmr start-up (spawning 4 workers, validation): {secs(combined['startup_seconds'])}; the baseline "
             "is timed in-process from opening the file, without a Python start-up",
             f"(ui) {polls} polls of /api/job over the two runs with the page; both ended on the baseline's "
             f"centroids, bit for bit; runs without the page: {', '.join(secs(w) for w in plain)}, with: "
             f"{', '.join(secs(w) for w in paged)}"]
    return [("(a, b)", a_args), ("(b)", b_args)], rows, notes


def goal_c(scale, iterations):
    """(c): 300k points in 64 blobs, K=64."""
    path, init = dataset(300_000 // scale, 2, clusters=64)
    progress(f"baseline on {path.name}")
    centroids, _, base_times = baseline(path, init, iterations)
    args = job_args("k64", path, init, 64, iterations)
    _, summary = checked_job("(c) K=64", args, centroids, base_times)
    row = ratio_row("(c)", f"{median_iteration(len(base_times))}, {points(300_000 // scale)} points in 64 blobs, "
                    "D=2, K=64, --combiner, M=R=2", statistics.median(iteration_seconds(summary)),
                    statistics.median(base_times), 0.25)
    notes = [f"(c) iteration 1 (in the median): kmr {secs(iteration_seconds(summary)[0])}, "
             f"baseline {secs(base_times[0])}",
             f"(c) kmr and the baseline both ran {len(base_times)} of at most {iterations} iterations "
             f"({converged(summary)}) and ended on the same centroids, bit for bit"]
    return [("(c)", args)], [row], notes


def goal_d(scale):
    """(d): 3M points on one standalone mapper; its VmHWM after the job."""
    path, init = dataset(3 * 10**6 // scale, 2)
    progress("kmr on one standalone mapper (d)")
    with standalone(1, 1) as (workers, addrs):
        idle = workers[0].peak_bytes()
        args = job_args("memory", path, init, 8, 3, mappers=1, reducers=1, flags=("--combiner", *addrs))
        _, summary = job(args)
        peak = workers[0].peak_bytes()
    held = summary["parameters"]["points"]
    row = ["(d)", f"mapper peak RSS (VmHWM), {points(held)} points, D=2, on 1 standalone mapper (-M 1 -R 1), "
           "--combiner, 3 iterations", f"{peak / 2**20:.0f} MiB", "-", f"{peak / held:.0f} B/point",
           "<= 100 B/point", met(peak / held <= 100)]
    return [("(d)", args)], [row], [f"(d) the mapper's VmHWM before the job, idle: {idle / 2**20:.0f} MiB"]


def goal_e():
    """(e): the bundled sample, against 5 running workers, then spawning them."""
    args = ["-M", 3, "-R", 2, "-K", 2, "-n", 20, "--seed", 1, "-q", "--data-dir", WORK / "sample"]
    progress("bundled sample against 5 running workers (e)")
    with standalone(3, 2) as (_, addrs):
        running = statistics.median(master(args + addrs) for _ in range(7))
    progress("bundled sample, spawning its workers (e)")
    spawned = statistics.median(master(args) for _ in range(5))
    rows = [["(e)", "bundled points.txt, master wall time, 5 running workers, median of 7", secs(running), "-",
             secs(running), "<= 0.12 s", met(running <= 0.12)],
            ["(e)", "bundled points.txt, master wall time, 5 spawned workers, median of 5", secs(spawned), "-",
             secs(spawned), "<= 0.5 s", met(spawned <= 0.5)]]
    return [("(e)", args + ["[--mapper-addrs A,B,C --reducer-addrs D,E]"])], rows, [small_job_floor(args)]


def small_job_floor(args):
    """(3f) where the sample's time goes against running workers: the process floor (interpreter, imports,
    compiling kmr.py), then the job's passes from its --summary, medians of 7."""
    def median_run(command):
        times = []
        for _ in range(7):
            started = time.perf_counter()
            subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, check=True)
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    ms = {"interpreter (python -c pass)": median_run([sys.executable, "-c", "pass"]),
          "+ gRPC and the stubs imported": median_run([sys.executable, "-c", "import grpc, kmeans_pb2, kmeans_pb2_grpc"]),
          "python kmr.py --help (compiles kmr.py)": median_run([sys.executable, str(KMR), "--help"]),
          "python -m kmr --help (cached bytecode)": median_run([sys.executable, "-m", "kmr", "--help"])}
    progress("the sample's passes against running workers (3f)")
    with standalone(3, 2) as (_, addrs):
        _, summary = job(args + addrs + ["--summary", WORK / "small.json"])
    spans = {}
    for span in summary["timeline"]["iterations"]:
        name = {-1: "Sample pass", 0: "seeding", None: "final SSE pass"}.get(span["iteration"], "iteration")
        spans.setdefault(name, []).append(span["end"] - span["start"])
    passes = [f"{name} {'+'.join(f'{1000 * t:.0f}' for t in times)} ms" for name, times in spans.items()]
    return ("(3f) the sample's floor: " + ", ".join(f"{what} {1000 * t:.0f} ms" for what, t in ms.items()) +
            f"; then connecting to the workers {1000 * summary['startup_seconds']:.0f} ms, " + ", ".join(passes))


def parse_seconds(path, dim, repeats=2):
    """Best of `repeats`: (kmr's read and check of the whole file as one mapper split, the script's parse)."""
    sys.path.insert(0, str(ROOT))
    import kmr
    count, _ = kmr.count_points(str(path))
    pinned = kmr.input_identity(str(path))
    mine = script = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        kmr.read_split(str(path), 0, count, dim, False, pinned)
        mine = min(mine, time.perf_counter() - started)
        started = time.perf_counter()
        with open(path) as lines:
            rows = [tuple(map(float, line.split(","))) for line in lines if line.strip()]
        script = min(script, time.perf_counter() - started)
        del rows
    return mine, script


def goal_round_three(scale):
    """(3a)-(3c): the fixed costs at high dimension (speed round three)."""
    rows, notes, commands = [], [], []
    jobs = ((200_000, 64, 10, 2, 0.60), (200_000, 64, 10, 10, 0.60), (500_000, 16, 16, 2, 0.60),
            (8_000_000, 2, 8, 6, 0.45))   # the last: where two cores must pay for the fixed costs at scale
    for count, dim, clusters, iterations, target in jobs:
        path, init = dataset(count // scale, dim, clusters=clusters)
        progress(f"baseline on {path.name}, {iterations} iterations")
        centroids, base_whole, base_times = baseline(path, init, iterations)
        args = job_args(f"d{dim}", path, init, clusters, iterations)
        wall, summary = checked_job(f"(3a) D={dim}", args, centroids, base_times)
        commands.append((f"(3a) D={dim} n={iterations}", args))
        rows.append(ratio_row("(3a)", f"whole job wall time, {points(count // scale)} points, D={dim}, K={clusters}, "
                              f"{iterations} iterations, --combiner, M=R=2", wall, base_whole, target))
        spans = {span["iteration"]: span["end"] - span["start"] for span in summary["timeline"]["iterations"]}
        notes.append(f"(3a) {points(count // scale)} points, D={dim}, {iterations} iterations: Sample pass {secs(spans.get(-1, 0.0))}, iterations "
                     f"{', '.join(secs(spans[i]) for i in range(1, iterations + 1) if i in spans)}, final SSE pass "
                     f"{secs(spans[None]) if None in spans else 'none'}, start-up {secs(summary['startup_seconds'])}; "
                     f"baseline iterations {', '.join(secs(t) for t in base_times)}")
        if dim == 64 and iterations == 2:
            rows.append(ratio_row("(3c)", f"iteration 1, the same D=64 job, against the baseline's first",
                                  iteration_seconds(summary)[0], base_times[0], 0.55))
            progress("(3b) parsing the D=64 file: kmr's read_split and the script's parse, best of 2")
            mine, script = parse_seconds(path, dim)
            numbers = count // scale * dim
            rows.append(["(3b)", f"parse and check, per number: one mapper reading the whole D=64 file, against the "
                         f"script's tuple(map(float, line.split(',')))", f"{1e9 * mine / numbers:.0f} ns",
                         f"{1e9 * script / numbers:.0f} ns", f"{mine / script:.2f}x", "<= 1.00x", met(mine <= script)])
    return commands, sorted(rows, key=lambda row: row[0]), notes


def variant(path, name, change):
    """A cached copy of a data file with `change(index, line)` applied to every line (None keeps it,
    a string replaces it) and then its extra lines appended; written through a temporary name."""
    target = CACHE / f"{name}-{path.name}"
    if not target.exists():
        partial = target.with_suffix(".part")
        with open(path) as lines, open(partial, "w") as out:
            for index, line in enumerate(lines):
                out.write(change(index, line) or line)
            out.write(change(None, None) or "")
        partial.rename(target)
    return target


def mixed_magnitudes(index, line):
    """Every 1000th line's x becomes 1e-12, and the line 500 after it gains 1e6 on y."""
    if index is None:
        return None
    x, y = line.rstrip("\n").split(",")
    return f"1e-12,{y}\n" if index % 1000 == 0 else f"{x},{float(y) + 1e6!r}\n" if index % 1000 == 500 else None


def goal_cliff(scale):
    """(3e): no cliff: the 1M-point job with one subnormal, one huge coordinate, or mixed magnitudes."""
    path, init = dataset(10**6 // scale, 2)
    files = {"as generated": path,
             "one subnormal line 5e-324,1.5 appended": variant(path, "subnormal", lambda i, line: "5e-324,1.5\n"
                                                              if i is None else None),
             "one huge line 1e150,1.5 appended": variant(path, "huge", lambda i, line: "1e150,1.5\n"
                                                        if i is None else None),
             "mixed magnitudes: every 1000th x is 1e-12, every 1000th y gains 1e6": variant(path, "mixed",
                                                                                           mixed_magnitudes)}
    walls, commands = {}, []
    for number, (what, data) in enumerate(files.items()):
        progress(f"baseline and kmr (3e) on {data.name}")
        centroids, _, base_times = baseline(data, init, 3)
        args = job_args(f"cliff{number}", data, init, 8, 3)
        walls[what] = min(checked_job(f"(3e) {what}", args, centroids, base_times)[0] for _ in range(2))
        commands.append((f"(3e) {number}", args))
    plain = walls.pop("as generated")
    rows = [["(3e)", f"whole job, {points(10**6 // scale)} points, D=2, K=8, 3 iterations, --combiner, M=R=2, {what}, "
             "against the file as generated (best of 2 each)", secs(wall), secs(plain), f"{wall / plain:.2f}x",
             "<= 1.20x", met(wall <= 1.2 * plain)] for what, wall in walls.items()]
    return commands, rows, ["(3e) each file's kmr run ended on the baseline's centroids, bit for bit"]


def goal_parallel_init(scale):
    """(3g): k-means|| against k-means++, K=64: the seeding span of each run, on the (a) file (the goal's
    1M points) and on the (3a) files, where D is higher."""
    commands, rows, notes = [], [], []
    for count, dim, clusters in ((10**6, 2, 8), (500_000, 16, 16), (200_000, 64, 10)):
        path, _ = dataset(count // scale, dim, clusters=clusters)
        seeding, first_sse = {}, {}
        for init in ("k-means++", "k-means||"):
            progress(f"kmr (3g) --init {init}, K=64, D={dim}")
            args = ["-M", 2, "-R", 2, "-K", 64, "-n", 1, "--input", path, "--init", init, "--seed", 1, "--combiner",
                    "-q", "--summary", WORK / "init.json", "--data-dir", WORK / "init"]
            _, summary = job(args)
            seeding[init] = sum(span["end"] - span["start"] for span in summary["timeline"]["iterations"]
                                if span["iteration"] == 0)
            first_sse[init] = summary["iterations"][0]["sse"]
            commands.append((f"(3g) D={dim} {init}", args))
        ratio = seeding["k-means||"] / seeding["k-means++"]
        rows.append(["(3g)", f"initialisation, K=64, {points(count // scale)} points, D={dim}, M=R=2: --init k-means|| "
                     "(5 rounds) against k-means++ (63 rounds)", secs(seeding["k-means||"]), secs(seeding["k-means++"]),
                     f"{ratio:.2f}x", "<= 0.20x", met(ratio <= 0.2)])
        notes.append(f"(3g) D={dim}: SSE after iteration 1: k-means|| {first_sse['k-means||']:.10g}, "
                     f"k-means++ {first_sse['k-means++']:.10g}")
    return commands, rows, notes


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: every N / 20 and 3 iterations (the numbers mean nothing)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench: terminated"))   # run the finally blocks
    scale, iterations = (20, 3) if args.quick else (1, 10)
    load = os.getloadavg()[0]
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    commands, rows, notes = [], [], []
    for goal in (goals_a_b(scale, iterations), goal_c(scale, iterations), goal_d(scale), goal_e(),
                 goal_round_three(scale), goal_cliff(scale), goal_parallel_init(scale)):
        commands += goal[0]
        rows += goal[1]
        notes += goal[2]

    print("kmr benchmark" + (" -- QUICK SMOKE TEST (every N / 20, 3 iterations): the numbers mean nothing"
                             if args.quick else ""))
    print(f"machine: {machine()}; load average {load:.2f} at the start")
    print(f"command: python3 tests/bench.py{' --quick' if args.quick else ''}")
    for goal, arguments in commands:
        print(f"  {goal:7} {shown(arguments)}")
    print()
    print(table(["goal", "what", "kmr", "baseline", "ratio or value", "target", "met"], rows))
    print()
    print("\n".join(f"- {note}" for note in notes))


if __name__ == "__main__":
    main()
