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
        how = draw(st.sampled_from(["points", "nudge", "lloyd", "fresh", "fling"]))
        if how == "fresh" or not sequence:
            centroids = [draw(point) for _ in range(clusters)]
        elif how == "fling":   # one centroid flung far away (a cluster taking an outlier), or back again
            centroids = list(sequence[-1])
            flung = draw(st.integers(0, clusters - 1))
            centroids[flung] = draw(st.sampled_from([tuple(x * 1e100 for x in centroids[flung]),
                                                     tuple([1e140] * dim), points[0]]))
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
@given(scenarios(), st.integers(1, 7), st.booleans(), st.sampled_from([kmr.FAR_MOVE, 1e-3]), st.booleans())
def test_kept_assignment_equals_nearest_point_by_point(scenario, chunk, unrolled, far_move, measured):
    """(A small far_move marks most moving centroids far, so the test for far ones is taken often;
    `measured` makes the assignment take math.dist's distances at any D, as it does from D=6.)"""
    points, sequence = scenario
    assume(all(abs(x) <= kmr.MAX_COORDINATE for p in points for x in p))
    assume(all(abs(x) <= kmr.MAX_COORDINATE for centroids in sequence for c in centroids for x in c))
    columns, texts = columns_of(points), [",".join(map(repr, p)) for p in points]
    magnitudes = kmr.coordinate_range(columns)
    chunk_size, kmr.ASSIGN_CHUNK = kmr.ASSIGN_CHUNK, chunk   # several passes per step, as on big splits
    most_unrolled, kmr.MAX_UNROLLED = kmr.MAX_UNROLLED, kmr.MAX_UNROLLED if unrolled else 0   # both loops
    far_before, kmr.FAR_MOVE = kmr.FAR_MOVE, far_move
    norm_from, kmr.NORM_FROM_DIM = kmr.NORM_FROM_DIM, 1 if measured else math.inf
    try:
        state = kmr.new_assignment(columns, sequence[0], texts, kmr.square_terms(columns, magnitudes))
        assert held(state, columns, texts) == from_scratch(points, sequence[0])
        bounds_hold(state, columns)
        for centroids in sequence[1:]:
            old_keys = list(state.keys)
            moved = kmr.reassign(state, columns, texts, centroids)
            expected = from_scratch(points, centroids)
            assert held(state, columns, texts) == expected
            assert moved == sum(a != b for a, b in zip(old_keys, expected[0]))
            bounds_hold(state, columns)
    finally:
        kmr.ASSIGN_CHUNK, kmr.MAX_UNROLLED, kmr.FAR_MOVE = chunk_size, most_unrolled, far_before
        kmr.NORM_FROM_DIM = norm_from


def bounds_hold(state, columns):
    """Every kept bound is a bound, in exact arithmetic: the upper one (with its cluster's drift, rounded
    up once more) at least the true distance to the point's centroid, the lower one at most the true
    distance to any other centroid not far (far ones have a test of their own)."""
    def squared(point, centroid):
        return sum((Fraction(x) - Fraction(c)) ** 2 for x, c in zip(point, centroid))
    for i, point in enumerate(zip(*columns)):
        key = state.keys[i]
        reach = Fraction(state.upper[i]) + Fraction(state.grown[key]) * (1 + Fraction(1, 2 ** 53))
        assert reach >= 0 and reach ** 2 >= squared(point, state.centroids[key])
        others = [squared(point, c) for j, c in enumerate(state.centroids) if j != key and state.far[j] is None]
        if state.lower[i] == math.inf:
            assert not others
        elif state.lower[i] > -math.inf:
            floor = Fraction(state.lower[i]) - Fraction(state.shrunk[key])
            assert floor <= 0 or all(floor ** 2 <= other for other in others)


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
        state = kmr.new_assignment(columns, centroids, None, kmr.square_terms(columns, magnitudes))
        for _ in range(6):
            centroids = [tuple(x + rng.gauss(0, rng.choice([0.1, 1.0, 5.0])) for x in c) for c in centroids]
            kmr.reassign(state, columns, None, centroids)
            assert list(state.keys) == [kmr.nearest(p, centroids) for p in points]
            bounds_hold(state, columns)
    finally:
        kmr.MAX_UNROLLED = most_unrolled


@settings(max_examples=400, deadline=None)
@given(st.integers(1, 70).flatmap(lambda dim: st.tuples(st.tuples(*[COORDINATES] * dim),
                                                          st.tuples(*[COORDINATES] * dim))))
def test_math_dist_is_within_the_error_every_bound_allows(pair):
    """measured_bounds makes bounds from math.dist as from `nearest`'s distances, which needs it within
    rho x the true distance + tau; it is within 3 ROUNDOFF x it + tau, checked in exact arithmetic."""
    point, centroid = pair
    assume(all(abs(x) <= kmr.MAX_COORDINATE for x in point + centroid))
    exact = sum((Fraction(x) - Fraction(c)) ** 2 for x, c in zip(point, centroid))
    measured = Fraction(math.dist(point, centroid))
    tau = Fraction(2 * math.sqrt(len(point)) * 2.0 ** -537)
    low, high = 1 - 3 * Fraction(kmr.ROUNDOFF), 1 + 3 * Fraction(kmr.ROUNDOFF)
    assert measured <= tau or ((measured - tau) / high) ** 2 <= exact   # measured <= high x true + tau
    assert ((measured + tau) / low) ** 2 >= exact                        # measured >= low x true - tau


@pytest.mark.parametrize("dim", [6, 16, 64])
def test_assignment_by_math_dist_keeps_nearest_keys_on_ties(dim):
    """From D=6 the assignment measures with math.dist; points on a bisector, a few ulps off it, and
    duplicate centroids are settled by `nearest`'s own arithmetic, and every bound holds."""
    rng = random.Random(dim)
    centroids = [tuple(rng.uniform(-50, 50) for _ in range(dim)) for _ in range(5)]
    centroids.append(centroids[2])   # a duplicate: its points tie exactly
    points = [tuple(rng.gauss(0, 30) for _ in range(dim)) for _ in range(300)]
    for first, second in [(0, 1), (1, 3), (2, 4), (3, 5)]:
        middle = tuple((a + b) / 2 for a, b in zip(centroids[first], centroids[second]))
        points += [middle] + [tuple(nudged(x, steps) for x in middle) for steps in (-2, -1, 1, 2)]
    columns = columns_of(points)
    state = kmr.new_assignment(columns, centroids, None, kmr.square_terms(columns, kmr.coordinate_range(columns)))
    assert list(state.keys) == [kmr.nearest(p, centroids) for p in points]
    bounds_hold(state, columns)
    assert 5 not in state.keys   # the duplicate loses every tie to the first one
    for steps in (1, -2, 3):   # points in doubt are measured with math.dist too: the same ties, a few ulps apart
        centroids = [tuple(nudged(x, steps) for x in c) if k in (0, 3) else c for k, c in enumerate(centroids)]
        kmr.reassign(state, columns, None, centroids)
        assert list(state.keys) == [kmr.nearest(p, centroids) for p in points]
        assert state.rechecked > 0 and 5 not in state.keys
        bounds_hold(state, columns)


def test_points_are_skipped_on_well_separated_data():
    """The bounds do prune: after a small move, only points near a boundary are examined again."""
    points = [(x / 10, 0.0) for x in range(100)] + [(50 + x / 10, 0.0) for x in range(100)]
    columns = columns_of(points)
    magnitudes = kmr.coordinate_range(columns)
    state = kmr.new_assignment(columns, [(0.0, 0.0), (60.0, 0.0)], None, kmr.square_terms(columns, magnitudes))
    kmr.reassign(state, columns, None, [(1.0, 0.0), (59.0, 0.0)])
    assert state.examined == 0   # every point is far nearer its own centroid than the other
    assert list(state.keys) == [kmr.nearest(p, [(1.0, 0.0), (59.0, 0.0)]) for p in points]


@pytest.mark.parametrize("points", [[(1e-120, 0.0), (3e-120, 0.0)], [(1e120, 1.0), (-1e120, 2.0)],
                                    [(5e-324, 1.0), (0.0, 3.0)], [(1e150, 1.0), (-1e150, 2.0)]])
def test_coordinates_beyond_the_tame_range_keep_exact_keys_and_sse(points):
    columns = columns_of(points)
    magnitudes = kmr.coordinate_range(columns)
    assert not kmr.is_tame(magnitudes)
    state = kmr.new_assignment(columns, points, None, kmr.square_terms(columns, magnitudes))
    assert kmr.exact_total([state.sse]) == 0.0
    moved = kmr.reassign(state, columns, None, points[::-1])
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
            parts.append(kmr.new_assignment(columns, centroids, None, kmr.square_terms(columns, magnitudes)).sse)
        assert kmr.exact_total(parts) == exact
    assert kmr.bytes_integer(kmr.integer_bytes(-(3 << 2000))) == -(3 << 2000) and kmr.integer_bytes(0) == b""


def examined_with_and_without_far(points, start, steps):
    """Follow `steps` from `start` with centroids marked far as kmr marks them, then with none ever
    marked (FAR_MOVE infinite), checking keys and bounds at every step. Returns the points examined per
    step both ways, and which centroids were far after each step when marked."""
    columns = columns_of(points)
    magnitudes = kmr.coordinate_range(columns)
    examined, marked, far_before = {}, [], kmr.FAR_MOVE
    try:
        for far_move in (far_before, math.inf):
            kmr.FAR_MOVE = far_move
            state = kmr.new_assignment(columns, start, None, kmr.square_terms(columns, magnitudes))
            examined[far_move] = []
            for centroids in steps:
                kmr.reassign(state, columns, None, centroids)
                assert list(state.keys) == [kmr.nearest(p, centroids) for p in points]
                bounds_hold(state, columns)
                examined[far_move].append(state.examined)
                if far_move == far_before:
                    marked.append([moved is not None for moved in state.far])
    finally:
        kmr.FAR_MOVE = far_before
    return examined[far_before], examined[math.inf], marked


def test_a_centroid_flung_far_by_an_outlier_leaves_the_other_bounds_alone():
    """A cluster that takes a 1e150 outlier moves its centroid by about 1e148, then onto the outlier:
    that centroid is marked far, so its moves stay out of the other clusters' lower bounds, and once
    the others settle no point is measured. Not marked, those moves leave bounds that can never prove
    anything again (they carry a drift of 1e150), and some points are measured at every step."""
    points = [(x + i / 2, y + j / 2) for x, y in [(0, 0), (20, 0), (0, 20), (20, 20)]
              for i in range(10) for j in range(10)]
    points.append((1e150, 0.0))
    start = points[0:400:100]   # one in each block of 100
    steps = [kmr.kmeans_reference(points, start, n)[0] for n in range(1, 9)]
    # at 1e150 every centroid is equally near the outlier (the differences round alike): the first takes it
    assert steps[0][0][0] > 1e147 and steps[1][0][0] == 1e150 and steps[-1] == steps[-2]
    marked_far, never_far, marked = examined_with_and_without_far(points, start, steps)
    assert marked[-1] == [True, False, False, False]
    assert marked_far[-3:] == [0, 0, 0], marked_far
    assert min(never_far[-3:]) > 0, never_far


def test_a_centroid_marked_far_at_a_crowded_start_rejoins_the_others():
    """Five centroids start inside one tight blob; the one that takes the two wide blobs moves 20 units
    where the others are 0.001 apart, so it is marked far. Once the others spread out, all it moved is
    no longer far by the same measure: it rejoins them, their lower bounds take in its move at once, and
    a step later the points examined are those examined with no centroid ever marked far."""
    points = [(i / 1000,) for i in range(200)] + [(10 + i / 20,) for i in range(200)]
    points += [(30 + i / 20,) for i in range(200)]
    start = [(0.0,), (0.001,), (0.002,), (0.003,), (0.199,)]
    steps = [kmr.kmeans_reference(points, start, n)[0] for n in range(1, 12)]
    marked_far, never_far, marked = examined_with_and_without_far(points, start, steps)
    assert marked[0] == [False] * 4 + [True] and marked[-1] == [False] * 5
    back = marked.index([False] * 5)
    assert marked_far[back + 2:] == never_far[back + 2:], (marked_far, never_far)
