"""Better answers: distributed k-means++ or k-means|| and --restarts reach the published optima exactly.

One start reaches case 2's optimum about a quarter of the time and case 3's about a third
(tests/data/README.md has the measured shares); the README's recipe, enough k-means++ restarts that
all of them miss with probability below 1e-3, must reach every expected file exactly for several
seeds and (M, R), not one.
"""

import collections
import itertools
import json
import math
import random
import shutil
from fractions import Fraction

import pytest
from hypothesis import example, given, settings, strategies as st

import kmr
from conftest import DATA, centroid_lines, read_points, run_kmr

CASE_CLUSTERS = {1: 2, 2: 3, 3: 2, 4: 3, 5: 5}
# The README's recipe: k-means++ restarts per case, so few that all of them miss the optimum with
# probability below 1e-3 even at the low end of the measured per-start chance (tests/data/README.md).
RECOMMENDED_RESTARTS = {1: 1, 2: 28, 3: 19, 4: 2, 5: 2}
RECIPE_RESTARTS = 30   # one count for every case: the README's advice when the case is unknown


@pytest.mark.parametrize("init", ["k-means++", "k-means||"])
@pytest.mark.parametrize("case", sorted(CASE_CLUSTERS))
@pytest.mark.parametrize("seed, mappers, reducers", [(1, 2, 2), (2, 3, 1), (3, 1, 3), (4, 4, 2)])
def test_recommended_restarts_reach_every_published_optimum_for_any_seed(
        worker_pool, tmp_path, case, seed, mappers, reducers, init):
    shutil.copy(DATA / f"case{case}_points.txt", tmp_path / "points.txt")
    options = kmr.JobOptions(input_path=str(tmp_path / "points.txt"), mappers=mappers, reducers=reducers,
                             clusters=CASE_CLUSTERS[case], iterations=100, data_dir=str(tmp_path / "out"),
                             seed=seed, init=init, restarts=RECOMMENDED_RESTARTS[case],
                             mapper_addrs=worker_pool.mappers[:mappers], reducer_addrs=worker_pool.reducers[:reducers])
    result = kmr.run_job(options)
    expected = centroid_lines((DATA / f"case{case}_expected.txt").read_text())
    assert centroid_lines(kmr.format_centroids(result.centroids)) == expected
    assert centroid_lines((tmp_path / "out" / "centroids.txt").read_text()) == expected
    assert len({run.seed for run in result.runs}) == RECOMMENDED_RESTARTS[case]
    assert result.best.sse == min(run.sse for run in result.runs)


@pytest.mark.parametrize("case", [2, 3])
def test_the_one_size_recipe_reaches_the_hardest_optima_through_the_command_line(tmp_path, case):
    result = run_kmr("--role", "master", "-M", 2, "-R", 2, "-K", CASE_CLUSTERS[case], "-n", 100,
                     "--input", DATA / f"case{case}_points.txt", "--init", "k-means++",
                     "--restarts", RECIPE_RESTARTS, "--seed", 2026, "--data-dir", tmp_path / "out",
                     "--summary", tmp_path / "s.json", "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert centroid_lines(result.stdout) == centroid_lines((DATA / f"case{case}_expected.txt").read_text())
    summary = json.loads((tmp_path / "s.json").read_text())
    assert len(summary["runs"]) == RECIPE_RESTARTS and len({run["seed"] for run in summary["runs"]}) == 30
    assert summary["final_sse"] == min(run["sse"] for run in summary["runs"])


def test_restarts_log_every_run_and_name_the_winner(tmp_path):
    result = run_kmr("--role", "master", "-K", 3, "--input", DATA / "case2_points.txt", "--restarts", 5,
                     "--seed", 1, "--data-dir", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    runs = [line for line in result.stderr.splitlines() if " of 5: seed " in line]
    assert len(runs) == 5
    assert "best: run " in result.stderr


def test_kmeans_plus_plus_is_deterministic_under_a_seed(tmp_path):
    """The same seed draws the same initial centroids and gives the same answer; another seed draws others."""
    runs = [run_kmr("--role", "master", "-M", 3, "-K", 5, "-n", 1, "--input", DATA / "case5_points.txt",
                    "--init", "k-means++", "--seed", seed, "--data-dir", tmp_path / f"d{i}", cwd=tmp_path)
            for i, seed in ((1, 77), (2, 77), (3, 78))]
    initial = [next(line for line in r.stderr.splitlines() if "initial centroids" in line).split("): ")[1]
               for r in runs]
    assert runs[0].returncode == 0 and initial[0] == initial[1] and runs[0].stdout == runs[1].stdout
    assert runs[2].returncode == 0 and initial[2] != initial[0]


def test_kmeans_plus_plus_draws_in_proportion_to_squared_distance(worker_pool, tmp_path_factory):
    """Across many seeds, given the first centroid, the second is drawn with probability D^2 / total,
    although the points live on two mappers and only masses and candidates reach the master."""
    data = tmp_path_factory.mktemp("kpp")
    points = [(0.0,), (1.0,), (3.0,), (10.0,)]
    (data / "points.txt").write_text("".join(kmr.format_point(p) + "\n" for p in points))
    seen = collections.Counter()
    for seed in range(240):
        options = kmr.JobOptions(input_path=str(data / "points.txt"), mappers=2, reducers=1, clusters=2,
                                 iterations=0, data_dir=str(data), seed=seed, init="k-means++",
                                 mapper_addrs=worker_pool.mappers[:2], reducer_addrs=worker_pool.reducers[:1])
        first, second = kmr.run_job(options).best.initial
        seen[first, second] += 1
    for first in points:
        drawn = {second: count for (f, second), count in seen.items() if f == first}
        total = sum(drawn.values())
        assert total > 30   # the first centroid is uniform: about 60 of 240 each
        weights = {p: kmr.squared_distance(p, first) for p in points}
        mass = math.fsum(weights.values())
        for point, weight in weights.items():
            expected = total * weight / mass
            spread = 4 * math.sqrt(max(expected * (1 - weight / mass), 1))
            assert abs(drawn.get(point, 0) - expected) <= spread, (first, point, drawn)
        assert first not in drawn   # D^2 = 0: never drawn again


def test_weighted_index_follows_the_running_sum_and_skips_zero_weights():
    weights = [0.0, 1.0, 0.0, 3.0, 0.0]
    assert [kmr.weighted_index(weights, f) for f in (0.0, 0.2, 0.25, 0.9, 0.999999)] == [1, 1, 3, 3, 3]


def test_squared_distances_one_round_at_a_time_equal_all_at_once():
    """What k-means++ weighs by: each point's D^2 to the nearest chosen centroid, brought up to date one
    centroid a round, equals measuring them all at once; the mass, kept from the D^2 that changed, is
    their exact sum every round."""
    points = read_points(DATA / "case3_points.txt")
    columns = kmr.to_columns(points, 2)
    centroids = points[:3]
    split = kmr.Split(columns)
    for chosen in range(1, 4):
        split.weigh(1, centroids[:chosen], "k-means++")
        assert sum(map(Fraction, split.mass)) == sum(map(Fraction, split.weights))
    assert list(split.weights) == [min(kmr.squared_distance(p, c) for c in centroids) for p in points]
    assert list(split.owners) == [kmr.nearest(p, centroids) for p in points]


def test_restarts_with_an_init_file_is_a_usage_error(tmp_path):
    result = run_kmr("--role", "master", "-K", 2, "--input", DATA / "case1_points.txt", "--init",
                     DATA / "case1_init.txt", "--restarts", 3, "--data-dir", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--restarts" in result.stderr


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kmeans_parallel_picks_the_same_centroids_for_any_split(worker_pool, tmp_path, seed):
    """Each point's pick depends on its index, the round's seed and the whole D^2 mass only, so
    M = 1..4 start every run from the same K centroids, bit for bit."""
    shutil.copy(DATA / "case5_points.txt", tmp_path / "points.txt")
    starts = set()
    for mappers in (1, 2, 3, 4):
        options = kmr.JobOptions(input_path=str(tmp_path / "points.txt"), mappers=mappers, reducers=1, clusters=5,
                                 iterations=0, data_dir=str(tmp_path / f"out{mappers}"), seed=seed, init="k-means||",
                                 mapper_addrs=worker_pool.mappers[:mappers], reducer_addrs=worker_pool.reducers[:1])
        starts.add(tuple(kmr.run_job(options).best.initial))
    assert len(starts) == 1
    (initial,) = starts
    assert len(set(initial)) == 5


def test_kmeans_parallel_logs_its_oversampling_factor_and_rounds(tmp_path):
    result = run_kmr("--role", "master", "-M", 2, "-K", 5, "-n", 3, "--input", DATA / "case5_points.txt",
                     "--init", "k-means||", "--seed", 4, "--data-dir", tmp_path / "out", "--summary", tmp_path / "s.json",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "k-means||: oversampling factor l = 3 (K/2), 5 rounds" in result.stderr
    assert result.stderr.count("k-means|| round ") >= 1 and "Weigh" in result.stderr
    timeline = json.loads((tmp_path / "s.json").read_text())["timeline"]
    assert [span["init"] for span in timeline["iterations"] if span["iteration"] == 0] == ["k-means||"]
    weighs = [a for a in timeline["attempts"] if a["stage"] == "Weigh" and a["iteration"] == 0]
    assert len(weighs) == 2 * 6 and {a["init"] for a in weighs} == {"k-means||"}   # 5 rounds and the weights


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([1, 2, 3, 7]), st.lists(st.integers(1, 6), min_size=1, max_size=4), st.integers(0, 2**32),
       st.booleans())
def test_kmeans_parallel_updates_equal_measuring_every_candidate(dim, rounds, seed, measured):
    """The pruned updates (triangle inequality: from each point's nearest candidate, or from its cell
    of a grid where D <= 2) leave every point its D^2 to the nearest candidate and that candidate's
    number, lowest of equals, as measuring all of them would; also when they take math.dist's
    distances (`measured`: at any D, as they do from D=6)."""
    norm_from, kmr.NORM_FROM_DIM = kmr.NORM_FROM_DIM, 1 if measured else math.inf
    try:
        check_candidate_updates(dim, rounds, random.Random(seed))
    finally:
        kmr.NORM_FROM_DIM = norm_from


def check_candidate_updates(dim, rounds, rng):
    """Rounds of new candidates (data points and others) over 60 points of one scale, checked after each."""
    scale = rng.choice([1.0, 2.0 ** -537, 1e-160, 1e140, 1e-9])   # tiny ones: squares that underflow
    offset = rng.choice([0.0, 0.0, 1e6, -7.5e12]) if scale == 1e-9 else 0.0   # grid cells of a few ulps
    points = [tuple(offset + scale * float(rng.choice([rng.randint(-3, 3), rng.gauss(0, 5)])) for _ in range(dim))
              for _ in range(60)]
    split = kmr.Split(kmr.to_columns(points, dim))
    candidates = []
    for count in rounds:
        candidates += [rng.choice(points) if rng.random() < 0.5 else
                       tuple(offset + scale * rng.gauss(0, 5) for _ in range(dim)) for _ in range(count)]
        split.weigh(1, candidates, "k-means||")   # measures only the new candidates
        for point, weight, owner in zip(points, split.weights, split.owners):
            distances = [kmr.squared_distance(point, c) for c in candidates]
            assert weight == min(distances) and owner == distances.index(weight)
        assert sum(map(Fraction, split.mass)) == sum(map(Fraction, split.weights))   # exact


@pytest.mark.parametrize("dim", [1, 2])
def test_the_grid_update_keeps_ties_and_cell_edges_exact(monkeypatch, dim):
    """Points on a lattice whose lines are the grid's cell edges, candidates at equal distances from
    many of them (ties to the lower number) and one far point: the grid update gives every point what
    measuring every candidate gives."""
    used, compiled = [], kmr.cell_updater
    monkeypatch.setattr(kmr, "cell_updater", lambda d, gated: used.append((d, gated)) or compiled(d, gated))
    lattice = [i / 8 for i in range(-16, 17)]
    points = [p[:dim] for p in itertools.product(lattice, lattice)] + [(1e9,) * dim]
    split = kmr.Split(kmr.to_columns(points, dim))
    candidates = [(0.0,) * dim]
    split.weigh(1, candidates, "k-means||")   # every point measured: the first round
    for new in ([(1.0,) * dim, (-1.0,) * dim, (0.5,) * dim, (0.25, -0.25)[:dim], (-0.25, 0.25)[:dim]],
                [(1.5,) * dim, (-1.5, 1.5)[:dim], (0.75, 0.0)[:dim], (0.0, 0.75)[:dim], (2.0, 2.0)[:dim]] * 2):
        candidates += new
        split.weigh(1, candidates, "k-means||")
        for point, weight, owner in zip(points, split.weights, split.owners):
            distances = [kmr.squared_distance(point, c) for c in candidates]
            assert (weight, owner) == (min(distances), distances.index(min(distances)))
    assert used == [(dim, False), (dim, True)]   # round 2 without the gates, round 3 behind them


@pytest.mark.parametrize("measured", [False, True])
def test_round_two_at_higher_d_takes_its_candidates_from_a_grid_over_two_coordinates(monkeypatch, measured):
    """At D > 2 round 2 orders the new candidates by their distance in the two coordinates they spread
    most along (at most the whole distance): on a lattice whose third coordinate adds little, with
    many ties and one far point, every point still gets what measuring every candidate gives, with
    math.dist's distances or without."""
    monkeypatch.setattr(kmr, "NORM_FROM_DIM", 1 if measured else math.inf)
    used, compiled = [], kmr.projected_grid
    monkeypatch.setattr(kmr, "projected_grid", lambda *args: used.append(args[-1]) or compiled(*args))
    lattice = [i / 8 for i in range(-16, 17)]
    points = [(x, y, z) for x, y in itertools.product(lattice, lattice) for z in (0.0, 0.125)] + [(1e9, 0.0, 0.0)]
    split = kmr.Split(kmr.to_columns(points, 3))
    candidates = [(0.0, 0.0, 0.0)]
    split.weigh(1, candidates, "k-means||")
    candidates += [(a, b, c) for a, b in itertools.product((-1.5, -0.5, 0.5, 1.5), (-1.0, 0.0, 1.0))
                   for c in (0.0, 0.125)] + [(0.25, 0.25, 0.0625), (2.0, 2.0, 0.0)]
    split.weigh(1, candidates, "k-means||")
    for point, weight, owner in zip(points, split.weights, split.owners):
        distances = [kmr.squared_distance(point, c) for c in candidates]
        assert (weight, owner) == (min(distances), distances.index(min(distances)))
    assert used == [measured]


WEIGHT = st.one_of(st.just(0.0), st.floats(0, 1e6), st.floats(0, 2.0 ** -1000), st.floats(1e290, 1e300),
                   st.sampled_from([1.0, 0.75 * 2.0 ** -53]))   # parts whose roundings add up past half an ulp


@settings(max_examples=300, deadline=None)
@example([1.0, 0.75 * 2.0 ** -53, 0.75 * 2.0 ** -53], 0, [2], 4)   # rounding each part first loses 2**-52
@given(st.lists(WEIGHT, max_size=60), st.integers(0, 40), st.lists(st.integers(0, 60), max_size=5),
       st.sampled_from([1, 4, 7]))
def test_the_kmeans_parallel_mass_is_the_same_for_any_split(weights, start, cuts, block):
    """A k-means|| round's D^2 mass, put together from every split's block_masses, is the correctly
    rounded sum of each block's correctly rounded sum (blocks of PRIORITY_BLOCK points by index),
    however the points are split; a split's own parts give at most that (what it offers points by)."""
    bounds = [start, *sorted(start + min(cut, len(weights)) for cut in cuts), start + len(weights)]
    block_size, kmr.PRIORITY_BLOCK = kmr.PRIORITY_BLOCK, block
    try:
        parts = [kmr.block_masses(weights[low - start:high - start], low) for low, high in zip(bounds, bounds[1:])]
    finally:
        kmr.PRIORITY_BLOCK = block_size
    by_block = collections.defaultdict(list)
    for index, weight in enumerate(weights, start):
        by_block[index // block].append(weight)
    expected = math.fsum(math.fsum(values) for values in by_block.values())
    assert kmr.whole_mass(itertools.chain.from_iterable(parts)) == expected
    assert all(kmr.whole_mass(split) <= expected for split in parts)


@settings(max_examples=300, deadline=None)
@example([1.0] + [2.0 ** -53] * 40, 0, [], 4)   # a plain sum that loses every term after the first
@example([1.7976931348623157e308], 0, [], 1)   # the largest double: its high end overflows, no bounds
@given(st.lists(WEIGHT, max_size=60), st.integers(0, 40), st.lists(st.integers(0, 60), max_size=5),
       st.sampled_from([1, 4, 7]))
def test_the_splits_mass_bounds_hold_the_whole_mass(weights, start, cuts, block):
    """Each split's mass_bounds, from one plain sum, hold its exact D^2 sum, and mass_between puts every
    split's together around the whole mass (whole_mass, by block) and each split's low end stays below
    it (what it offers points by), however the points are split; a split has none only where its sum
    is below 2**-900 or next to overflowing."""
    bounds = [start, *sorted(start + min(cut, len(weights)) for cut in cuts), start + len(weights)]
    splits = [weights[low - start:high - start] for low, high in zip(bounds, bounds[1:])]
    block_size, kmr.PRIORITY_BLOCK = kmr.PRIORITY_BLOCK, block
    try:
        whole = kmr.whole_mass(itertools.chain.from_iterable(
            kmr.block_masses(split, low) for split, low in zip(splits, bounds)))
    finally:
        kmr.PRIORITY_BLOCK = block_size
    each = [kmr.mass_bounds(split) for split in splits]
    for split, found in zip(splits, each):
        rough = sum(split, 0.0)
        if found is None:
            assert 0.0 < rough <= 2.0 ** -900 or rough * (1 + 2.0 ** -40) == math.inf
        else:
            assert found[0] <= sum(map(Fraction, split)) <= found[1] < math.inf and found[0] <= whole
        assert found is not None or not 2.0 ** -900 < rough < 2.0 ** 1000
    between = kmr.mass_between(each)
    assert between is None or between[0] <= whole <= between[1]


def test_kmeans_parallel_asks_for_the_mass_by_block_only_for_picks_in_doubt(monkeypatch):
    """The splits' mass_bounds decide a round's picks without the mass by block. Where they leave a pick
    in doubt (bounds made twice as wide here), or a split has none (one split, or every one), the
    master asks the splits that sent no mass by block for it; every way picks the same candidates."""
    monkeypatch.setattr(kmr, "PRIORITY_BLOCK", 64)   # blocks that two splits share
    rng = random.Random(3)
    points = [(rng.gauss(centre, 1.0), rng.gauss(-centre, 1.0)) for centre in (0, 10, 20) for _ in range(300)]
    rng.shuffle(points)
    ranges = [(0, 250), (250, 700), (700, 900)]
    plain = kmr.mass_bounds

    def run(bounds):
        monkeypatch.setattr(kmr, "mass_bounds", bounds)
        splits = [kmr.Split(kmr.to_columns(points[low:high], 2)) for low, high in ranges]
        asked = []

        def weigh(candidates, seed, oversample, count_clusters, exact=()):
            asked.extend([sorted(exact)] if exact else [])
            return {task: kmr.weigh_reply(kmr.MapperTasks.oversample_round(
                        splits[task - 1], 1, ranges[task - 1][0], candidates, seed, count_clusters, oversample,
                        bool(exact)), oversample, 2)
                    for task in exact or range(1, len(ranges) + 1)}

        return kmr.kmeans_parallel(points[0], 6, weigh, random.Random(5)), asked

    started, asked = run(plain)
    assert asked == [] and len(started) == 6
    wide, asked = run(lambda weights: (found[0] / 2, found[1] * 2) if (found := plain(weights)) else None)
    assert wide == started and asked and all(tasks == [1, 2, 3] for tasks in asked)
    assert run(lambda weights: None if len(weights) == 450 else plain(weights)) == (started, [[1, 3]] * 5)
    assert run(lambda weights: None) == (started, [])   # every split sent its mass by block


def test_a_kmeans_parallel_round_picks_in_proportion_to_squared_distance():
    """A point is picked when priority x mass < l x D^2: with probability min(1, l D^2 / mass)."""
    priorities = list(enumerate((i + 0.5) / 1000 for i in range(1000)))
    assert [i for i, _ in kmr.may_be_picked(priorities, [1.0] * 1000, 1000.0, 3)] == list(range(3))
    assert [i for i, _ in kmr.may_be_picked(priorities[:4], [0.0, 2.0, 0.0, 5.0], 1.0, 1)] == [1, 3]
    assert kmr.may_be_picked(priorities[:4], [0.0] * 4, 0.0, 1) == []


PRIORITY = st.integers(0, 2 ** 53 - 1).map(lambda k: k / 2 ** 53)   # what random.random() gives


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(PRIORITY, st.floats(0, 1e6)), min_size=1, max_size=50), st.floats(1, 4),
       st.integers(1, 64))
def test_a_split_offers_every_point_the_master_picks(pairs, more, oversample):
    """A mapper offers the points whose priority x (its split's mass) / l < D^2; the master keeps those
    whose priority x (the whole mass) < l x D^2. Every point it keeps was offered, right at the edge
    too, and with weights so small that the products underflow."""
    weights = [w for _, w in pairs]
    mass = math.fsum(weights)
    edges = [math.floor(oversample * w / mass * 2 ** 53) / 2 ** 53 if mass else 0.0 for w in weights]
    for priorities in ([p for p, _ in pairs], [min(e, 1 - 2 ** -53) for e in edges],
                       [min(e + 2 ** -53, 1 - 2 ** -53) for e in edges]):
        offered = {i for i, _ in kmr.may_be_picked(list(enumerate(priorities)), weights, mass, oversample)}
        for whole in (mass, mass * more, math.nextafter(mass, math.inf)):
            assert {i for i, (p, w) in enumerate(zip(priorities, weights)) if p * whole < oversample * w} <= offered


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2 ** 63), st.integers(0, 9000), st.integers(1, 9000), st.integers(1, 64),
       st.sampled_from([1.0, 1e-280, 2.0 ** -1074]), st.integers(0, 2 ** 32))
def test_a_round_draws_only_the_priorities_that_can_matter(seed, start, size, oversample, scale, weights_seed):
    """round_picks draws whole priorities only below PICK_PRIORITY and for the heavy points, yet offers
    exactly what the test over every point's priority offers: light and heavy points, one point
    holding most of the mass, and masses so small that the products underflow."""
    rng = random.Random(weights_seed)
    weights = [scale * rng.choice([0.0, rng.random(), rng.expovariate(1.0) ** 4, 1e3 * rng.random()])
               for _ in range(size)]
    if rng.random() < 0.3:
        weights[rng.randrange(size)] = scale * 1e9   # one point far from every candidate
    mass = math.fsum(weights)
    every = kmr.round_priorities(seed, start, start + size, range(size))
    assert [i for i, _ in every] == list(range(size))
    assert kmr.round_picks(seed, start, weights, mass, oversample) == kmr.may_be_picked(every, weights, mass, oversample)


def test_round_priorities_are_uniform_and_the_same_for_any_split():
    """A point's priority depends on the seed and its index only, whatever split asks; priorities are
    multiples of 2**-53 in [0, 1), spread evenly, and the drawn ones are exactly those below PICK_PRIORITY."""
    size = 200_000
    every = dict(kmr.round_priorities(7, 0, size, range(size)))
    values = list(every.values())
    assert all(0.0 <= p < 1.0 and p * 2 ** 53 == int(p * 2 ** 53) for p in values)
    for low, high in ((0.0, 2 ** -8), (0.0, 0.5), (0.25, 0.75), (0.9, 1.0)):
        share = sum(low <= p < high for p in values) / size
        assert abs(share - (high - low)) < 4 * math.sqrt((high - low) / size)   # 4 standard deviations
    for start, end in kmr.split_ranges(size, 7):
        drawn = kmr.round_priorities(7, start, end)
        assert drawn == [(i - start, p) for i, p in every.items() if start <= i < end and p < kmr.PICK_PRIORITY]
    assert kmr.round_priorities(8, 0, 1000, range(1000)) != [(i, every[i]) for i in range(1000)]


def test_reclustering_weighs_the_candidates():
    """Weighted k-means++ then weighted Lloyd: a heavy candidate pulls its cluster's centroid; a
    candidate that no point is nearest to is dropped."""
    candidates = [(0.0,), (1.0,), (10.0,), (50.0,)]
    centroids = kmr.recluster(candidates, [3, 1, 4, 0], 2, random.Random(1))
    assert sorted(centroids) == [(0.25,), (10.0,)]
    assert kmr.topped_up([(1.0,), (1.0,)], [(1.0,), (2.0,), (3.0,)], 3) == [(1.0,), (2.0,), (3.0,)]
