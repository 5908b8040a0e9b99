"""What a user reads after a run, end to end through the real command line: the --plot SVG, the
--summary JSON and the console (-q / default / -v), checked against numbers computed here.

Expected values come from the published cases in tests/data, from kmr.kmeans_reference and from
arithmetic in this file (math.fsum over points read by conftest.read_points), never from kmr's output.
"""

import collections
import json
import math
import random
import re
import stat
import xml.etree.ElementTree as ET

import pytest

import kmr
from conftest import DATA, read_points, run_kmr, write_points

SVG = "{http://www.w3.org/2000/svg}"
PIXEL = 0.3     # plotted positions are written to 0.1 px; ticks give the scale back to ~0.05 px
CASE5 = (DATA / "case5_points.txt", DATA / "case5_init.txt", 5)


# -- independent arithmetic ------------------------------------------------------------------------

def squared(p, c):
    return math.fsum((a - b) ** 2 for a, b in zip(p, c))


def nearest_key(p, centroids):
    """The nearest centroid, a tie to the lowest index (the documented rule)."""
    return min(range(len(centroids)), key=lambda k: (squared(p, centroids[k]), k))


def sse(points, centroids):
    return math.fsum(min(squared(p, c) for c in centroids) for p in points)


def history(points, initial, iterations):
    """The centroids before the first and after every iteration, one Lloyd step at a time."""
    steps = [[tuple(c) for c in initial]]
    for _ in range(iterations):
        steps.append([tuple(c) for c in kmr.kmeans_reference(points, steps[-1], 1)[0]])
    return steps


def close(a, b, rel=1e-12):
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)


def stdout_centroids(text):
    return [tuple(float(x) for x in line.split(",")) for line in text.splitlines() if line.strip()]


def blobs(count, centres, spread, seed):
    """Points scattered around the given centres, rounded to 3 decimals."""
    rng = random.Random(seed)
    return [tuple(round(rng.gauss(c, spread), 3) for c in centres[i % len(centres)]) for i in range(count)]


# -- reading the SVG -------------------------------------------------------------------------------

class Plot:
    """An SVG written by --plot, parsed, with the axis scale recovered from its tick marks."""

    def __init__(self, path):
        self.root = ET.parse(path).getroot()
        self.children = list(self.root)
        self.x_ticks, self.y_ticks = [], []
        for before, element in zip(self.children, self.children[1:]):
            if element.tag == SVG + "text" and element.get("class") == "tick":
                value, line = float(element.text), before
                assert line.tag == SVG + "line", "every tick label follows its tick mark"
                if line.get("x1") == line.get("x2"):
                    self.x_ticks.append((value, float(line.get("x1"))))
                else:
                    assert line.get("y1") == line.get("y2")
                    self.y_ticks.append((value, float(line.get("y1"))))

    def of_class(self, tag, name):
        return [e for e in self.root.iter(SVG + tag) if e.get("class") == name]

    def texts(self, name):
        return [e.text for e in self.of_class("text", name)]

    def legend(self):
        """{cluster: (count, colour of its swatch)}."""
        entries = {}
        for before, element in zip(self.children, self.children[1:]):
            if element.tag == SVG + "text" and element.get("class") == "legend":
                found = re.fullmatch(r"cluster (\d+): (\d+)", element.text)
                assert found, element.text
                assert before.tag == SVG + "rect"
                entries[int(found[1])] = (int(found[2]), before.get("fill"))
        return entries

    @staticmethod
    def scale(ticks):
        (v0, p0), (v1, p1) = min(ticks), max(ticks)
        return lambda value: p0 + (value - v0) * (p1 - p0) / (v1 - v0)

    def to_pixels(self, point):
        """Where a data point must be drawn, according to the plot's own axes."""
        x = self.scale(self.x_ticks)(point[0])
        y = self.scale(self.y_ticks)(point[1] if len(point) > 1 else 0.0)
        return x, y


def at(element):
    return float(element.get("cx")), float(element.get("cy"))


def near(a, b):
    return abs(a[0] - b[0]) <= PIXEL and abs(a[1] - b[1]) <= PIXEL


def points_under(plot, points):
    """Input points by the pixel cell they are drawn in, to find a circle's candidates fast."""
    cells = collections.defaultdict(list)
    for p in points:
        x, y = plot.to_pixels(p)
        cells[round(x), round(y)].append(((x, y), p))

    def candidates(position):
        x, y = round(position[0]), round(position[1])
        return [p for dx in (-1, 0, 1) for dy in (-1, 0, 1) for xy, p in cells.get((x + dx, y + dy), ())
                if near(xy, position)]
    return candidates


# -- runs shared by several tests (each is one real master with spawned workers) -------------------

def master(tmp, *args):
    """One master run in `tmp`, writing below tmp/Data."""
    return run_kmr("--role", "master", "--data-dir", tmp / "Data", *args, cwd=tmp)


@pytest.fixture(scope="module")
def case5(tmp_path_factory):
    """Case 5 (K=5, 100 points) from its published good start, plot and summary, default console."""
    tmp = tmp_path_factory.mktemp("case5")
    points, init, clusters = CASE5
    result = master(tmp, "-M", 3, "-R", 2, "-K", clusters, "-n", 50, "--input", points, "--init", init,
                    "--plot", tmp / "plot.svg", "--summary", tmp / "summary.json")
    assert result.returncode == 0, result.stderr
    result.tmp, result.points = tmp, read_points(points)
    result.init = read_points(init)
    result.summary = json.loads((tmp / "summary.json").read_text())
    result.plot = Plot(tmp / "plot.svg")
    return result


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """Case 5 stopped by -n 1, long before it converges."""
    tmp = tmp_path_factory.mktemp("stopped")
    points, init, clusters = CASE5
    result = master(tmp, "-M", 2, "-R", 3, "-K", clusters, "-n", 1, "--input", points, "--init", init,
                    "--plot", tmp / "plot.svg", "--summary", tmp / "summary.json", "-q")
    assert result.returncode == 0, result.stderr
    result.points, result.init = read_points(points), read_points(init)
    result.summary = json.loads((tmp / "summary.json").read_text())
    result.plot = Plot(tmp / "plot.svg")
    return result


# -- the plot --------------------------------------------------------------------------------------

def test_plot_is_an_svg_document_with_a_size(case5):
    """Browsers and editors need the SVG namespace and a size to show the file at all."""
    root = case5.plot.root
    assert root.tag == SVG + "svg"
    assert float(root.get("width")) > 0 and float(root.get("height")) > 0
    assert [float(v) for v in root.get("viewBox").split()] == [0, 0, float(root.get("width")),
                                                                 float(root.get("height"))]


def test_plot_draws_every_point_where_the_axes_say_it_is(case5):
    """With N <= PLOT_POINTS nothing is left out, and the tick labels are a truthful scale."""
    plot, points = case5.plot, case5.points
    assert len(points) <= kmr.PLOT_POINTS
    circles = plot.of_class("circle", "point")
    assert len(circles) == len(points)
    assert all(re.fullmatch(r"-?\d+(\.\d+)?(e[+-]\d+)?", t) for t in plot.texts("tick"))
    assert len(plot.x_ticks) >= 2 and len(plot.y_ticks) >= 2
    candidates = points_under(plot, points)
    assert all(candidates(at(c)) for c in circles)
    assert any("all 100 points" in note for note in plot.texts("note"))


def test_plot_has_one_path_centroid_and_legend_entry_per_cluster(case5):
    """Each centroid's path starts at its initial centroid, visits every iteration's centroid and
    ends at the final one, in the colour of its legend entry."""
    plot, summary, clusters = case5.plot, case5.summary, CASE5[2]
    iterations = len(summary["iterations"])
    steps = history(case5.points, case5.init, iterations)
    paths = plot.of_class("polyline", "path")
    centroids = plot.of_class("circle", "centroid")
    legend = plot.legend()
    assert len(paths) == len(centroids) == len(legend) == clusters
    assert sorted(legend) == list(range(clusters))
    assert len({colour for _, colour in legend.values()}) == clusters
    for key, (path, circle) in enumerate(zip(paths, centroids)):
        vertices = [tuple(map(float, v.split(","))) for v in path.get("points").split()]
        assert len(vertices) == iterations + 1
        assert all(near(v, plot.to_pixels(step[key])) for v, step in zip(vertices, steps))
        assert near(at(circle), plot.to_pixels(summary["final_centroids"][key]))
        assert path.get("stroke") == circle.get("fill") == legend[key][1]


def test_legend_counts_are_the_final_cluster_sizes(case5):
    """The legend's counts are the summary's final counts, the points nearest each final centroid,
    and add up to the input."""
    legend, points = case5.plot.legend(), case5.points
    final = case5.summary["final_centroids"]
    counts = [legend[k][0] for k in range(len(legend))]
    assert counts == case5.summary["iterations"][-1]["counts"]
    assert sum(counts) == len(points)
    mine = collections.Counter(nearest_key(p, final) for p in points)
    assert counts == [mine[k] for k in range(len(final))]


def test_every_point_has_the_colour_of_its_nearest_final_centroid(case5):
    """The colours are the clustering: a point circle's fill is the colour of the cluster whose final
    centroid is nearest to the input point drawn there, and each colour has its legend's count."""
    plot, points = case5.plot, case5.points
    final = case5.summary["final_centroids"]
    colour = {key: fill for key, (_, fill) in plot.legend().items()}
    candidates = points_under(plot, points)
    circles = plot.of_class("circle", "point")
    for circle in circles:
        assert circle.get("fill") in {colour[nearest_key(p, final)] for p in candidates(at(circle))}
    per_colour = collections.Counter(c.get("fill") for c in circles)
    assert {fill: per_colour[fill] for fill in colour.values()} == \
           {fill: count for count, fill in plot.legend().values()}


def test_legend_counts_match_the_coloured_points_when_n_stops_the_run(stopped):
    """Stopped by -n before converging, the points are still coloured by their nearest final
    centroid, so the legend next to each colour must count those points, not the assignment of the
    iteration before (which the final centroids no longer describe)."""
    plot, points = stopped.plot, stopped.points
    assert stopped.summary["converged"] is False
    final = stopped.summary["final_centroids"]
    legend = plot.legend()
    per_colour = collections.Counter(c.get("fill") for c in plot.of_class("circle", "point"))
    mine = collections.Counter(nearest_key(p, final) for p in points)
    assert sorted(per_colour.values()) == sorted(mine.values())         # the colours are right ...
    assert {fill: count for count, fill in legend.values()} == \
           {fill: per_colour[fill] for _, fill in legend.values()}     # ... the legend must agree


def test_plot_of_a_large_input_is_a_seeded_sample_of_plot_points(tmp_path):
    """Above PLOT_POINTS the plot shows exactly PLOT_POINTS input points, says it is a sample, and the
    same seed draws the same sample."""
    count = kmr.PLOT_POINTS + 2000
    points = blobs(count, [(-50, -50), (50, 0), (0, 60)], 12, seed=5)
    write_points(tmp_path / "big.txt", points)
    svgs = []
    for run in (1, 2):
        result = master(tmp_path, "-K", 3, "-n", 2, "--seed", 21, "--input", "big.txt",
                        "--plot", f"big{run}.svg", "-q")
        assert result.returncode == 0, result.stderr
        svgs.append(Plot(tmp_path / f"big{run}.svg"))
    plot = svgs[0]
    circles = plot.of_class("circle", "point")
    assert len(circles) == kmr.PLOT_POINTS
    notes = " ".join(plot.texts("note"))
    assert f"{kmr.PLOT_POINTS} of {count} points" in notes and "sample" in notes
    candidates = points_under(plot, points)
    assert all(candidates(at(c)) for c in circles)
    assert sorted(map(at, circles)) == sorted(map(at, svgs[1].of_class("circle", "point")))
    assert sum(n for n, _ in plot.legend().values()) == count


def test_plot_of_3d_points_says_which_coordinates_it_shows(tmp_path):
    """A 3-D input is drawn by its first two coordinates, and the title says so."""
    points = blobs(60, [(0, 0, 0), (20, 20, 5), (-20, 15, -10)], 2, seed=8)
    write_points(tmp_path / "p3.txt", points)
    write_points(tmp_path / "init3.txt", points[:3])
    result = master(tmp_path, "-K", 3, "--input", "p3.txt", "--init", "init3.txt", "--plot", "p3.svg",
                    "-q", "-M", 2, "-R", 2)
    assert result.returncode == 0, result.stderr
    plot = Plot(tmp_path / "p3.svg")
    (title,) = plot.texts("title")
    assert "dimension 3" in title and "coordinates 1 and 2" in title
    assert len(plot.of_class("circle", "point")) == 60
    candidates = points_under(plot, [p[:2] for p in points])
    assert all(candidates(at(c)) for c in plot.of_class("circle", "point"))
    final, _ = kmr.kmeans_reference(points, points[:3], 20)
    assert stdout_centroids(result.stdout) == [tuple(c) for c in final]
    assert sorted(n for n, _ in plot.legend().values()) == \
           sorted(collections.Counter(nearest_key(p, final) for p in points).values())


def test_plot_of_1d_points_works(tmp_path):
    """One coordinate per line is valid input; the plot lays the points on the x axis."""
    points = blobs(40, [(-10,), (10,)], 1.5, seed=2)
    write_points(tmp_path / "p1.txt", points)
    write_points(tmp_path / "init1.txt", [points[0], points[1]])
    result = master(tmp_path, "-K", 2, "--input", "p1.txt", "--init", "init1.txt", "--plot", "p1.svg",
                    "-q", "-M", 2, "-R", 1)
    assert result.returncode == 0, result.stderr
    plot = Plot(tmp_path / "p1.svg")
    (title,) = plot.texts("title")
    assert "dimension 1" in title
    circles = plot.of_class("circle", "point")
    assert len(circles) == 40 and len(plot.of_class("circle", "centroid")) == 2
    candidates = points_under(plot, points)
    assert all(candidates(at(c)) for c in circles)
    assert sum(n for n, _ in plot.legend().values()) == 40


def leftovers(folder):
    return [p.name for p in folder.rglob(".tmp-*")]


def test_no_plot_or_summary_when_the_input_is_bad(tmp_path):
    """A run that fails writes no report, leaves an older one untouched and no temporary file."""
    (tmp_path / "bad.txt").write_text("1,2\n3,4\n5,x\n")
    (tmp_path / "old.svg").write_text("old plot\n")
    result = master(tmp_path, "-K", 2, "--input", "bad.txt", "--plot", "new.svg", "--summary", "s.json")
    assert result.returncode == 2
    second = master(tmp_path, "-K", 2, "--input", "bad.txt", "--plot", "old.svg")
    assert second.returncode == 2
    assert not (tmp_path / "new.svg").exists() and not (tmp_path / "s.json").exists()
    assert (tmp_path / "old.svg").read_text() == "old plot\n"
    assert leftovers(tmp_path) == []


def test_no_plot_or_summary_when_the_job_fails(tmp_path):
    """A job that gives up (every task fails its only attempt) writes no report either."""
    write_points(tmp_path / "p.txt", blobs(30, [(0, 0), (9, 9)], 1, seed=1))
    result = master(tmp_path, "-K", 2, "--input", "p.txt", "--fail-prob", 0.99, "--fail-seed", 1,
                    "--max-attempts", 1, "--plot", "p.svg", "--summary", "s.json", "-q")
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("kmr: error:") and result.stderr.count("\n") == 1
    assert not (tmp_path / "p.svg").exists() and not (tmp_path / "s.json").exists()
    assert leftovers(tmp_path) == []


def test_reports_are_whole_files_with_the_usual_permissions(case5):
    """Written by a temporary file and a rename, nothing is left over, and the reports are as
    readable as any file the user creates (umask), not private to the owner."""
    tmp = case5.tmp
    assert leftovers(tmp) == []
    reference = tmp / "made-by-open.txt"
    reference.write_text("x")
    expected = stat.S_IMODE(reference.stat().st_mode)
    assert {name: stat.S_IMODE((tmp / name).stat().st_mode) for name in ("plot.svg", "summary.json")} == \
           {"plot.svg": expected, "summary.json": expected}


def test_an_unwritable_plot_path_is_a_one_line_error(tmp_path):
    """--plot naming a folder cannot be written: one 'kmr: error:' line and a non-zero exit, as for
    every other error, never a traceback."""
    (tmp_path / "folder.svg").mkdir()
    result = master(tmp_path, "-K", 2, "--input", DATA / "case1_points.txt", "--plot", "folder.svg", "-q")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("kmr: error:") and result.stderr.count("\n") == 1, result.stderr


# -- the summary -----------------------------------------------------------------------------------

def test_summary_records_the_parameters_of_the_run(case5):
    """The parameters are what the command line asked for, and the input as it was counted."""
    points, init, clusters = CASE5
    parameters = case5.summary["parameters"]
    assert {key: parameters[key] for key in ("input", "points", "dim", "M", "R", "K", "n", "tol", "init",
                                             "restarts", "combiner")} == \
           {"input": str(points), "points": 100, "dim": 2, "M": 3, "R": 2, "K": clusters, "n": 50,
            "tol": 0.0, "init": str(init), "restarts": 1, "combiner": False}
    assert isinstance(parameters["seed"], int) and parameters["seed"] == case5.summary["seed"]
    assert case5.summary["startup_seconds"] > 0


def test_summary_iterations_are_lloyd_steps_computed_independently(case5):
    """Per iteration: the SSE, counts and moved points of the centroids it started from, and the
    largest shift to the next ones; the run ends at a fixed point."""
    summary, points = case5.summary, case5.points
    iterations = summary["iterations"]
    steps = history(points, case5.init, len(iterations))
    assert summary["initial_centroids"] == [list(c) for c in case5.init]
    previous_keys = None
    for number, (stats, start, end) in enumerate(zip(iterations, steps, steps[1:]), 1):
        keys = [nearest_key(p, start) for p in points]
        assert stats["iteration"] == number
        assert close(stats["sse"], sse(points, start))
        assert stats["counts"] == [keys.count(k) for k in range(len(start))]
        assert sum(stats["counts"]) == len(points)
        moved = len(points) if previous_keys is None else sum(a != b for a, b in zip(keys, previous_keys))
        assert stats["moved"] == moved
        assert close(stats["shift"], max(math.dist(a, b) for a, b in zip(start, end)))
        previous_keys = keys
    assert iterations[0]["moved"] == len(points)
    assert summary["converged"] is True
    assert iterations[-1]["shift"] == 0 and iterations[-1]["moved"] == 0
    assert all(stats["shift"] > 0 for stats in iterations[:-1])


def test_summary_final_centroids_are_the_answer(case5):
    """final_centroids are what stdout printed and what the sequential reference reaches, and
    final_sse is their SSE."""
    summary = case5.summary
    final, count = kmr.kmeans_reference(case5.points, case5.init, 50)
    assert summary["final_centroids"] == [list(c) for c in final]
    assert stdout_centroids(case5.stdout) == [tuple(c) for c in final]
    assert len(summary["iterations"]) == count
    assert close(summary["final_sse"], sse(case5.points, final))
    assert summary["runs"] == [{"seed": summary["seed"], "iterations": count, "converged": True,
                                "sse": summary["final_sse"]}]
    assert summary["best_run"] == 1 and summary["failures"] == {}


def test_summary_timings_add_up(case5):
    """Every phase takes non-negative time and together they are the iteration's wall time."""
    for stats in case5.summary["iterations"]:
        phases = stats["phases"]
        assert sorted(phases) == ["compile", "map", "reduce"]
        assert all(value >= 0 for value in phases.values())
        assert stats["seconds"] > 0
        assert math.isclose(math.fsum(phases.values()), stats["seconds"], rel_tol=0.05, abs_tol=0.005)
        assert stats["events"] == {}


def test_summary_of_a_run_stopped_by_n_measures_its_final_centroids(stopped):
    """Not converged, the final SSE needs a pass of its own: it must be the SSE of the centroids
    the run ended with, not of those the last iteration started from."""
    summary, points = stopped.summary, stopped.points
    final, _ = kmr.kmeans_reference(points, stopped.init, 1)
    assert summary["converged"] is False and len(summary["iterations"]) == 1
    assert summary["final_centroids"] == [list(c) for c in final]
    assert close(summary["final_sse"], sse(points, final))
    assert close(summary["iterations"][0]["sse"], sse(points, stopped.init))
    assert summary["final_sse"] < summary["iterations"][0]["sse"]


def master_failures(dump):
    """The master's FAILURE replies in dump.txt: [(RPC name, iteration, None before iteration 1)]."""
    found, iteration = [], None
    for line in dump.splitlines():
        if header := re.search(r"\[master \d+\] === iteration (\d+) ===", line):
            iteration = int(header[1])
        elif reply := re.search(r"\[master \d+\]   <- (\w+) .* FAILURE .*: injected failure", line):
            found.append((reply[1], iteration if reply[1] not in ("Weigh", "Sample") else None))
    return found


def test_summary_counts_the_failures_of_each_iteration(tmp_path):
    """With injected failures the answer is unchanged, and the summary counts exactly the FAILURE
    replies the master logged, iteration by iteration."""
    points, init, clusters = CASE5
    result = master(tmp_path, "-M", 3, "-R", 2, "-K", clusters, "--input", points, "--init", init,
                    "--fail-prob", 0.5, "--fail-seed", 3, "--max-attempts", 30, "--summary", "s.json", "-q")
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    final, _ = kmr.kmeans_reference(read_points(points), read_points(init), 20)
    assert summary["final_centroids"] == [list(c) for c in final]
    logged = master_failures((tmp_path / "Data" / "dump.txt").read_text())
    assert summary["failures"].get("failures", 0) == len(logged) > 0
    per_iteration = collections.Counter(iteration for _, iteration in logged)
    assert [s["events"].get("failures", 0) for s in summary["iterations"]] == \
           [per_iteration[s["iteration"]] for s in summary["iterations"]]
    assert any(s["events"].get("failures", 0) > 0 for s in summary["iterations"])


def test_summary_counts_failures_during_k_means_plus_plus_too(tmp_path):
    """Failures while k-means++ weighs the splits happen before iteration 1, but they are failures
    of the run: the summary's total must count every FAILURE reply the master logged."""
    points, _, clusters = CASE5
    result = master(tmp_path, "-M", 3, "-R", 2, "-K", clusters, "--input", points, "--init", "k-means++",
                    "--seed", 4, "--fail-prob", 0.5, "--fail-seed", 3, "--max-attempts", 30,
                    "--summary", "s.json", "-q")
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    logged = master_failures((tmp_path / "Data" / "dump.txt").read_text())
    assert any(rpc == "Weigh" for rpc, _ in logged)
    assert summary["failures"].get("failures", 0) == len(logged)


def test_summary_of_restarts_points_at_the_best_run(tmp_path):
    """--restarts 3 runs three seeds; the best run is one with the lowest SSE, and the top-level
    seed, initial and final centroids are that run's."""
    points_path = DATA / "case2_points.txt"
    points = read_points(points_path)
    result = master(tmp_path, "-M", 2, "-R", 2, "-K", 3, "--input", points_path, "--init", "random",
                    "--restarts", 3, "--seed", 11, "--summary", "s.json", "-q")
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    runs = summary["runs"]
    assert len(runs) == 3 and len({run["seed"] for run in runs}) == 3
    assert runs[0]["seed"] == summary["parameters"]["seed"] == 11
    best = runs[summary["best_run"] - 1]
    assert best["sse"] == min(run["sse"] for run in runs)
    assert summary["seed"] == best["seed"] and summary["final_sse"] == best["sse"]
    initial = [tuple(c) for c in summary["initial_centroids"]]
    assert len(set(initial)) == 3 and set(initial) <= set(points)
    final, count = kmr.kmeans_reference(points, initial, 20)
    assert summary["final_centroids"] == [list(c) for c in final]
    assert stdout_centroids(result.stdout) == [tuple(c) for c in final]
    assert len(summary["iterations"]) == count == best["iterations"]
    assert close(summary["final_sse"], sse(points, final))
    assert close(summary["iterations"][0]["sse"], sse(points, initial))


# -- the console -----------------------------------------------------------------------------------

CALL = re.compile(r"  -> (\w+) +(task|partition) (\d+) +attempt (\d+) +sent +(\S+ \d+) \(")
REPLY = re.compile(r"  <- (\w+) +(task|partition) (\d+) +attempt (\d+) +(SUCCESS|FAILURE) +[\d.]+ ms +(\S+ \d+) \(")


def console_iterations(stderr):
    """The default console cut at its iteration headers: {iteration: [lines]}, and the lines before."""
    blocks, current = {0: []}, 0
    for line in stderr.splitlines():
        if header := re.search(r"=== iteration (\d+) ===", line):
            current = int(header[1])
            blocks[current] = []
        else:
            blocks[current].append(line)
    return blocks


def test_default_console_shows_every_call_its_reply_and_the_centroids_of_each_iteration(case5):
    """The assignment's display: per iteration its number, every Map / Reduce / GetResult call as it
    is made and its SUCCESS or FAILURE, and the centroids after it (the initial ones before)."""
    blocks = console_iterations(case5.stderr)
    initial = re.search(r"initial centroids \([^)]*\): (.*)", "\n".join(blocks[0]))[1]
    assert [tuple(map(float, c.split(","))) for c in initial.split("  ")] == case5.init
    assert sorted(blocks) == list(range(len(case5.summary["iterations"]) + 1))
    for iteration in sorted(blocks)[1:]:
        lines = blocks[iteration]
        calls = [CALL.search(line).groups() for line in lines if CALL.search(line)]
        replies = [REPLY.search(line).groups() for line in lines if REPLY.search(line)]
        assert sorted(calls) == sorted(r[:4] + r[5:] for r in replies)   # every call answered, once
        done = {(rpc, number) for rpc, _, number, _, outcome, _ in replies if outcome == "SUCCESS"}
        assert done == {("Map", str(t)) for t in (1, 2, 3)} | \
            {(rpc, str(p)) for rpc in ("Reduce", "GetResult") for p in (1, 2)}
        for rpc, _, number, _, _, worker in replies:   # tasks go to workers of the right role
            assert worker.startswith("mapper" if rpc == "Map" else "reducer")
        shown = re.search(rf"iteration {iteration}: centroids (.*)", "\n".join(lines))[1]
        expected, _ = kmr.kmeans_reference(case5.points, case5.init, iteration)
        assert [tuple(map(float, c.split(","))) for c in shown.split("  ")] == expected
        assert re.search(rf"iteration +{iteration} +shift", "\n".join(lines))
        assert f"iteration {iteration}: all 100 points accounted for exactly once" in "\n".join(lines)
    assert "Traceback" not in case5.stderr
    assert "no heartbeat" not in case5.stderr and "marked dead" not in case5.stderr


def test_default_console_shows_failures_with_their_reason(tmp_path):
    points, init = DATA / "case1_points.txt", DATA / "case1_init.txt"
    result = master(tmp_path, "-K", 2, "--input", points, "--init", init, "--fail-prob", 0.5, "--fail-seed", 5)
    assert result.returncode == 0, result.stderr
    failed = [line for line in result.stderr.splitlines() if REPLY.search(line) and " FAILURE " in line]
    assert failed and all(line.endswith(": injected failure") for line in failed)
    assert len(failed) == result.stderr.count("re-assigned after FAILURE")


@pytest.mark.parametrize("flag", ["-q", "--compact", "-v"])
def test_quiet_compact_and_verbose_change_the_console_not_the_dump(tmp_path, flag):
    """-q prints only the centroids; --compact one line per iteration; -v pings and spawns too;
    dump.txt has every call either way."""
    points, init = DATA / "case1_points.txt", DATA / "case1_init.txt"
    result = master(tmp_path, "-K", 2, "--input", points, "--init", init, flag)
    assert result.returncode == 0, result.stderr
    final, iterations = kmr.kmeans_reference(read_points(points), read_points(init), 20)
    assert stdout_centroids(result.stdout) == [tuple(c) for c in final]
    if flag == "-q":
        assert result.stderr == ""
    elif flag == "--compact":
        assert len(re.findall(r"iteration +\d+ +shift", result.stderr)) == iterations
        assert not CALL.search(result.stderr) and "=== iteration" not in result.stderr
    else:
        assert CALL.search(result.stderr) and "spawned mapper 1" in result.stderr and "answers: PID" in result.stderr
    dump = (tmp_path / "Data" / "dump.txt").read_text()
    assert CALL.search(dump) and REPLY.search(dump) and "spawned mapper 1" in dump


def test_help_lists_every_flag_and_examples(tmp_path):
    """--help is the manual: it exits 0 and names every flag and shows examples."""
    result = run_kmr("--help", cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == ""
    assert "examples:" in result.stdout
    flags = ["--role", "--data-dir", "--rpc-timeout", "-M", "-R", "-K", "-n", "--input", "--seed", "--init",
             "--restarts", "--plot", "--summary", "--timeline", "-q", "--quiet", "--compact", "-v", "--verbose", "--tol",
             "--mapper-addrs", "--reducer-addrs", "--combiner", "--max-attempts", "--crash", "--host",
             "--port", "--input-root", "--token", "--fail-prob", "--fail-seed", "-h", "--help"]
    shown = set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", result.stdout))
    assert [flag for flag in flags if flag not in shown] == []
    assert "--timeline FILE.svg" in result.stdout


@pytest.mark.parametrize("flags", [("-q", "-v"), ("-q", "--compact"), ("--compact", "-v")])
def test_two_console_modes_together_are_a_usage_error(tmp_path, flags):
    """-q, --compact and -v exclude each other: exit 2, one error line, nothing run or written."""
    result = run_kmr("--role", "master", *flags, "--input", DATA / "case1_points.txt", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("kmr: error:") and result.stderr.count("\n") == 1
    assert not (tmp_path / "Data").exists()
