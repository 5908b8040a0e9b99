"""The distributed job equals the sequential reference bit for bit, for any M and R."""

import math

from hypothesis import example, given, strategies as st

import kmr

coordinates = st.one_of(
    st.integers(-50, 50).map(float),
    st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False),
)


@st.composite
def datasets(draw):
    """Points (duplicates likely), K distinct initial centroids drawn from them, M, R and n; D up to 7, so
    that the assignment also takes math.dist's distances (it does from D=6)."""
    dim = draw(st.sampled_from([1, 2, 3, 4, 6, 7]))
    pool = draw(st.lists(st.tuples(*[coordinates] * dim), min_size=1, max_size=40, unique=True))
    points = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=300))
    distinct = sorted(set(points))
    clusters = draw(st.integers(1, min(6, len(distinct))))
    init = draw(st.permutations(distinct))[:clusters]
    return points, init, draw(st.integers(1, 5)), draw(st.integers(1, 4)), draw(st.integers(1, 6))


def run_distributed(pool, data_dir, points, init, mappers, reducers, iterations, combine=False):
    """Run the real job on the pool's workers; returns (centroids, centroids.txt text)."""
    input_path = data_dir / "points.txt"
    init_path = data_dir / "init.txt"
    input_path.write_text("".join(kmr.format_point(p) + "\n" for p in points))
    init_path.write_text(kmr.format_centroids(init))
    options = kmr.JobOptions(input_path=str(input_path), mappers=mappers, reducers=reducers,
                             clusters=len(init), iterations=iterations, data_dir=str(data_dir),
                             init=str(init_path), mapper_addrs=pool.mappers[:mappers],
                             reducer_addrs=pool.reducers[:reducers], rpc_timeout=20,
                             combine=combine)
    result = kmr.run_job(options)
    return result, (data_dir / "centroids.txt").read_text()


def bits(centroids):
    """Centroids as exact bit patterns (repr round-trips doubles, and tells -0.0 from 0.0)."""
    return [tuple(map(float.hex, c)) for c in centroids]


@given(datasets(), st.integers(1, 5), st.integers(1, 4))
@example(([(0.0,), (1.0,), (10.0,), (12.0,)], [(0.0,), (1.0,)], 5, 4, 10), 1, 1)   # M > N, R > K
@example(([(1.0, 1.0)] * 7, [(1.0, 1.0)], 3, 2, 3), 2, 3)                          # K = 1, duplicates
def test_distributed_centroids_with_or_without_combiner_equal_the_reference_bit_for_bit(worker_pool, tmp_path_factory, data,
                                                                other_mappers, other_reducers):
    points, init, mappers, reducers, iterations = data
    expected, ran = kmr.kmeans_reference(points, init, iterations)
    first, text = run_distributed(worker_pool, tmp_path_factory.mktemp("run"), points, init,
                                  mappers, reducers, iterations)
    assert bits(first.centroids) == bits(expected)
    assert len(first.best.iterations) == ran
    second, other_text = run_distributed(worker_pool, tmp_path_factory.mktemp("run"), points, init,
                                         other_mappers, other_reducers, iterations, combine=True)
    assert other_text == text == kmr.format_centroids(expected)   # the combiner too, bit for bit


def test_per_iteration_story_adds_up(worker_pool, tmp_path):
    """Moved points, SSE and shifts agree with what the reference implies."""
    points = [(0.0, 0.0), (0.0, 1.0), (9.0, 9.0), (9.0, 8.0), (5.0, 5.0)]
    result, _ = run_distributed(worker_pool, tmp_path, points, [(0.0, 0.0), (5.0, 5.0)], 2, 2, 10)
    first, *rest = result.best.iterations
    assert first.moved == len(points)                   # every point gets its first cluster
    assert rest[-1].moved == 0 and rest[-1].shift == 0.0 and result.best.converged
    final = result.centroids
    sse = math.fsum(min(kmr.squared_distance(p, c) for c in final) for p in points)
    assert rest[-1].sse == result.best.sse == sse
    assert rest[-1].counts == [2, 3]
