"""--timeline and the summary's `timeline`: every attempt of a real run, drawn in time in one lane per
worker, read back from the SVG with xml.etree and checked against the summary and against dump.txt
(the master's `-> call` and `<- reply` lines), never against the drawing code's own arithmetic.
"""

import collections
import json
import re
import signal
import time
import types
import xml.etree.ElementTree as ET

import pytest

import kmr
from conftest import (DATA, MasterProcess, Throttle, WorkerPool, read_points, run_kmr, tagged_processes,
                      uniform_points, wait_for_line, write_points)

SVG = "{http://www.w3.org/2000/svg}"
PIXEL = 0.15   # positions are written to 0.1 px
CASE5 = (DATA / "case5_points.txt", DATA / "case5_init.txt")
LOST_CODES = ("no heartbeat", "UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED")


# -- reading the SVG back --------------------------------------------------------------------------

class Timeline:
    """An SVG written by --timeline, parsed: lanes, bars, marks, boundaries, bands and the axis."""

    def __init__(self, path):
        self.root = ET.parse(path).getroot()
        children = list(self.root)
        self.ticks = [(float(text.text), float(line.get("x1"))) for line, text in zip(children, children[1:])
                      if text.tag == SVG + "text" and text.get("class") == "tick"]
        self.lanes = {lane.get("data-worker"): lane for lane in self.of_class("g", "lane")}
        self.bars = {}   # summary index -> (lane name, attempt group, its bar rect)
        for name, lane in self.lanes.items():
            for group in lane.iter(SVG + "g"):
                if group.get("class") == "attempt":
                    (bar,) = [rect for rect in group if rect.get("class") == "bar"]
                    index = int(group.get("data-index"))
                    assert index not in self.bars, f"attempt {index} drawn twice"
                    self.bars[index] = (name, group, bar)

    def of_class(self, tag, name):
        return [e for e in self.root.iter(SVG + tag) if e.get("class") == name]

    def marks(self, name):
        """{summary index: mark element} of one kind of mark."""
        found = collections.defaultdict(list)
        for mark in self.of_class("path", name):
            found[int(mark.get("data-index"))].append(mark)
        assert all(len(marks) == 1 for marks in found.values()), f"an attempt has two {name} marks"
        return {index: marks[0] for index, marks in found.items()}

    def boundaries(self):
        """{(run, iteration, edge): x} of the span boundaries (iteration: 0 k-means++, None final SSE)."""
        return {(int(line.get("data-run")), json.loads(line.get("data-iteration")), line.get("data-edge")):
                float(line.get("x1")) for line in self.of_class("line", "boundary")}

    def scale(self):
        """Seconds to x, from the two outermost tick marks (for a timeline drawn all at full scale)."""
        (v0, x0), (v1, x1) = min(self.ticks), max(self.ticks)
        return lambda seconds: x0 + (seconds - v0) * (x1 - x0) / (v1 - v0)


def extent(bar):
    x = float(bar.get("x"))
    return x, x + float(bar.get("width"))


def mark_x(mark):
    """The x a cross, triangle or tick is centred on (its path starts 6 or 7 px left of it)."""
    first = float(re.match(r"M(-?[\d.]+)", mark.get("d"))[1])
    return first + (6 if mark.get("class") in ("failure", "stale") else 7)


# -- reading dump.txt ------------------------------------------------------------------------------

CALL = re.compile(r"\[master \d+\]   -> (\w+) +(?:task|partition) (\d+) +attempt (\d+) +sent +(\S+ \d+) \(")
REPLY = re.compile(r"\[master \d+\]   <- (\w+) +(?:task|partition) (\d+) +attempt (\d+) +(SUCCESS|FAILURE) +"
                   r"[\d.]+ ms +(\S+ \d+) \([^)]*\)(?:: (.*))?")


def dump_attempts(dump):
    """What the master logged of each attempt: Counter of (stage, task, attempt, worker, outcome). A
    reply answers the oldest call of its key still waiting; a Reduce attempt that succeeded ends with
    its GetResult reply."""
    outcomes, waiting, collecting = [], collections.defaultdict(list), collections.defaultdict(list)
    for line in dump.splitlines():
        if call := CALL.search(line):
            method, task, number, worker = call.groups()
            if method != "GetResult":
                waiting[method, int(task), int(number), worker].append(len(outcomes))
                outcomes.append([(method, int(task), int(number), worker), None])
        elif reply := REPLY.search(line):
            method, task, number, status, worker, reason = reply.groups()
            key = ("Reduce" if method == "GetResult" else method, int(task), int(number), worker)
            entry = (collecting if method == "GetResult" else waiting)[key].pop(0)
            outcomes[entry][1] = status if status == "SUCCESS" else \
                "lost" if any(code in reason for code in LOST_CODES) else \
                "stale" if reason.startswith("stale attempt") else "FAILURE"
            if method == "Reduce" and status == "SUCCESS":
                collecting[key].append(entry)
    return collections.Counter((*key, outcome) for key, outcome in outcomes)


def summary_attempts(attempts):
    return collections.Counter((a["stage"], a["task"], a["attempt"], a["worker"], a["outcome"]) for a in attempts)


def most_at_once(intervals):
    """The largest number of intervals [start, end) open at one moment."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = best = 0
    for _, change in events:
        running += change
        best = max(best, running)
    return max(best, 1)


# -- runs shared by several tests ------------------------------------------------------------------

def master(tmp, *args):
    return run_kmr("--role", "master", "--data-dir", tmp / "Data", "--timeline", tmp / "t.svg",
                   "--summary", tmp / "s.json", *args, cwd=tmp)


def finished(result, tmp):
    assert result.returncode == 0, result.stderr
    result.summary = json.loads((tmp / "s.json").read_text())
    result.timeline = result.summary["timeline"]
    result.svg = Timeline(tmp / "t.svg")
    result.dump = (tmp / "Data" / "dump.txt").read_text()
    return result


@pytest.fixture(scope="module")
def drill(tmp_path_factory):
    """The sample under the failure drill (--fail-prob 0.3): FAILURE replies, re-assigned tasks."""
    tmp = tmp_path_factory.mktemp("drill")
    return finished(master(tmp, "-M", 3, "-R", 2, "-K", 2, "-n", 20, "--seed", 42, "--input", DATA / "case1_points.txt",
                           "--fail-prob", 0.3, "--fail-seed", 5, "-q"), tmp)


@pytest.fixture(scope="module")
def crashes(tmp_path_factory):
    """Case 5 with three workers killed: mapper 1 after its Map of iteration 2 (its output is lost, so
    the map task runs again), reducer 1 in its Reduce of iteration 2, mapper 2 in its Map of iteration 3."""
    tmp = tmp_path_factory.mktemp("crashes")
    points, init = CASE5
    return finished(master(tmp, "-M", 3, "-R", 2, "-K", 5, "--input", points, "--init", init, "--crash",
                           "mapper:1:after-map:2", "--crash", "reducer:1:reduce:2", "--crash", "mapper:2:map:3",
                           "-q"), tmp)


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    """k-means++ then up to 30 iterations on uniform points (which take many to settle), some failures."""
    tmp = tmp_path_factory.mktemp("long")
    write_points(tmp / "uniform.txt", uniform_points(4000, seed=3))
    return finished(master(tmp, "-M", 3, "-R", 2, "-K", 6, "-n", 30, "--seed", 3, "--init", "k-means++",
                           "--input", "uniform.txt", "--fail-prob", 0.1, "--fail-seed", 2, "-q"), tmp)


# -- lanes and bars --------------------------------------------------------------------------------

@pytest.mark.parametrize("run", ["drill", "crashes"])
def test_a_lane_per_worker_named_by_role_index_address_and_pid(run, request):
    """Five workers, five lanes, in order, each with the address and PID the worker was spawned with
    (dump.txt); a respawned worker keeps its lane."""
    result = request.getfixturevalue(run)
    spawned = re.findall(r"spawned (mapper|reducer) (\d+), PID (\d+), at (127\.0\.0\.1:\d+)", result.dump)
    first = {}
    for role, index, pid, address in spawned:
        first.setdefault(f"{role} {index}", (int(pid), address))
    names = ["mapper 1", "mapper 2", "mapper 3", "reducer 1", "reducer 2"]
    assert list(result.svg.lanes) == names
    assert [w["worker"] for w in result.timeline["workers"]] == names
    for worker in result.timeline["workers"]:
        pid, address = first[worker["worker"]]
        assert (worker["pid"], worker["address"]) == (pid, address)
        detail = [t.text for t in result.svg.lanes[worker["worker"]].iter(SVG + "text")
                  if t.get("class") == "lane-detail"]
        assert detail == [f"{address} · PID {pid}"]


@pytest.mark.parametrize("run", ["drill", "crashes"])
def test_every_attempt_in_the_summary_is_one_bar_in_its_workers_lane(run, request):
    result = request.getfixturevalue(run)
    attempts = result.timeline["attempts"]
    assert sorted(result.svg.bars) == list(range(len(attempts)))
    for index, attempt in enumerate(attempts):
        lane, group, bar = result.svg.bars[index]
        assert lane == attempt["worker"]
        assert (group.get("data-stage"), int(group.get("data-task")), json.loads(group.get("data-iteration")),
                int(group.get("data-attempt")), group.get("data-outcome")) == \
            (attempt["stage"], attempt["task"], attempt["iteration"], attempt["attempt"], attempt["outcome"])
        assert float(bar.get("width")) > 0
        assert attempt["start"] <= attempt["end"]


@pytest.mark.parametrize("run", ["drill", "crashes"])
def test_attempts_in_the_summary_are_the_calls_the_master_logged(run, request):
    """Each Map and Reduce call in dump.txt is one attempt, with the worker it went to and how it
    ended (a Reduce attempt ends with its GetResult)."""
    result = request.getfixturevalue(run)
    assert summary_attempts(result.timeline["attempts"]) == dump_attempts(result.dump)
    assert all(a["reason"] for a in result.timeline["attempts"] if a["outcome"] != "SUCCESS")


def test_every_failure_reply_has_a_red_cross_at_the_end_of_its_bar(drill):
    """A FAILURE mark for exactly the FAILURE attempts, as many as dump.txt's `<- ... FAILURE` lines."""
    attempts = drill.timeline["attempts"]
    failed = {i for i, a in enumerate(attempts) if a["outcome"] == "FAILURE"}
    logged = re.findall(r"\[master \d+\]   <- \w+ .* FAILURE .*: injected failure", drill.dump)
    assert len(failed) == len(logged) > 0
    crosses = drill.svg.marks("failure")
    assert set(crosses) == failed
    for index, cross in crosses.items():
        _, _, bar = drill.svg.bars[index]
        assert abs(mark_x(cross) - extent(bar)[1]) <= PIXEL
        assert cross.get("stroke") == kmr.FAILURE_COLOUR
    assert drill.svg.marks("lost") == {} and drill.svg.marks("won") == {}


def test_bars_are_where_the_time_axis_says(drill):
    """Read with the axis's own tick labels, each bar starts at its attempt's start and ends at its
    end (or is the narrowest bar), and a Reduce bar's GetResult part starts when it was sent."""
    scale = drill.svg.scale()
    assert len(drill.svg.ticks) >= 4
    for index, attempt in enumerate(drill.timeline["attempts"]):
        _, group, bar = drill.svg.bars[index]
        left, right = extent(bar)
        assert abs(left - scale(attempt["start"])) <= PIXEL
        assert abs(right - scale(attempt["end"])) <= PIXEL or right - left <= kmr.MIN_BAR + PIXEL
        collect = [rect for rect in group if rect.get("class") == "collect"]
        if attempt["collect"] is None:
            assert collect == []
        else:
            assert abs(float(collect[0].get("x")) - scale(attempt["collect"])) <= PIXEL


@pytest.mark.parametrize("run", ["drill", "crashes"])
def test_bars_lie_within_their_iteration_boundaries(run, request):
    """Each iteration starts at a line labelled with its number; its bars lie between that line
    and the next (the last iteration ends at a line of its own)."""
    result = request.getfixturevalue(run)
    lines = result.svg.boundaries()
    spans = result.timeline["iterations"]
    assert [s["iteration"] for s in spans] == [kmr.SAMPLE_PASS, *range(1, len(result.summary["iterations"]) + 1)]
    labels = {(int(t.get("data-run")), json.loads(t.get("data-iteration"))): t.text
              for t in result.svg.of_class("text", "iteration")}
    edges = []
    for span in spans:
        key = (span["run"], span["iteration"])
        assert labels[key] in (kmr.span_label(span), kmr.span_label(span, short=True))
        edges.append(lines[(*key, "start")])
    edges.append(lines[(spans[-1]["run"], spans[-1]["iteration"], "end")])
    assert edges == sorted(edges)
    for index, attempt in enumerate(result.timeline["attempts"]):
        number = [s["iteration"] for s in spans].index(attempt["iteration"])
        left, right = extent(result.svg.bars[index][2])
        assert edges[number] - PIXEL <= left and right <= edges[number + 1] + PIXEL


@pytest.mark.parametrize("run", ["drill", "crashes", "long_run"])
def test_bars_in_a_lane_overlap_only_where_the_worker_ran_two_attempts_at_once(run, request):
    result = request.getfixturevalue(run)
    attempts = result.timeline["attempts"]
    for name, lane in result.svg.lanes.items():
        mine = [(index, bar) for index, (lane_name, _, bar) in result.svg.bars.items() if lane_name == name]
        rows = collections.defaultdict(list)
        for index, bar in mine:
            rows[bar.get("y")].append(extent(bar))
        for extents in rows.values():
            extents.sort()
            assert all(a[1] <= b[0] + 0.05 for a, b in zip(extents, extents[1:])), name
        at_once = most_at_once([(attempts[i]["start"], attempts[i]["end"]) for i, _ in mine])
        assert len(rows) == int(lane.get("data-rows")) == at_once


def test_a_worker_running_two_attempts_at_once_gets_a_second_row_and_nothing_overlaps():
    """Drawn from data made up here: one worker with two overlapping attempts (a lost call the master
    gave up on while the process still ran it, say), another with one; an unfinished copy is faded."""
    def attempt(worker, start, end, outcome="SUCCESS", **extra):
        return {"run": 1, "worker": worker, "address": "127.0.0.1:1", "pid": 7, "stage": "Map", "task": 1,
                "iteration": 1, "attempt": 1, "backup": False, "rerun": False, "start": start, "collect": None,
                "end": end, "outcome": outcome, "reason": "" if outcome == "SUCCESS" else "why"} | extra

    attempts = [attempt("mapper 1", 1.0, 1.6), attempt("mapper 1", 1.2, 1.4, "lost"),
                attempt("mapper 1", 1.6, 1.9), attempt("mapper 2", 1.1, 1.95, "unfinished", backup=True, task=2)]
    result = types.SimpleNamespace(points=10, runs=[None], timeline={
        "workers": [{"worker": "mapper 1", "address": "127.0.0.1:1", "pid": 7},
                    {"worker": "mapper 2", "address": "127.0.0.1:2", "pid": 8}],
        "attempts": attempts, "iterations": [{"run": 1, "iteration": 1, "start": 1.0, "end": 2.0}],
        "losses": [], "resumed": None, "end": 2.0})
    root = ET.fromstring(kmr.timeline_svg(result))
    lanes = {lane.get("data-worker"): lane for lane in root.iter(SVG + "g") if lane.get("class") == "lane"}
    assert lanes["mapper 1"].get("data-rows") == "2" and lanes["mapper 2"].get("data-rows") == "1"
    bars = {int(g.get("data-index")): next(r for r in g if r.get("class") == "bar")
            for g in root.iter(SVG + "g") if g.get("class") == "attempt"}
    assert bars[0].get("y") == bars[2].get("y") != bars[1].get("y")
    assert extent(bars[0])[1] <= extent(bars[2])[0] + 0.05
    assert bars[3].get("fill-opacity") == "0.35"
    assert [e.get("class") for e in root.iter(SVG + "path") if e.get("data-index")] == ["lost"]


# -- failures, losses, backups ---------------------------------------------------------------------

def test_a_lost_worker_is_marked_in_its_own_lane_with_the_pid_of_its_replacement(crashes):
    """Every worker marked dead in dump.txt is a loss in the summary and a dashed line in its lane
    that names the lost PID and the replacement's; the attempts the master gave up on carry a black
    triangle; the lane's attempts before the loss ran in the old process, any after it in the new."""
    dead = re.findall(r"\[master \d+\] (\w+ \d) \(127\.0\.0\.1:\d+\) marked dead \((.*)\)", crashes.dump)
    replaced = dict(re.findall(r"replacing (\w+ \d): PID (\d+) starting", crashes.dump))
    losses = crashes.timeline["losses"]
    assert len(dead) >= 2 and [(loss["worker"], loss["reason"]) for loss in losses] == dead
    for loss in losses:
        assert loss["new_pid"] == int(replaced[loss["worker"]]) != loss["pid"]
        (mark,) = [g for g in crashes.svg.lanes[loss["worker"]].iter(SVG + "g") if g.get("class") == "loss"]
        assert (mark.get("data-pid"), mark.get("data-new-pid")) == (str(loss["pid"]), str(loss["new_pid"]))
        label = "".join(mark.itertext())
        assert f"PID {loss['pid']} lost" in label and f"new PID {loss['new_pid']}" in label
        mine = [a for a in crashes.timeline["attempts"] if a["worker"] == loss["worker"]]
        assert all(a["pid"] == loss["pid"] for a in mine if a["start"] < loss["time"])
        assert all(a["pid"] == loss["new_pid"] for a in mine if a["start"] > loss["time"])
    lost = {i for i, a in enumerate(crashes.timeline["attempts"]) if a["outcome"] == "lost"}
    assert lost and set(crashes.svg.marks("lost")) == lost


def test_a_re_executed_map_task_is_outlined_and_counted(crashes):
    """Mapper 1 died after its Map of iteration 2: the reducers report task 1's output missing
    (FAILURE), and task 1 runs again on another mapper, drawn with a purple outline."""
    attempts = crashes.timeline["attempts"]
    assert "iteration 2: re-executing map tasks [1]" in crashes.dump
    reruns = [i for i, a in enumerate(attempts) if a["rerun"]]
    assert reruns and all((attempts[i]["stage"], attempts[i]["task"], attempts[i]["iteration"]) == ("Map", 1, 2)
                          for i in reruns)
    assert attempts[reruns[-1]]["outcome"] == "SUCCESS" and attempts[reruns[-1]]["worker"] != "mapper 1"
    for index in reruns:
        assert crashes.svg.bars[index][2].get("stroke") == kmr.RERUN_COLOUR
    missing = [a for a in attempts if a["stage"] == "Reduce" and a["reason"].startswith("map output missing")]
    assert missing and all(a["outcome"] == "FAILURE" and a["iteration"] == 2 for a in missing)
    (title,) = crashes.svg.of_class("text", "title")
    losses = len(crashes.timeline["losses"])
    assert f"{losses} worker{'s' if losses != 1 else ''} lost" in title.text
    assert "1 map task re-executed" in title.text   # however many attempts it took


def test_a_backup_copy_is_striped_the_copy_that_won_ticked_and_the_other_faded(tmp_path):
    """A mapper slowed 9x from outside gets its task backed up (as in test_faults); the timeline
    shows which copy won, and the summary says the other was ignored."""
    pool = WorkerPool(tmp_path, 3, 2)
    throttle = None
    try:
        points = write_points(tmp_path / "points.txt", uniform_points(300_000, seed=3))
        init = write_points(tmp_path / "init.txt", read_points(points)[:8])
        throttle = Throttle(pool.workers[1].process.pid)   # mapper 2, slow from the start
        result = master(tmp_path, "-M", 3, "-R", 2, "-K", 8, "-n", 3, "--init", init, "-q",
                        "--mapper-addrs", ",".join(pool.mappers), "--reducer-addrs", ",".join(pool.reducers))
    finally:
        if throttle:
            throttle.stop()
        pool.stop()
    result = finished(result, tmp_path)
    assert re.search(r"mapper task 2: the backup copy \(attempt 2 on mapper [13] .*\) finished first", result.dump)
    attempts = result.timeline["attempts"]
    backups = [i for i, a in enumerate(attempts) if a["backup"]]
    assert backups
    for index in backups:
        copy = attempts[index]
        others = [i for i, a in enumerate(attempts) if i != index and not a["backup"] and
                  (a["run"], a["stage"], a["iteration"], a["task"]) ==
                  (copy["run"], copy["stage"], copy["iteration"], copy["task"]) and a["start"] < copy["start"]]
        rivals = [i for i in others if attempts[i]["end"] > copy["start"]]
        assert len(rivals) == 1
        winner, loser = (index, rivals[0]) if copy["outcome"] == "SUCCESS" else (rivals[0], index)
        assert attempts[winner]["outcome"] == "SUCCESS"
        assert attempts[loser]["outcome"] in ("ignored", "unfinished")
        assert winner in result.svg.marks("won") and loser not in result.svg.marks("won")
        assert result.svg.bars[loser][2].get("fill-opacity") == "0.35"
        group = result.svg.bars[index][1]
        assert [r.get("fill") for r in group if r.get("class") == "backup"] == ["url(#stripes)"]
    assert result.summary["failures"].get("backups") == len(backups)


# -- long runs -------------------------------------------------------------------------------------

def test_a_long_run_keeps_the_first_and_last_spans_and_its_troubles_and_collapses_the_rest(long_run):
    """More than TIMELINE_FULL spans: the first and last TIMELINE_EDGE are drawn in full and the middle
    collapses into bands of at least BAND_SPANS spans, which say how many attempts and failures they
    hold; nothing is lost: drawn and collapsed add up to the summary and to dump.txt."""
    spans = sorted(long_run.timeline["iterations"], key=lambda s: s["start"])
    assert len(spans) > kmr.TIMELINE_FULL
    lines = long_run.svg.boundaries()
    full = [i for i, s in enumerate(spans) if (s["run"], s["iteration"], "start") in lines]
    edge = kmr.TIMELINE_EDGE
    assert set(range(edge)) | set(range(len(spans) - edge, len(spans))) <= set(full)
    bands = long_run.svg.of_class("g", "band")
    assert bands and all(int(band.get("data-spans")) >= kmr.BAND_SPANS for band in bands)
    assert sum(int(band.get("data-spans")) for band in bands) == len(spans) - len(full)
    attempts = long_run.timeline["attempts"]
    shown = {(spans[i]["run"], spans[i]["iteration"]) for i in full}
    drawn = {i for i, a in enumerate(attempts) if (a["run"], a["iteration"]) in shown}
    assert set(long_run.svg.bars) == drawn
    assert len(drawn) + sum(int(band.get("data-attempts")) for band in bands) == len(attempts)
    failures = [i for i, a in enumerate(attempts) if a["outcome"] == "FAILURE"]
    logged = re.findall(r"\[master \d+\]   <- \w+ .* FAILURE .*: injected failure", long_run.dump)
    assert len(failures) == len(logged) > 0
    assert set(long_run.svg.marks("failure")) == set(failures) & drawn
    assert len(drawn & set(failures)) + sum(int(band.get("data-failures")) for band in bands) == len(failures)
    texts = [t.text for t in long_run.svg.of_class("text", "note")]
    assert any("collapsed into hatched bands" in text for text in texts)


def test_weighing_for_k_means_plus_plus_comes_before_iteration_1_and_for_the_final_sse_after_the_last(long_run):
    """K - 1 k-means++ rounds weigh all 3 splits each (failed tries add attempts), in green, between the
    k-means++ line and iteration 1's; a run stopped by -n weighs once more after its last iteration."""
    attempts = long_run.timeline["attempts"]
    lines = long_run.svg.boundaries()
    last = len(long_run.summary["iterations"])
    weigh = {i: a for i, a in enumerate(attempts) if a["stage"] == "Weigh"}
    rounds = [i for i, a in weigh.items() if a["iteration"] == 0]
    final = [i for i, a in weigh.items() if a["iteration"] is None]
    assert len([i for i in rounds if attempts[i]["outcome"] == "SUCCESS"]) == (6 - 1) * 3
    assert len([i for i in final if attempts[i]["outcome"] == "SUCCESS"]) == (0 if long_run.summary["converged"] else 3)
    assert set(rounds) | set(final) == set(weigh)
    for index in weigh:
        left, right = extent(long_run.svg.bars[index][2])
        start, end = ((1, 0, "start"), (1, 1, "start")) if index in rounds else ((1, None, "start"), (1, None, "end"))
        assert lines[start] - PIXEL <= left and right <= lines[end] + PIXEL
        assert long_run.svg.bars[index][2].get("fill") == kmr.STAGE_COLOURS["Weigh"]
    if final:
        assert lines[(1, last, "start")] < lines[(1, None, "start")]
    labels = {json.loads(t.get("data-iteration")): t.text for t in long_run.svg.of_class("text", "iteration")}
    assert labels[0] == "k-means++" and labels.get(None, "final SSE") in ("final SSE", "SSE")


# -- resume, command line --------------------------------------------------------------------------

def test_a_resumed_run_shows_only_the_iterations_it_ran_and_says_so(tmp_path):
    """Killed after iteration 3 and resumed: the timeline and the summary hold only the attempts of
    the iterations the second master ran, and both say what ran before."""
    write_points(tmp_path / "points.txt", uniform_points(60_000, seed=3))
    job = ["--role", "master", "-M", 3, "-R", 2, "-K", 8, "-n", 40, "--seed", 5, "--input", "points.txt", "-q"]
    first = MasterProcess(*job, cwd=tmp_path)
    try:
        wait_for_line(tmp_path / "Data" / "dump.txt", r"iteration +3 +shift", process=first.process)
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(10)
        deadline = time.monotonic() + 5   # spawned workers leave once their master is gone
        while tagged_processes(first.tag) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        first.stop()
    saved = json.loads((tmp_path / "Data" / "checkpoint.json").read_text())
    assert saved["current"] is not None, "the whole job ran before the kill: use more points"
    done = len(saved["current"]["iterations"])
    result = run_kmr(*job, "--resume", "--timeline", "t.svg", "--summary", "s.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    timeline = json.loads((tmp_path / "s.json").read_text())["timeline"]
    assert timeline["resumed"] == {"runs": 0, "iterations": done}
    ran = sorted({a["iteration"] for a in timeline["attempts"]} - {None, kmr.SAMPLE_PASS})   # final SSE, Sample
    assert ran == list(range(done + 1, 41)) == [s["iteration"] for s in timeline["iterations"]
                                                 if s["iteration"] not in (None, kmr.SAMPLE_PASS)]
    notes = " ".join(t.text for t in Timeline(tmp_path / "t.svg").of_class("text", "note"))
    assert f"resumed from a checkpoint: iterations 1–{done} ran in an earlier master" in notes


@pytest.mark.parametrize("path", ["folder.svg", "missing/t.svg"])
def test_a_bad_timeline_path_is_a_one_line_usage_error_before_anything_runs(tmp_path, path):
    (tmp_path / "folder.svg").mkdir()
    result = run_kmr("--role", "master", "--input", DATA / "case1_points.txt", "--timeline", path, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"kmr: error: --timeline {path}: not a file in an existing folder\n"
    assert not (tmp_path / "Data").exists()
