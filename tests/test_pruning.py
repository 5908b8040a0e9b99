"""The mapper's kept assignment (Hamerly's bounds) against `nearest`, point by point.

A skipped point must keep exactly the key `nearest` gives it, ties included, whatever the data:
duplicates, exact ties on a bisector, near-ties one ulp apart, huge and tiny coordinates. The
counts, exact sums, members and SSE the assignment carries must equal those computed from scratch.
"""

import math
import random
from fractions import Fraction
from array import array

import pytest
from hypothesis import assume, given, settings, strategies as st

import kmr

COORDINATES = st.one_of(
    st.integers(-4, 4).map(float),                          # duplicates and exact ties
    st.floats(-100, 100, allow_nan=False),
    st.floats(-1e-90, 1e-90, allow_nan=False),              # tiny, and below the prune limits
    st.sampled_from([1e100, -1e100, 1e120, 1e-120, 5e-324, 2.0 ** -1022]),
    st.floats(-1e140, 1e140, allow_nan=False),
)


def nudged(value, steps):
    """A value some ulps away: near-ties."""
    for _ in range(abs(steps)):
        value = math.nextafter(value, math.inf if steps > 0 else -math.inf)
    return value


@st.composite
def scenarios(draw):
    """Points and a sequence of centroid sets, some of them Lloyd steps, some jumps, some near-ties."""
    dim = draw(st.integers(1, 3))
    point = st.tuples(*[COORDINATES] * dim)
    points = draw(st.lists(point, min_size=1, max_size=40))
    points += draw(st.lists(st.sampled_from(points), max_size=10))   # exact duplicates
    clusters = draw(st.integers(1, 5))
    sequence = []
    for _ in range(draw(st.integers(1, 5))):
        how = draw(st.sampled_from(["points", "nudge", "lloyd", "fresh"]))
        if how == "fresh" or not sequence:
            centroids = [draw(point) for _ in range(clusters)]
        elif how == "points":
            centroids = [draw(st.sampled_from(points)) for _ in range(clusters)]
        elif how == "nudge":
            centroids = [tuple(nudged(x, draw(st.integers(-2, 2))) for x in c) for c in sequence[-1]]
        else:
            centroids = kmr.kmeans_reference(points, sequence[-1], 1)[0]
        sequence.append([tuple(c) for c in centroids])
    # a point exactly between two centroids of the last set: a tie nearest breaks by index
    first, second = sequence[-1][0], sequence[-1][-1]
    middle = tuple((a + b) / 2 for a, b in zip(first, second))
    if all(map(math.isfinite, middle)):
        points.append(middle)
    return points, sequence


def from_scratch(points, centroids):
    """What the assignment must hold, by `nearest` and fsum alone."""
    keys = [kmr.nearest(p, centroids) for p in points]
    counts = [keys.count(k) for k in range(len(centroids))]
    sums = [[math.fsum(p[d] for p, key in zip(points, keys) if key == k) for d in range(len(points[0]))]
            for k in range(len(centroids))]
    sse = float(sum((Fraction(x) - Fraction(c)) ** 2 for p, k in zip(points, keys)
                    for x, c in zip(p, centroids[k])))   # exact, then rounded once
    members = [[i for i, key in enumerate(keys) if key == k] for k in range(len(centroids))]
    return keys, counts, sums, sse, members


def held(state, columns, texts):
    """The same quantities, as the assignment holds them; its buckets hold each point's index,
    coordinates and text in step, and each point's slot says where."""
    for bucket in state.buckets:
        assert [list(values) for values in bucket.columns] == [[c[i] for i in bucket.indices] for c in columns]
        assert bucket.texts == [texts[i] for i in bucket.indices]
        assert all(state.slots[index] == slot for slot, index in enumerate(bucket.indices))
    sums = [[math.fsum(terms) for terms in per_dim] for per_dim in state.sums]
    return (list(state.keys), state.counts, sums, kmr.exact_total([state.sse]),
            [sorted(bucket.indices) for bucket in state.buckets])


def columns_of(points):
    return [array("d", column) for column in zip(*points)]


@settings(max_examples=300, deadline=None)
@given(scenarios(), st.integers(1, 7), st.booleans())
def test_kept_assignment_equals_nearest_point_by_point(scenario, chunk, unrolled):
    points, sequence = scenario
    assume(all(abs(x) <= kmr.MAX_COORDINATE for p in points for x in p))
    columns, texts = columns_of(points), [",".join(map(repr, p)) for p in points]
    magnitudes = kmr.coordinate_range(columns)
    chunk_size, kmr.ASSIGN_CHUNK = kmr.ASSIGN_CHUNK, chunk   # several passes per step, as on big splits
    most_unrolled, kmr.MAX_UNROLLED = kmr.MAX_UNROLLED, kmr.MAX_UNROLLED if unrolled else 0   # both loops
    try:
        state = kmr.new_assignment(columns, sequence[0], texts, magnitudes, kmr.square_terms(columns, magnitudes))
        assert held(state, columns, texts) == from_scratch(points, sequence[0])
        for centroids in sequence[1:]:
            old_keys = list(state.keys)
            moved = kmr.reassign(state, columns, texts, centroids, magnitudes)
            expected = from_scratch(points, centroids)
            assert held(state, columns, texts) == expected
            assert moved == sum(a != b for a, b in zip(old_keys, expected[0]))
    finally:
        kmr.ASSIGN_CHUNK, kmr.MAX_UNROLLED = chunk_size, most_unrolled


def bounds_hold(state, columns):
    """Every kept bound is a bound: the upper one at least the distance to the point's centroid, the
    lower one at most the distance to any other centroid."""
    for i, point in enumerate(zip(*columns)):
        key = state.keys[i]
        distances = [math.sqrt(kmr.squared_distance(point, c)) for c in state.centroids]
        others = distances[:key] + distances[key + 1:]
        assert state.upper[i] + state.grown[key] >= distances[key]
        assert state.lower[i] - state.shrunk[key] <= min(others, default=math.inf)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(2, 12), st.integers(0, 2**32), st.booleans())
def test_competing_centroids_are_all_measured(dim, clusters, seed, unrolled):
    """Many clusters that jump about: points in doubt are measured only against centroids near
    enough to their own to compete; none that could win is left out, and no bound overstates."""
    rng = random.Random(seed)
    points = [tuple(rng.choice([rng.gauss(0, 10), float(rng.randint(-3, 3))]) for _ in range(dim))
              for _ in range(300)]
    columns = columns_of(points)
    magnitudes = kmr.coordinate_range(columns)
    centroids = rng.sample(points, clusters)
    most_unrolled, kmr.MAX_UNROLLED = kmr.MAX_UNROLLED, kmr.MAX_UNROLLED if unrolled else 0
    try:
        state = kmr.new_assignment(columns, centroids, None, magnitudes, kmr.square_terms(columns, magnitudes))
        for _ in range(6):
            centroids = [tuple(x + rng.gauss(0, rng.choice([0.1, 1.0, 5.0])) for x in c) for c in centroids]
            kmr.reassign(state, columns, None, centroids, magnitudes)
            assert list(state.keys) == [kmr.nearest(p, centroids) for p in points]
            bounds_hold(state, columns)
    finally:
        kmr.MAX_UNROLLED = most_unrolled


def test_points_are_skipped_on_well_separated_data():
    """The bounds do prune: after a small move, only points near a boundary are examined again."""
    points = [(x / 10, 0.0) for x in range(100)] + [(50 + x / 10, 0.0) for x in range(100)]
    columns = columns_of(points)
    magnitudes = kmr.coordinate_range(columns)
    state = kmr.new_assignment(columns, [(0.0, 0.0), (60.0, 0.0)], None, magnitudes,
                               kmr.square_terms(columns, magnitudes))
    kmr.reassign(state, columns, None, [(1.0, 0.0), (59.0, 0.0)], magnitudes)
    assert state.examined == 0   # every point is far nearer its own centroid than the other
    assert list(state.keys) == [kmr.nearest(p, [(1.0, 0.0), (59.0, 0.0)]) for p in points]


@pytest.mark.parametrize("points", [[(1e-120, 0.0), (3e-120, 0.0)], [(1e120, 1.0), (-1e120, 2.0)],
                                    [(5e-324, 1.0), (0.0, 3.0)], [(1e150, 1.0), (-1e150, 2.0)]])
def test_coordinates_beyond_the_tame_range_keep_exact_keys_and_sse(points):
    columns = columns_of(points)
    magnitudes = kmr.coordinate_range(columns)
    assert not kmr.is_tame(magnitudes)
    state = kmr.new_assignment(columns, points, None, magnitudes, kmr.square_terms(columns, magnitudes))
    assert kmr.exact_total([state.sse]) == 0.0
    moved = kmr.reassign(state, columns, None, points[::-1], magnitudes)
    assert list(state.keys) == [1, 0] and moved == 2
    expected = from_scratch(points, points[::-1])
    assert kmr.exact_total([state.sse]) == expected[3]


def test_an_sse_needing_integers_is_rounded_once_for_the_whole_job():
    """Tiny coordinates take the integer path; the SSE of the whole job, however it is split, is the
    exact value rounded once (a split rounded on its own can end half an ulp off)."""
    points = [(8.375367045258084e-156,), (-4.269796201430959e-155,), (-4.122591815096725e-156,)]
    centroids = [(-1.8817001441323715e-154,)]
    exact = float(sum((Fraction(p[0]) - Fraction(centroids[0][0])) ** 2 for p in points))
    for pieces in ([points], [points[:1], points[1:]], [[p] for p in points]):
        parts = []
        for piece in pieces:
            columns = columns_of(piece)
            magnitudes = kmr.coordinate_range(columns)
            parts.append(kmr.new_assignment(columns, centroids, None, magnitudes,
                                            kmr.square_terms(columns, magnitudes)).sse)
        assert kmr.exact_total(parts) == exact
    assert kmr.bytes_integer(kmr.integer_bytes(-(3 << 2000))) == -(3 << 2000) and kmr.integer_bytes(0) == b""
