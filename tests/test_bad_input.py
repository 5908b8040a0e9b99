"""Bad input through the real command line: one clean error line, the right exit code, nothing written.

Every test runs `python kmr.py ...` as a subprocess (conftest.run_kmr, which also proves that no
process was left behind).  A failure must end in exactly one "kmr: error: ..." line, the last line
of stderr, with no traceback; exit code 2 for usage / input errors, 1 for runtime errors; and
centroids.txt must not be written.

About "one line on stderr": bad input (exit 2) is found before the job logs anything, so its error
line must be all there is.  A runtime failure (exit 1) comes after the master has logged progress
to stderr; those timestamped lines are allowed before the error, anything else (a traceback, an
argparse usage block, gRPC's own log lines) is not.

The positive cases at the end are parsing quirks that must *succeed*; their answer is checked bit
for bit against kmr.kmeans_reference run on points parsed independently (conftest.read_points).
"""

import re
import socket
import time
from pathlib import Path

import pytest

from conftest import DATA, centroid_lines, read_points, run_kmr

import kmr

LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d  ")   # kmr's console log lines
RPC_TIMEOUT = 5
HANG_GUARD = 30   # seconds; a run that gets near this is hanging, not slow


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------


def write(folder, name, text):
    """Write a small input file (bytes exactly as given: no newline translation) and return its name."""
    (Path(folder) / name).write_bytes(text.encode())
    return name


def master(tmp_path, *args, timeout=120):
    """Run a master in tmp_path with its own data dir (tmp_path/out) and a short RPC deadline."""
    return run_kmr("--role", "master", "--data-dir", tmp_path / "out", "--rpc-timeout", RPC_TIMEOUT,
                   *args, cwd=tmp_path, timeout=timeout)


def error_line(result):
    """The one 'kmr: error:' line of a failed run."""
    return [line for line in result.stderr.splitlines() if line.startswith("kmr: error:")][-1]


def assert_clean_error(result, code, only_line=None):
    """One error line, last on stderr, no traceback, the expected exit code.

    Bad input (exit 2) is found before the job logs anything, so the error line must be all there
    is; a runtime failure (exit 1) may follow kmr's own timestamped progress lines.
    """
    if only_line is None:
        only_line = code == 2
    stderr = result.stderr
    lines = stderr.splitlines()
    assert "Traceback" not in stderr, f"traceback on stderr:\n{stderr}"
    errors = [line for line in lines if line.startswith("kmr: error:")]
    assert len(errors) == 1, f"expected exactly one 'kmr: error:' line, got {len(errors)}:\n{stderr}"
    assert lines[-1] == errors[0], f"the error line is not the last line of stderr:\n{stderr}"
    if only_line:
        assert len(lines) == 1, f"expected exactly one line on stderr, got {len(lines)}:\n{stderr}"
    else:
        noise = [line for line in lines[:-1] if not LOG_LINE.match(line)]
        assert noise == [], f"stderr has lines that are neither kmr log lines nor the error: {noise}"
    assert result.returncode == code, \
        f"exit code {result.returncode}, expected {code}; stderr:\n{stderr}"


def assert_no_centroids(tmp_path):
    """A failed run wrote no centroids.txt (neither in its --data-dir nor in a default Data/)."""
    assert not (tmp_path / "out" / "centroids.txt").exists()
    assert not (tmp_path / "Data" / "centroids.txt").exists()


def free_port():
    """A port nobody listens on (bound to 127.0.0.1:0, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def read_centroid_file(path):
    """centroids.txt as a list of float tuples, in file order."""
    return [tuple(map(float, line.split(","))) for line in Path(path).read_text().splitlines()]


def assert_success_matches_reference(tmp_path, result, points_file, init_file, iterations=100):
    """Exit 0, centroids.txt written and printed, equal bit for bit to the sequential reference."""
    assert result.returncode == 0, f"run failed:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    written = tmp_path / "out" / "centroids.txt"
    assert written.exists(), "a successful run must write centroids.txt"
    assert written.read_text() == result.stdout, "stdout and centroids.txt disagree"
    expected, _ = kmr.kmeans_reference(read_points(points_file), read_points(init_file), iterations)
    assert read_centroid_file(written) == expected


# ---------------------------------------------------------------------------------------------------
# the input file: missing, unreadable, empty
# ---------------------------------------------------------------------------------------------------


def test_missing_input_file_is_named(tmp_path):
    """A typo in --input must say which file, not crash on open()."""
    result = master(tmp_path, "--input", "no_such_points.txt")
    assert_clean_error(result, 2)
    assert "no_such_points.txt" in error_line(result)
    assert_no_centroids(tmp_path)


def test_directory_as_input_is_unreadable_input(tmp_path):
    """An input that cannot be read (a directory: fails for root too) is an input error."""
    (tmp_path / "points_dir").mkdir()
    result = master(tmp_path, "--input", "points_dir")
    assert_clean_error(result, 2)
    assert "points_dir" in error_line(result)
    assert_no_centroids(tmp_path)


@pytest.mark.parametrize("text", [
    pytest.param("", id="empty-file"),
    pytest.param("\n\n   \n\t\n\r\n", id="only-blank-lines"),
])
def test_input_without_points_is_rejected(tmp_path, text):
    """No points at all is an input error, not a division by zero somewhere later."""
    name = write(tmp_path, "points.txt", text)
    result = master(tmp_path, "--input", name)
    assert_clean_error(result, 2)
    assert "points.txt" in error_line(result)
    assert_no_centroids(tmp_path)


# ---------------------------------------------------------------------------------------------------
# bad lines: the message names file:line and what is wrong
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, line, bad", [
    pytest.param("1,2\n3,4\n5,oops\n", 3, "oops", id="word-in-a-field"),
    pytest.param("1,2\n\n5,oops\n", 3, "oops", id="blank-line-before-still-counts"),
    pytest.param("1,2\n   \n\n7;8\n", 4, "7;8", id="whitespace-lines-before-still-count"),
    pytest.param("1,2\n3,\n", 2, "''", id="trailing-comma"),
])
def test_malformed_line_names_its_line_number(tmp_path, text, line, bad):
    """The user must be able to go straight to the bad line: 'points.txt:N:' and the bad text."""
    name = write(tmp_path, "points.txt", text)
    result = master(tmp_path, "--input", name)
    assert_clean_error(result, 2)
    message = error_line(result)
    assert f"points.txt:{line}:" in message
    assert bad in message
    assert_no_centroids(tmp_path)


@pytest.mark.parametrize("text, line", [
    pytest.param("1,2\n3,4,5\n", 2, id="3-after-2"),
    pytest.param("1,2\n\n3,4\n\n6\n", 5, id="1-after-2-with-blank-lines"),
])
def test_mixed_dimensions_name_the_line(tmp_path, text, line):
    """All points share one dimension; the first line that breaks it is named."""
    name = write(tmp_path, "points.txt", text)
    result = master(tmp_path, "--input", name)
    assert_clean_error(result, 2)
    assert f"points.txt:{line}:" in error_line(result)
    assert_no_centroids(tmp_path)


@pytest.mark.parametrize("text, line, shown", [
    pytest.param("1,2\nnan,3\n", 2, "nan", id="nan"),
    pytest.param("1,2\n3,4\nNaN,3\n", 3, "nan", id="NaN-text"),
    pytest.param("inf,1\n", 1, "inf", id="inf"),
    pytest.param("1,2\n\n1,-inf\n", 3, "-inf", id="minus-inf"),
    pytest.param("1,2\n1e400,0\n", 2, "inf", id="overflow-to-inf"),
    pytest.param("1,2\n1e200,0\n", 2, "1e+200", id="too-large"),
])
def test_non_finite_coordinate_names_the_line(tmp_path, text, line, shown):
    """NaN / inf would poison every centroid silently; they must be refused where they appear."""
    name = write(tmp_path, "points.txt", text)
    result = master(tmp_path, "--input", name)
    assert_clean_error(result, 2)
    message = error_line(result)
    assert f"points.txt:{line}:" in message
    assert shown in message.lower()
    assert_no_centroids(tmp_path)


# ---------------------------------------------------------------------------------------------------
# flags
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, mentions", [
    pytest.param(["-K", "0"], "-K", id="K-zero"),
    pytest.param(["-K", "-3"], "-K", id="K-negative"),
    pytest.param(["-M", "0"], "-M", id="M-zero"),
    pytest.param(["-M", str(kmr.MAX_WORKERS + 1)], "-M", id="M-above-MAX_WORKERS"),
    pytest.param(["-R", "0"], "-R", id="R-zero"),
    pytest.param(["-n", "-1"], "-n", id="n-negative"),
    pytest.param(["--tol", "-0.5"], "--tol", id="tol-negative"),
    pytest.param(["--tol", "nan"], "--tol", id="tol-nan"),
    pytest.param(["--tol", "inf"], "--tol", id="tol-inf"),
    pytest.param(["--no-such-flag"], "--no-such-flag", id="unknown-flag"),
    pytest.param(["-K", "two"], "'two'", id="K-not-an-integer"),
    pytest.param(["-M", "2.5"], "'2.5'", id="M-not-an-integer"),
])
def test_bad_flag_is_one_line_usage_error(tmp_path, args, mentions):
    """Argument errors: exactly one line (no argparse usage block), exit 2, naming the flag/value."""
    name = write(tmp_path, "points.txt", "1,2\n3,4\n5,6\n7,8\n")
    result = master(tmp_path, "--input", name, *args)
    assert_clean_error(result, 2, only_line=True)
    assert mentions in error_line(result)
    assert_no_centroids(tmp_path)


def test_K_larger_than_distinct_points_mentions_distinct(tmp_path):
    """3 lines but only 2 distinct points cannot make 3 clusters; counting lines is not enough."""
    name = write(tmp_path, "points.txt", "1,1\n2,2\n1,1\n")
    result = master(tmp_path, "--input", name, "-K", "3")
    assert_clean_error(result, 2)
    assert "distinct" in error_line(result)
    assert_no_centroids(tmp_path)


# ---------------------------------------------------------------------------------------------------
# --init
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init_text, mentions", [
    pytest.param("1,1\n", "1 centroids", id="too-few-centroids"),
    pytest.param("1,1\n2,2\n3,3\n", "3 centroids", id="too-many-centroids"),
    pytest.param("1,1,1\n2,2,2\n", "3 coordinates", id="wrong-dimension"),
    pytest.param("1,1\n\nbad,2\n", "init.txt:3:", id="malformed-line-named"),
    pytest.param("1,1\n2,2,2\n", "init.txt:2:", id="mixed-dimensions-named"),
    pytest.param("", "0 centroids", id="empty-file"),
])
def test_bad_init_file_is_rejected(tmp_path, init_text, mentions):
    """--init must hold exactly K points of the input's dimension, parsed as strictly as the input."""
    points = write(tmp_path, "points.txt", "1,1\n2,2\n8,8\n9,9\n")
    init = write(tmp_path, "init.txt", init_text)
    result = master(tmp_path, "--input", points, "-K", "2", "--init", init)
    assert_clean_error(result, 2)
    message = error_line(result)
    assert "init.txt" in message
    assert mentions in message
    assert_no_centroids(tmp_path)


def test_missing_init_file_is_named(tmp_path):
    """A typo in --init is an input error naming the file."""
    points = write(tmp_path, "points.txt", "1,1\n2,2\n8,8\n9,9\n")
    result = master(tmp_path, "--input", points, "-K", "2", "--init", "no_such_init.txt")
    assert_clean_error(result, 2)
    assert "no_such_init.txt" in error_line(result)
    assert_no_centroids(tmp_path)


# ---------------------------------------------------------------------------------------------------
# workers that are not there / cannot start
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag, role", [
    pytest.param("--mapper-addrs", "mapper", id="no-mapper-listens"),
    pytest.param("--reducer-addrs", "reducer", id="no-reducer-listens"),
])
def test_unreachable_worker_fails_fast_with_runtime_error(tmp_path, flag, role):
    """Nothing listens at the given address: exit 1 within about --rpc-timeout, no hang, no leftovers."""
    points = write(tmp_path, "points.txt", "1,1\n2,2\n8,8\n9,9\n")
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = run_kmr("--role", "master", "--data-dir", tmp_path / "out", "--rpc-timeout", 2,
                     "--input", points, "-K", "2", "-M", "2", "-R", "1", flag, address,
                     cwd=tmp_path, timeout=HANG_GUARD)
    elapsed = time.monotonic() - started
    assert elapsed < HANG_GUARD, f"took {elapsed:.1f} s"   # a hang guard, not a performance test
    assert_clean_error(result, 1)
    message = error_line(result)
    assert role in message and address in message
    assert_no_centroids(tmp_path)


def test_standalone_worker_on_a_busy_port_says_so_in_one_line(tmp_path):
    """A mapper asked for a port another socket holds must refuse in one line, not serve or hang
    (gRPC's C core would print its own line first unless kmr quiets it)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_kmr("--role", "mapper", "--port", port, "--data-dir", tmp_path / "out",
                         cwd=tmp_path, timeout=HANG_GUARD)
    assert result.returncode != 0 and result.returncode in (1, 2), \
        f"exit code {result.returncode}; stderr:\n{result.stderr}"
    assert_clean_error(result, result.returncode, only_line=True)
    assert str(port) in error_line(result)
    assert result.stdout == "", "a worker that did not bind must not print an address"


# ---------------------------------------------------------------------------------------------------
# a failed run leaves the previous result alone
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_args, code", [
    pytest.param(["--input", "bad_points.txt", "-K", "2"], 2, id="malformed-input"),
    pytest.param(["--input", "points.txt", "-K", "2", "--init", "bad_init.txt"], 2, id="bad-init"),
    pytest.param(["--input", "points.txt", "-K", "2", "--mapper-addrs", "DEAD", "--rpc-timeout", "2"], 1,
                 id="unreachable-mapper"),
])
def test_failed_run_leaves_previous_centroids_byte_for_byte(tmp_path, bad_args, code):
    """centroids.txt is only ever replaced whole: a later failing run must not touch a good one."""
    points = write(tmp_path, "points.txt", "1,1\n2,2\n8,8\n9,9\n")
    write(tmp_path, "bad_points.txt", "1,1\n2,2\n8,8\n9,oops\n")
    write(tmp_path, "bad_init.txt", "1,1\n")
    good = master(tmp_path, "--input", points, "-K", "2", "-M", "2", "-R", "1", "--seed", "7")
    assert good.returncode == 0, good.stderr
    centroids = tmp_path / "out" / "centroids.txt"
    before = centroids.read_bytes()
    assert before

    bad_args = [f"127.0.0.1:{free_port()}" if arg == "DEAD" else arg for arg in bad_args]
    result = master(tmp_path, "-M", "2", "-R", "1", *bad_args, timeout=HANG_GUARD)
    assert_clean_error(result, code)
    assert centroids.read_bytes() == before
    assert [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp-")] == [], \
        "a temporary file was left in the data dir"


# ---------------------------------------------------------------------------------------------------
# parsing quirks that must succeed
# ---------------------------------------------------------------------------------------------------


def test_crlf_input_gives_the_published_answer(tmp_path):
    """Windows line endings (case 1 as published with CRLF) parse like LF: the same seeded draw and run
    as the LF copy, and from the published initial centroids the expected answer."""
    points, init = DATA / "case1_points_crlf.txt", DATA / "case1_init.txt"
    assert b"\r\n" in points.read_bytes() and b"\r" not in (DATA / "case1_points.txt").read_bytes()
    result = master(tmp_path, "--input", points, "-K", "2", "-M", "3", "-R", "2", "--init", init, "-n", "100")
    assert_success_matches_reference(tmp_path, result, points, init)
    assert centroid_lines(result.stdout) == centroid_lines((DATA / "case1_expected.txt").read_text())
    seeded = [run_kmr("--role", "master", "-M", 2, "-R", 2, "-K", 2, "--seed", 7, "--input", DATA / name,
                      "--data-dir", tmp_path / name, cwd=tmp_path)
              for name in ("case1_points.txt", "case1_points_crlf.txt")]
    assert [run.returncode for run in seeded] == [0, 0] and seeded[0].stdout == seeded[1].stdout
    assert centroid_lines(seeded[1].stdout) == centroid_lines(result.stdout)   # the sample's optimum
    initial = [re.search(r"initial centroids .*", run.stderr).group(0) for run in seeded]
    assert initial[0] == initial[1]


def test_spaces_after_commas_trailing_spaces_and_no_final_newline_parse(tmp_path):
    """Case 2 as published: 'x, y ' with trailing spaces and no newline after the last point."""
    points, init = DATA / "case2_points.txt", DATA / "case2_init.txt"
    raw = points.read_bytes()
    assert b", " in raw and b" \n" in raw and not raw.endswith(b"\n")
    result = master(tmp_path, "--input", points, "-K", "3", "-M", "3", "-R", "2", "--init", init, "-n", "100")
    assert_success_matches_reference(tmp_path, result, points, init)


def test_blank_lines_in_the_middle_are_skipped(tmp_path):
    """Blank and whitespace-only lines between points are not points and not errors."""
    points = tmp_path / write(tmp_path, "points.txt", "1,1\n\n2,2\n   \n\t\n8,8\n\r\n9,9\n")
    init = tmp_path / write(tmp_path, "init.txt", "1,1\n\n9,9\n")
    result = master(tmp_path, "--input", points, "-K", "2", "-M", "2", "-R", "2", "--init", init)
    assert_success_matches_reference(tmp_path, result, points, init)


def test_one_dimensional_points_work(tmp_path):
    """D=1 (one number per line, no comma at all) is a valid input."""
    points = tmp_path / write(tmp_path, "points.txt", "1\n2\n3\n10\n11\n12.5\n")
    init = tmp_path / write(tmp_path, "init.txt", "1\n2\n")
    result = master(tmp_path, "--input", points, "-K", "2", "-M", "2", "-R", "1", "--init", init)
    assert_success_matches_reference(tmp_path, result, points, init)


def test_more_map_tasks_than_points_works(tmp_path):
    """-M 7 on 5 points: two map tasks get an empty range and must map nothing, not crash.

    (Before 3a3097a an empty range gave the mapper zero columns, distances_to raised IndexError,
    every mapper was marked dead and the run ended "kmr: error: no live mapper left", exit 1.)
    """
    points = tmp_path / write(tmp_path, "points.txt", "1,1\n2,2\n3,3\n10,10\n11,11\n")
    init = tmp_path / write(tmp_path, "init.txt", "1,1\n11,11\n")
    result = master(tmp_path, "--input", points, "-K", "2", "-M", "7", "-R", "2", "--init", init)
    assert_success_matches_reference(tmp_path, result, points, init)
