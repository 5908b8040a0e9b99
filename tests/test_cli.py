"""The real command line, end to end: spawned workers, standalone workers, files a user reads."""

import re
import shutil

import pytest

from conftest import DATA, ROOT, WorkerPool, centroid_lines, run_kmr

SAMPLE_OPTIMUM = ["-0.17500000000000002,8.141666666666667", "9.547368421052632,1.0473684210526315"]
CASE_CLUSTERS = {1: 2, 2: 3, 3: 2, 4: 3, 5: 5}


def test_bundled_sample_gives_the_published_centroids(tmp_path):
    shutil.copy(ROOT / "points.txt", tmp_path / "points.txt")
    result = run_kmr("--role", "master", "-M", 3, "-R", 2, "-K", 2, "-n", 20, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert centroid_lines(result.stdout) == SAMPLE_OPTIMUM
    assert centroid_lines((tmp_path / "Data" / "centroids.txt").read_text()) == SAMPLE_OPTIMUM
    assert (ROOT / "points.txt").read_bytes() == (DATA / "case1_points.txt").read_bytes()


@pytest.mark.parametrize("case", sorted(CASE_CLUSTERS))
@pytest.mark.parametrize("mappers, reducers", [(2, 2), (4, 3)])
def test_published_case_reaches_its_expected_file_from_a_good_init(tmp_path, case, mappers, reducers):
    """caseN_init.txt holds K input points from which Lloyd's algorithm reaches the published optimum."""
    result = run_kmr("--role", "master", "-M", mappers, "-R", reducers, "-K", CASE_CLUSTERS[case],
                     "-n", 100, "--input", DATA / f"case{case}_points.txt",
                     "--init", DATA / f"case{case}_init.txt", "--data-dir", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    expected = centroid_lines((DATA / f"case{case}_expected.txt").read_text())
    assert centroid_lines((tmp_path / "out" / "centroids.txt").read_text()) == expected


def test_every_step_leaves_a_file_to_read(tmp_path):
    shutil.copy(ROOT / "points.txt", tmp_path / "points.txt")
    result = run_kmr("--role", "master", "-M", 3, "-R", 2, "-K", 2, "-n", 20, "--seed", 3, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = tmp_path / "Data"
    partitions = sorted(p.relative_to(data).as_posix() for p in data.glob("Mappers/M*/partition_*.txt"))
    assert partitions == [f"Mappers/M{i}/partition_{j}.txt" for i in (1, 2, 3) for j in (1, 2)]
    pairs = [line.split("\t") for p in data.glob("Mappers/M*/partition_*.txt")
             for line in p.read_text().splitlines()]
    assert len(pairs) == 31 and all(re.fullmatch(r"[01]", key) for key, _ in pairs)
    reducer_lines = [line.split("\t") for j in (1, 2) for line in (data / f"Reducers/R{j}.txt").read_text().splitlines()]
    assert sum(int(count) for _, count, _ in reducer_lines) == 31
    assert sorted(mean for _, _, mean in reducer_lines) == SAMPLE_OPTIMUM
    dump = (data / "dump.txt").read_text()
    assert "seed=3" in dump and "initial centroids (random, seed 3):" in dump
    assert re.search(r"\[mapper 1 \d+\] Map task 1 iteration 1", dump)        # workers write here too
    assert re.search(r"\[reducer 2 \d+\] Reduce partition 2 iteration 1", dump)
    assert re.search(r"\[master \d+\]   <- Map +task 3 +attempt 1 +SUCCESS", dump)
    assert re.search(r"\[master \d+\]   <- GetResult +partition 2 +attempt 1 +SUCCESS", dump)
    assert re.search(r"iteration +\d+ +shift 0 +moved 0 ", dump) and "converged after" in dump
    assert "iteration 1: all 31 points accounted for exactly once" in dump
    assert "no heartbeat" not in dump and "marked dead" not in dump   # a healthy run raises no alarm
    assert dump.count("] iteration 1: centroids") == 1
    assert re.search(r"iteration +1 +shift", result.stderr)   # the console: every call, and a summary line
    assert re.search(r"-> Map +task 1 +attempt 1 +sent", result.stderr)


def initial_centroids(stderr):
    """The initial centroids a run logged."""
    return re.search(r"initial centroids \(random, seed \d+\): (.*)", stderr).group(1)


def test_same_seed_gives_the_same_run_and_the_seed_is_logged(tmp_path):
    shutil.copy(DATA / "case5_points.txt", tmp_path / "points.txt")
    runs = [run_kmr("--role", "master", "-M", 2, "-R", 3, "-K", 5, "--seed", seed, "--data-dir", tmp_path / f"d{i}",
                    cwd=tmp_path) for i, seed in ((1, 11), (2, 11), (5, 12))]
    assert runs[0].returncode == 0 and runs[0].stdout == runs[1].stdout
    assert initial_centroids(runs[0].stderr) == initial_centroids(runs[1].stderr)
    assert runs[2].returncode == 0 and initial_centroids(runs[2].stderr) != initial_centroids(runs[0].stderr)
    unseeded = run_kmr("--role", "master", "-K", 5, "--data-dir", tmp_path / "d3", cwd=tmp_path)
    seed = re.search(r"seed=(\d+)", unseeded.stderr).group(1)
    again = run_kmr("--role", "master", "-K", 5, "--seed", seed, "--data-dir", tmp_path / "d4", cwd=tmp_path)
    assert again.stdout == unseeded.stdout and initial_centroids(again.stderr) == initial_centroids(unseeded.stderr)


def test_tol_stops_early_and_n_caps_iterations(tmp_path):
    shutil.copy(DATA / "case5_points.txt", tmp_path / "points.txt")
    capped = run_kmr("--role", "master", "-K", 5, "-n", 1, "--seed", 1, "--data-dir", tmp_path / "a", cwd=tmp_path)
    assert capped.returncode == 0 and not re.search(r"iteration +2 ", capped.stderr)
    loose = run_kmr("--role", "master", "-K", 5, "--tol", 1e9, "--seed", 1, "--data-dir", tmp_path / "b",
                    cwd=tmp_path)
    assert "converged after 1 iterations" in loose.stderr
    zero = run_kmr("--role", "master", "-K", 5, "-n", 0, "--seed", 1, "--data-dir", tmp_path / "c", cwd=tmp_path)
    assert zero.returncode == 0 and not re.search(r"iteration +1 ", zero.stderr)
    assert centroid_lines(zero.stdout) == centroid_lines((tmp_path / "c" / "centroids.txt").read_text())


def test_standalone_workers_passed_by_address(tmp_path):
    pool = WorkerPool(tmp_path, 2, 2)
    try:
        shutil.copy(ROOT / "points.txt", tmp_path / "points.txt")
        result = run_kmr("--role", "master", "-M", 3, "-R", 2, "-K", 2, "--seed", 5,
                         "--mapper-addrs", ",".join(pool.mappers), "--reducer-addrs", ",".join(pool.reducers),
                         cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert centroid_lines(result.stdout) == SAMPLE_OPTIMUM
        assert "spawned" not in result.stderr
        # the same workers serve a second job
        again = run_kmr("--role", "master", "-M", 4, "-R", 2, "-K", 2, "--seed", 5, "--data-dir", tmp_path / "two",
                        "--mapper-addrs", ",".join(pool.mappers), "--reducer-addrs", ",".join(pool.reducers),
                        cwd=tmp_path)
        assert again.stdout == result.stdout
    finally:
        pool.stop()
    assert all(w.process.returncode == 0 for w in pool.workers)   # SIGTERM is a graceful stop
