"""Failures kmr survives: FAILURE replies, SIGKILL in every phase, hung workers, signals to the master.

Every run here must end with exactly the centroids of a fault-free run (the sequential reference
from the same initial centroids) and leave no process behind.
"""

import functools
import os
import re
import shutil
import signal

import pytest

import kmr
from conftest import (DATA, MasterProcess, Throttle, WorkerPool, centroid_lines, read_points, run_kmr,
                      uniform_points, wait_for_line, write_points)

CASE5 = DATA / "case5_points.txt"
CASE5_INIT = DATA / "case5_init.txt"


@functools.lru_cache(maxsize=None)
def reference_of(points_text, init_text, iterations):
    """The fault-free answer, from the sequential reference (cached: several tests share data)."""
    parse = kmr.parse_points
    points = [p for _, p in parse(points_text.splitlines(), "points")]
    init = [p for _, p in parse(init_text.splitlines(), "init")]
    centroids, _ = kmr.kmeans_reference(points, init, iterations)
    return centroid_lines(kmr.format_centroids(centroids))


def reference_lines(points_path, init_path, iterations=100):
    """The fault-free answer for these files."""
    return reference_of(points_path.read_text(), init_path.read_text(), iterations)


def case5_run(tmp_path, *extra):
    """The 100-point case (3 iterations from its init) with M=3, R=2 and extra flags."""
    return run_kmr("--role", "master", "-M", 3, "-R", 2, "-K", 5, "-n", 100, "--input", CASE5,
                   "--init", CASE5_INIT, "--data-dir", tmp_path / "out", "--rpc-timeout", 5, *extra,
                   cwd=tmp_path)


def dump_of(tmp_path):
    return (tmp_path / "out" / "dump.txt").read_text()


def test_failure_replies_are_reassigned_until_the_job_is_done(tmp_path):
    result = case5_run(tmp_path, "--fail-prob", 0.5, "--fail-seed", 4)
    assert result.returncode == 0, result.stderr
    assert centroid_lines(result.stdout) == reference_lines(CASE5, CASE5_INIT)
    dump = dump_of(tmp_path)
    assert dump.count("injected FAILURE") >= 5
    assert "re-assigned after FAILURE" in dump
    assert re.search(r"<- Map +task \d +attempt [2-9] +SUCCESS", dump)


@pytest.mark.parametrize("role, index, phase", [
    ("mapper", 2, "map"),
    ("mapper", 1, "after-map"),
    ("reducer", 1, "reduce"),
    ("reducer", 2, "after-reduce"),
])
def test_worker_killed_in_any_phase_is_respawned_and_its_task_rerun(tmp_path, role, index, phase):
    result = case5_run(tmp_path, "--crash", f"{role}:{index}:{phase}:2")
    assert result.returncode == 0, result.stderr
    assert centroid_lines(result.stdout) == reference_lines(CASE5, CASE5_INIT)
    dump = dump_of(tmp_path)
    assert f"injected crash: SIGKILL {phase} iteration 2" in dump
    assert f"replacing {role} {index}: PID" in dump   # the job may end before the replacement is up
    assert "iteration 2: all 100 points accounted for exactly once" in dump
    if phase == "after-map":   # its output is gone: the map task must run again before Reduce succeeds
        assert re.search(r"iteration 2: re-executing map tasks \[1\]", dump)


def initial_of(stderr):
    """The initial centroids a run logged."""
    found = re.search(r"initial centroids \([^)]*\): (.*)", stderr)[1]
    return [tuple(map(float, c.split(","))) for c in found.split("  ")]


@pytest.mark.parametrize("fail_seed", [1, 2, 3, 4, 5])
def test_failure_drill_at_0_8_on_the_sample_finishes_exactly_with_default_flags(tmp_path, fail_seed):
    """The handout's drill with the failure flag alone: 80 % of all tasks answer FAILURE."""
    shutil.copy(DATA / "case1_points.txt", tmp_path / "points.txt")
    result = run_kmr("--role", "master", "-M", 3, "-R", 2, "-K", 2, "-n", 20, "--fail-prob", 0.8,
                     "--fail-seed", fail_seed, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    expected, _ = kmr.kmeans_reference(read_points(tmp_path / "points.txt"), initial_of(result.stderr), 20)
    assert centroid_lines(result.stdout) == centroid_lines(kmr.format_centroids(expected))
    assert result.stderr.count("injected failure") >= 10


def test_failure_drill_at_0_5_on_20000_points_finishes_exactly_with_default_flags(tmp_path):
    points = write_points(tmp_path / "points.txt", uniform_points(20_000, seed=11))
    result = run_kmr("--role", "master", "-M", 4, "-R", 3, "-K", 5, "-n", 10, "--fail-prob", 0.5,
                     "--fail-seed", 11, "--compact", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    expected, _ = kmr.kmeans_reference(read_points(points), initial_of(result.stderr), 10)
    assert centroid_lines(result.stdout) == centroid_lines(kmr.format_centroids(expected))
    assert "up to 27 tries per task (--fail-prob 0.5: 78 task runs at most" in result.stderr


@pytest.mark.parametrize("fail_prob, runs, budget", [(0.0, 10**6, 4), (0.1, 5, 7), (0.5, 74, 27),
                                                     (0.8, 103, 83), (0.9, 103, 176)])
def test_attempt_budget_is_the_fewest_tries_that_keep_bad_luck_below_one_in_a_million(fail_prob, runs, budget):
    assert kmr.attempt_budget(fail_prob, runs) == budget
    if fail_prob:
        assert runs * fail_prob ** budget < 1e-6
        assert budget == kmr.BASE_ATTEMPTS or runs * fail_prob ** (budget - 1) >= 1e-6


def test_task_runs_counts_the_sample_pass_and_every_map_reduce_and_weigh_task_of_every_restart():
    options = kmr.JobOptions(input_path="p", mappers=4, reducers=3, clusters=5, iterations=10,
                             init="k-means++", restarts=2)
    assert kmr.task_runs(options) == 4 + 2 * (10 * (4 + 3) + (4 + 1) * 4)   # one Sample pass, then per restart


def test_failure_that_does_not_go_away_ends_the_drill_with_one_line(tmp_path):
    """The mappers' output folder turns into a file mid-run (every try of every map task now fails for a
    reason no retry mends): even with the large budget of a 0.9 drill the run ends, exit 1, one line,
    in kmr's words. (An input emptied under the job ends it at once instead: see test_pool.py.)"""
    master, _ = long_run(tmp_path, "--fail-prob", 0.9, "--fail-seed", 2)
    try:
        wait_for_line(tmp_path / "out" / "dump.txt", r"map task ranges", process=master.process)
        shutil.rmtree(tmp_path / "out" / "Mappers", ignore_errors=True)
        (tmp_path / "out" / "Mappers").write_text("not a folder")
        code, stdout, stderr = master.finish(timeout=120)
    finally:
        master.stop()
    assert code == 1 and stdout == "" and "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("kmr: error:")]
    assert len(errors) == 1 and re.search(r"mapper task \d failed 171 times: .*cannot write \S*/out/Mappers/M\d/"
                                          r"partition_\d.txt: Not a directory", errors[0]), errors
    written = tmp_path / "out" / "centroids.txt"
    assert not written.exists() or len(read_points(written)) == 8   # whole iterations only


def test_task_failing_every_attempt_stops_the_run_with_one_line(tmp_path):
    result = case5_run(tmp_path, "--fail-prob", 0.95, "--fail-seed", 1, "--max-attempts", 2)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("kmr: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert re.search(r"(mapper|reducer) task \d+ failed 2 times", errors[0])
    assert not (tmp_path / "out" / "centroids.txt").exists()


MID_RUN = 40   # long_run's iterations for a test that acts mid-run: a second or more left after iteration 3


def long_run(tmp_path, *extra, mappers=3, reducers=2, iterations=12):
    """A master on 60,000 uniform points with K=8 (it converges after 170 iterations), 40-120 ms an
    iteration. 12 end within a second of the first Map: a test that signals a process mid-run asks
    for MID_RUN, so the job is still running when the signal lands."""
    points = write_points(tmp_path / "points.txt", uniform_points(60_000, seed=3))
    init = write_points(tmp_path / "init.txt", read_points(points)[:8])
    expected = reference_lines(points, init, iterations)   # before the master starts: it takes seconds
    master = MasterProcess("--role", "master", "-M", mappers, "-R", reducers, "-K", 8, "-n", iterations,
                           "--init", init, "--data-dir", tmp_path / "out", *extra, cwd=tmp_path)
    return master, expected


def spawned_pid(dump_path, role, index, process):
    """The PID of a worker the master spawned, from its log line."""
    found = wait_for_line(dump_path, rf"spawned {role} {index}, PID (\d+)", process=process)
    return int(found.group(1))


def gone(pid):
    """Whether a process has exited (or is a zombie waiting to be reaped)."""
    return not os.path.exists(f"/proc/{pid}") or "Z" in open(f"/proc/{pid}/stat").read().split()[2]


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGSTOP])
def test_worker_killed_or_hung_mid_run_is_replaced_or_outrun(tmp_path, signum):
    """With spare mappers a killed one is replaced at once; a hung one is outrun by a backup copy
    of its task, found silent by heartbeats, or (hung after its map task) found when a reducer cannot
    fetch its output, whichever comes first."""
    master, expected = long_run(tmp_path, iterations=MID_RUN)
    try:
        dump = tmp_path / "out" / "dump.txt"
        victim = spawned_pid(dump, "mapper", 2, master.process)
        wait_for_line(dump, r"=== iteration 2 ===", process=master.process)
        os.kill(victim, signum)
        code, stdout, stderr = master.finish()
    finally:
        master.stop()
    assert code == 0, stderr
    assert centroid_lines(stdout) == expected
    log = dump.read_text()
    if signum == signal.SIGKILL:
        assert re.search(r"mapper 2 \(127\.0\.0\.1:\d+\) marked dead", log) and "replacing mapper 2: PID" in log
    else:
        assert re.search(r"mapper 2 \(127\.0\.0\.1:\d+\) marked dead \((no heartbeat|its map output could not be "
                         r"fetched)|the backup copy \(attempt \d+ on mapper [13] .* attempt 1 on mapper 2 .* "
                         r"is ignored", log)
    assert gone(victim)


@pytest.mark.parametrize("role", ["mapper", "reducer"])
def test_hung_worker_with_no_spare_is_found_by_heartbeats_and_replaced(tmp_path, role):
    """One mapper and one reducer: no backup can outrun a hung worker, so heartbeats find it (or, for a
    mapper stopped between its Map and the reducer's fetch, the failed fetch), long before the task's
    300 s deadline; it is killed by PID and its replacement redoes the task."""
    master, expected = long_run(tmp_path, mappers=1, reducers=1, iterations=MID_RUN)
    try:
        dump = tmp_path / "out" / "dump.txt"
        victim = spawned_pid(dump, role, 1, master.process)
        wait_for_line(dump, r"=== iteration 3 ===", process=master.process)
        os.kill(victim, signal.SIGSTOP)
        code, stdout, stderr = master.finish(timeout=60)
    finally:
        master.stop()
    assert code == 0, stderr
    assert centroid_lines(stdout) == expected
    log = dump.read_text()
    name = rf"{role} 1 \(127\.0\.0\.1:\d+\)"
    assert re.search(rf"{name} answered no heartbeat for 2 s[\s\S]*{name} marked dead \(no heartbeat for 2 s\)|"
                     rf"{name} marked dead \(its map output could not be fetched\)", log)
    assert f"respawned {role} 1" in log and gone(victim)


def test_standalone_mapper_that_dies_leaves_its_tasks_to_the_others(tmp_path):
    pool = WorkerPool(tmp_path, 3, 2)
    try:
        points = write_points(tmp_path / "points.txt", uniform_points(60_000, seed=3))
        init = write_points(tmp_path / "init.txt", read_points(points)[:8])
        expected = reference_lines(points, init, MID_RUN)
        master = MasterProcess("--role", "master", "-M", 3, "-R", 2, "-K", 8, "-n", MID_RUN, "--init", init,
                               "--rpc-timeout", 2, "--mapper-addrs", ",".join(pool.mappers),
                               "--reducer-addrs", ",".join(pool.reducers), "--data-dir", tmp_path / "out",
                               cwd=tmp_path)
        try:
            wait_for_line(tmp_path / "out" / "dump.txt", r"=== iteration 2 ===", process=master.process)
            pool.workers[1].process.kill()
            code, stdout, stderr = master.finish()
        finally:
            master.stop()
    finally:
        pool.stop()
    assert code == 0, stderr
    assert centroid_lines(stdout) == expected
    assert re.search(r"mapper 2 \(127\.0\.0\.1:\d+\) marked dead", (tmp_path / "out" / "dump.txt").read_text())


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_master_stops_workers_and_keeps_the_last_complete_iteration(tmp_path, signum, code):
    master, _ = long_run(tmp_path, iterations=MID_RUN)
    try:
        dump = tmp_path / "out" / "dump.txt"
        wait_for_line(dump, r"=== iteration 3 ===", process=master.process)
        master.process.send_signal(signum)
        exit_code, stdout, stderr = master.finish()
    finally:
        master.stop()
    assert exit_code == code
    assert stdout == "" and stderr.splitlines()[-1] in ("kmr: error: interrupted", "kmr: error: terminated")
    logged = re.findall(r"iteration (\d+): centroids (.*)", dump.read_text())
    last_iteration, last_centroids = logged[-1]
    assert int(last_iteration) >= 2
    written = (tmp_path / "out" / "centroids.txt").read_text()
    assert written == "".join(c + "\n" for c in last_centroids.split("  "))


def test_standalone_worker_stops_gracefully_on_sigterm(tmp_path):
    pool = WorkerPool(tmp_path, 1, 1)
    pool.stop()
    assert [w.process.returncode for w in pool.workers] == [0, 0]
    assert all(w.process.returncode is not None for w in pool.workers)
    shutil.rmtree(tmp_path / "Mappers", ignore_errors=True)


def test_straggler_is_backed_up_and_the_first_copy_wins_exactly(tmp_path):
    pool = WorkerPool(tmp_path, 3, 2)
    throttle = None
    try:
        points = write_points(tmp_path / "points.txt", uniform_points(300_000, seed=3))
        init = write_points(tmp_path / "init.txt", read_points(points)[:8])
        expected = reference_lines(points, init, 3)
        throttle = Throttle(pool.workers[1].process.pid)   # mapper 2, slow from the start
        result = run_kmr("--role", "master", "-M", 3, "-R", 2, "-K", 8, "-n", 3, "--init", init,
                         "--mapper-addrs", ",".join(pool.mappers), "--reducer-addrs", ",".join(pool.reducers),
                         "--data-dir", tmp_path / "out", cwd=tmp_path)
    finally:
        if throttle:
            throttle.stop()
        pool.stop()
    assert result.returncode == 0, result.stderr
    assert centroid_lines(result.stdout) == expected
    log = (tmp_path / "out" / "dump.txt").read_text()
    assert re.search(r"mapper task 2: backup copy \(attempt 2\) on mapper [13] .*: attempt 1 on mapper 2 .* has run",
                     log)
    assert re.search(r"mapper task 2: the backup copy \(attempt 2 on mapper [13] .*\) finished first; attempt 1 on "
                     r"mapper 2 .* is ignored", log)
    assert "marked dead" not in log   # slow is not dead
