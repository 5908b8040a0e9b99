"""--resume: a master killed with SIGKILL at any moment continues, with the same command plus
--resume, after the last iteration it completed, and ends with exactly the centroids, summary and
plot of a run that was never interrupted. A checkpoint that belongs to another command or input is
refused in one line."""

import json
import os
import re
import signal
import time

import pytest

import kmr
from conftest import (MasterProcess, centroid_lines, read_points, run_kmr, tagged_processes, uniform_points,
                      wait_for_line, write_points)

JOB = ["--role", "master", "-M", 3, "-R", 2, "-K", 8, "-n", 12, "--seed", 5, "--input", "points.txt"]


def without_timings(summary):
    """A summary less what no two runs share: wall times, the timeline, and the folder the input is in."""
    summary = dict(summary)
    del summary["startup_seconds"], summary["timeline"]
    summary["parameters"] = {k: v for k, v in summary["parameters"].items() if k != "input"}
    summary["iterations"] = [{k: v for k, v in stats.items() if k not in ("seconds", "phases")}
                             for stats in summary["iterations"]]
    return summary


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The job run once from start to end: what every resumed run must reproduce."""
    folder = tmp_path_factory.mktemp("whole")
    write_points(folder / "points.txt", uniform_points(60_000, seed=3))
    result = run_kmr(*JOB, "--summary", "s.json", "--plot", "p.svg", "--compact", cwd=folder)
    assert result.returncode == 0, result.stderr
    return folder, result


@pytest.mark.parametrize("kill_at", [0, 3, 7, 12])
def test_master_killed_at_any_iteration_resumes_to_exactly_the_uninterrupted_answer(tmp_path, uninterrupted,
                                                                                    kill_at):
    whole, complete = uninterrupted
    os.link(whole / "points.txt", tmp_path / "points.txt")   # the same file: same size and mtime
    master = MasterProcess(*JOB, "--compact", cwd=tmp_path)
    try:
        dump = tmp_path / "Data" / "dump.txt"
        if kill_at:
            wait_for_line(dump, rf"iteration +{kill_at} +shift", process=master.process)
        else:
            wait_for_line(dump, r"initial centroids", process=master.process)
        master.process.send_signal(signal.SIGKILL)
        master.process.wait(10)
        deadline = time.monotonic() + 5   # spawned workers leave once their master is gone
        while tagged_processes(master.tag) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert tagged_processes(master.tag) == [], "workers outlived their killed master"
    finally:
        master.stop()
    saved = json.loads((tmp_path / "Data" / "checkpoint.json").read_text())
    done = len(saved["current"]["iterations"]) if saved["current"] else 12
    assert done >= kill_at

    resumed = run_kmr(*JOB, "--resume", "--summary", "s.json", "--plot", "p.svg", "--compact", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout == complete.stdout
    points = read_points(tmp_path / "points.txt")
    initial = [tuple(c) for c in json.loads((whole / "s.json").read_text())["initial_centroids"]]
    expected, _ = kmr.kmeans_reference(points, initial, 12)
    assert centroid_lines(resumed.stdout) == centroid_lines(kmr.format_centroids(expected))
    assert without_timings(json.loads((tmp_path / "s.json").read_text())) == \
        without_timings(json.loads((whole / "s.json").read_text()))
    assert (tmp_path / "p.svg").read_text() == (whole / "p.svg").read_text()
    runs_done = len(saved["runs"])   # killed after its last iteration, the run may have ended already
    said = f"resumed from {os.path.join('Data', 'checkpoint.json')}: {runs_done} of 1 runs done"
    assert said in resumed.stderr and said in (tmp_path / "Data" / "dump.txt").read_text()
    ran = [int(n) for n in re.findall(r"iteration +(\d+) +shift", resumed.stderr)]
    assert ran == list(range(done + 1, 13))   # only what was left


def test_resume_of_a_finished_job_gives_its_answer_again(tmp_path, uninterrupted):
    whole, complete = uninterrupted
    again = run_kmr(*JOB, "--resume", "--compact", cwd=whole)
    assert again.returncode == 0, again.stderr
    assert again.stdout == complete.stdout and "1 of 1 runs done" in again.stderr
    assert "=== iteration" not in again.stderr and "shift" not in again.stderr


@pytest.mark.parametrize("change, says", [
    (["-K", 7], "is of another job (K 8 there, 7 here)"),
    (["-M", 4], "is of another job (M 3 there, 4 here)"),
    (["--seed", 6], "is of another job (seed 5 there, 6 here)"),
    ("touch", "changed since"),
    ("no checkpoint", "there is no checkpoint in Data"),
    ("garbage", "is not a kmr checkpoint"),
])
def test_checkpoint_that_does_not_match_is_refused_in_one_line(tmp_path, uninterrupted, change, says):
    whole, _ = uninterrupted
    if change == "touch":   # the same points, written anew: another modification time
        (tmp_path / "points.txt").write_bytes((whole / "points.txt").read_bytes())
    else:
        os.link(whole / "points.txt", tmp_path / "points.txt")
    (tmp_path / "Data").mkdir()
    saved = json.loads((whole / "Data" / "checkpoint.json").read_text())
    saved["job"]["input"] = str(tmp_path / "points.txt")   # this folder's input, else the same job
    if change != "no checkpoint":
        (tmp_path / "Data" / "checkpoint.json").write_text("{not json" if change == "garbage" else json.dumps(saved))
    job = list(JOB)
    if isinstance(change, list):
        flag, value = change
        job[job.index(flag) + 1] = value
    result = run_kmr(*job, "--resume", cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and says in result.stderr, result.stderr
    assert not (tmp_path / "Data" / "centroids.txt").exists()


def test_resume_in_the_middle_of_restarts_with_kmeans_plus_plus_gives_the_uninterrupted_best(tmp_path):
    write_points(tmp_path / "points.txt", uniform_points(20_000, seed=8))
    job = ["--role", "master", "-M", 2, "-R", 2, "-K", 5, "-n", 15, "--seed", 9, "--init", "k-means++",
           "--restarts", 5, "--input", "points.txt", "--compact"]   # 5: killed after run 1, some are left
    whole = run_kmr(*job, "--data-dir", "whole", "--summary", "whole.json", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    master = MasterProcess(*job, "--data-dir", "cut", cwd=tmp_path)
    try:
        wait_for_line(tmp_path / "cut" / "dump.txt", r"run 1 of 5: seed", process=master.process)
        master.process.send_signal(signal.SIGKILL)
        master.process.wait(10)
    finally:
        master.stop()
    resumed = run_kmr(*job, "--data-dir", "cut", "--summary", "cut.json", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert re.search(r"[1-4] of 5 runs done", resumed.stderr), resumed.stderr
    assert resumed.stdout == whole.stdout
    assert without_timings(json.loads((tmp_path / "cut.json").read_text())) == \
        without_timings(json.loads((tmp_path / "whole.json").read_text()))
