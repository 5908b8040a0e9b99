"""Chaos: many seeded runs with random FAILURE replies, SIGKILLs in random phases, and from outside
killed, hung (SIGSTOP) and slowed (straggling) workers, and a master killed with SIGKILL and resumed.

Every run must end with exactly the fault-free centroids and leave no process behind. The test
prints a table of what it injected and how long recovery took (run `pytest -s tests/test_chaos.py`;
KMR_CHAOS_RUNS sets the number of runs, default 12).
"""

import collections
import datetime
import os
import random
import re
import signal
import time

import kmr
from conftest import MasterProcess, Throttle, WorkerPool, centroid_lines, freeze_at_line, read_points, \
    uniform_points, wait_for_line, write_points

RUNS = int(os.environ.get("KMR_CHAOS_RUNS", "12"))
MAPPERS, REDUCERS, ITERATIONS = 3, 2, 6
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def stamp_of(line):
    """The time a log line was written."""
    return datetime.datetime.strptime(STAMP.match(line).group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def faults_and_recoveries(dump_text, external):
    """[(kind, phase, iteration, seconds until that iteration was complete)] from a run's log."""
    iteration, faults, done = 0, [], {}
    for line in dump_text.splitlines():
        if not STAMP.match(line):
            continue
        if found := re.search(r"\] === iteration (\d+) ===", line):
            iteration = int(found.group(1))
        elif found := re.search(r"\] iteration (\d+): all \d+ points accounted", line):
            done[int(found.group(1))] = stamp_of(line)
        elif found := re.search(r"\] (Map|Reduce) \w+ \d+: injected FAILURE", line):
            faults.append(("FAILURE reply", found.group(1).lower(), iteration, stamp_of(line)))
        elif found := re.search(r"injected crash: SIGKILL ([\w-]+) iteration (\d+)", line):
            faults.append(("SIGKILL", found.group(1), int(found.group(2)), stamp_of(line)))
    for kind, iteration, when in external:
        faults.append((kind, "external", iteration, when))
    return [(kind, phase, it, done[it] - when) for kind, phase, it, when in faults]


def test_chaos_runs_all_end_with_the_fault_free_centroids(tmp_path):
    rng = random.Random(20261123)
    points_path = write_points(tmp_path / "points.txt", uniform_points(6_000, seed=9))
    init_path = write_points(tmp_path / "init.txt", read_points(points_path)[:6])
    expected, _ = kmr.kmeans_reference(read_points(points_path), read_points(init_path), ITERATIONS)
    started = time.monotonic()
    every_fault, recoveries = [], collections.Counter()
    for run in range(RUNS):
        crashes = []
        for _ in range(rng.randint(1, 3)):
            role = rng.choice(["mapper", "reducer"])
            index = rng.randint(1, MAPPERS if role == "mapper" else REDUCERS)
            crashes += ["--crash", f"{role}:{index}:{rng.choice(kmr.CRASH_PHASES)}:{rng.randint(1, ITERATIONS)}"]
        out = tmp_path / f"run{run}"
        command = ["--role", "master", "-M", MAPPERS, "-R", REDUCERS, "-K", 6, "-n", ITERATIONS, "--init", init_path,
                   "--input", points_path, "--data-dir", out, "--fail-prob", rng.choice([0.0, 0.2, 0.4]),
                   "--fail-seed", run, *crashes]
        master = MasterProcess(*command, cwd=tmp_path)
        external, throttle = [], None
        try:
            if rng.random() < 0.8:   # one fault from outside, by PID, at the start of an iteration
                kind = rng.choice(["SIGKILL", "SIGSTOP", "straggler", "master SIGKILL + --resume"])
                role = rng.choice(["mapper", "reducer"])
                index = rng.randint(1, MAPPERS if role == "mapper" else REDUCERS)
                at = rng.randint(2, ITERATIONS)
                dump = out / "dump.txt"
                pid = int(wait_for_line(dump, rf"spawned {role} {index}, PID (\d+),", process=master.process).group(1))
                try:
                    wait_for_line(dump, rf"\] === iteration {at} ===", process=master.process)
                    if kind == "straggler":
                        throttle = Throttle(pid)
                    elif kind.startswith("master"):
                        master.process.send_signal(signal.SIGKILL)
                    else:
                        os.kill(pid, getattr(signal, kind))
                    external.append((f"{kind} from outside" if kind.startswith("SIG") else kind, at, time.time()))
                except (AssertionError, ProcessLookupError):
                    pass   # the run ended first, or the process was already replaced: no fault injected
                if external and kind.startswith("master"):
                    code, _, _ = master.finish(timeout=60)   # its workers leave with it
                    assert code in (-signal.SIGKILL, 0)
                    if code == 0:   # the run ended before the kill landed: no fault injected
                        external.clear()
                    else:
                        master.stop()
                        master = MasterProcess(*command, "--resume", cwd=tmp_path)
            code, stdout, stderr = master.finish(timeout=120)
        finally:
            if throttle:
                throttle.stop()
            master.stop()
        assert code == 0, f"run {run} ({' '.join(crashes)}): {stderr[-2000:]}"
        assert centroid_lines(stdout) == centroid_lines(kmr.format_centroids(expected)), f"run {run}"
        log = (out / "dump.txt").read_text()
        every_fault += faults_and_recoveries(log, external)
        for event in ("re-assigned", "re-executing map tasks", "respawned", "marked dead", "backup copy (",
                      "resumed from"):
            recoveries[event] += log.count(event)
    elapsed = time.monotonic() - started
    by_kind = collections.Counter((kind, phase) for kind, phase, _, _ in every_fault)
    print(f"\nchaos: {RUNS} runs in {elapsed:.1f} s, {len(every_fault)} faults injected, all runs exact")
    for (kind, phase), count in sorted(by_kind.items()):
        worst = max(seconds for k, p, _, seconds in every_fault if (k, p) == (kind, phase))
        print(f"  {kind:26} {phase:13} {count:4}   worst recovery {worst:6.2f} s")
    print("  recoveries: " + ", ".join(f"{event} {count}" for event, count in recoveries.items()))
    assert len(every_fault) >= RUNS   # the drill really injected faults


def test_two_jobs_at_once_on_shared_standalone_workers_survive_faults_exactly(tmp_path):
    """The drill with two jobs at once on one pool of standalone workers, which answer FAILURE to 20 % of
    tasks: with both masters frozen once they hold the workers, a reducer is killed and a mapper hung (SIGSTOP)
    for 3 s; both jobs go on past them and end with their fault-free centroids, and neither job's attempts are
    stale because of the other's."""
    jobs = {"a": (6000, 9, 6), "b": (4000, 10, 4)}
    expected = {}
    for name, (count, seed, clusters) in jobs.items():
        (tmp_path / name).mkdir()
        points = write_points(tmp_path / name / "points.txt", uniform_points(count, seed=seed))
        init = write_points(tmp_path / name / "init.txt", read_points(points)[:clusters])
        final, _ = kmr.kmeans_reference(read_points(points), read_points(init), 12)
        expected[name] = centroid_lines(kmr.format_centroids(final))
    pool = WorkerPool(tmp_path, 3, 3, "--fail-prob", "0.2", "--fail-seed", "3", "--input-root", str(tmp_path))
    masters = {}
    try:
        for name, (_, _, clusters) in jobs.items():   # each frozen as soon as the workers took its job
            masters[name] = MasterProcess(
                "--role", "master", "-M", 3, "-R", 3, "-K", clusters, "-n", 12, "--init", tmp_path / name / "init.txt",
                "--input", tmp_path / name / "points.txt", "--data-dir", tmp_path / name / "Data", "--fail-prob", 0.2,
                "--mapper-addrs", ",".join(pool.mappers), "--reducer-addrs", ",".join(pool.reducers), cwd=tmp_path)
            freeze_at_line(masters[name].process, tmp_path / name / "Data" / "dump.txt", r"workers ready in")
        hung, killed = pool.workers[0].process, pool.workers[5].process   # mapper 1, reducer 3
        hung.send_signal(signal.SIGSTOP)
        killed.send_signal(signal.SIGKILL)
        for master in masters.values():
            master.process.send_signal(signal.SIGCONT)
        time.sleep(3.0)
        hung.send_signal(signal.SIGCONT)
        outcomes = {name: master.finish(timeout=120) for name, master in masters.items()}
    finally:
        for master in masters.values():
            master.process.send_signal(signal.SIGCONT)
            master.stop()
        pool.stop()
    for name, (code, stdout, stderr) in outcomes.items():
        dump = (tmp_path / name / "Data" / "dump.txt").read_text()
        assert code == 0, stderr[-2000:]
        assert centroid_lines(stdout) == expected[name], name
        assert "marked dead" in dump and "stale attempt" not in dump
