"""The pure core, function by function: parse, split, map, partition, combine, shuffle-sort, reduce."""

import heapq
import math
from array import array
from fractions import Fraction

import pytest
from hypothesis import example, given, settings, strategies as st

import kmr

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


def points_of(dim, max_size=60):
    """Lists of D-dimensional points, duplicates likely."""
    return st.lists(st.tuples(*[finite] * dim), min_size=1, max_size=max_size)


# -- parsing ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("line, expected", [
    ("0.4,7.2", (0.4, 7.2)),
    ("2.4253966361924117, 14.200140998826638 ", (2.4253966361924117, 14.200140998826638)),
    ("8.6,2.6\r\n", (8.6, 2.6)),
    ("  -3 , 4e2\n", (-3.0, 400.0)),
    ("5", (5.0,)),
])
def test_parse_point_accepts_what_real_files_contain(line, expected):
    assert kmr.parse_point(line, "f:1") == expected


@pytest.mark.parametrize("line", ["", "   ", "\r\n", "\n"])
def test_blank_lines_are_no_point(line):
    assert kmr.parse_point(line, "f:1") is None


@pytest.mark.parametrize("line, fragment", [
    ("1.0,abc", "'abc' is not a number"),
    ("1.0,,2.0", "'' is not a number"),
    ("nan,1", "not a finite number"),
    ("1,-inf", "not a finite number"),
    ("1e200,1", "too large"),
])
def test_parse_point_names_what_is_wrong(line, fragment):
    with pytest.raises(kmr.InputError, match="f:9: ") as error:
        kmr.parse_point(line, "f:9")
    assert fragment in str(error.value)


def test_parse_points_keeps_file_line_numbers_across_blank_lines():
    lines = ["1,2\n", "\n", "3,4\n", "  \n", "5,6,7\n"]
    with pytest.raises(kmr.InputError, match=r"f:5: 3 coordinates, expected 2"):
        list(kmr.parse_points(lines, "f"))
    assert [n for n, _ in kmr.parse_points(lines[:4], "f")] == [1, 3]


# -- split ------------------------------------------------------------------------------------------

@given(st.integers(0, 10_000), st.integers(1, 300))
def test_split_ranges_cover_every_index_once_with_sizes_within_one(n_points, n_tasks):
    ranges = kmr.split_ranges(n_points, n_tasks)
    assert len(ranges) == n_tasks
    assert ranges[0][0] == 0 and ranges[-1][1] == n_points
    assert all(end == next_start for (_, end), (next_start, _) in zip(ranges, ranges[1:]))
    sizes = [end - start for start, end in ranges]
    assert max(sizes) - min(sizes) <= 1


# -- map --------------------------------------------------------------------------------------------

def assign_clusters(columns, centroids):
    """The compiled map, all points at once: keys, squared distances and each cluster's points by column."""
    keys, distances, _ = kmr.two_nearest(columns, centroids)
    members = [[[column[i] for i in indices] for column in columns]
               for indices in kmr.indices_by_key(keys, len(centroids))]
    return list(keys), list(distances), members


@given(st.integers(1, 4).flatmap(lambda d: st.tuples(points_of(d), points_of(d, 8))))
def test_compiled_assignment_equals_nearest_point_by_point(data):
    points, centroids = data
    keys, distances, members = assign_clusters(kmr.to_columns(points, len(points[0])), centroids)
    assert keys == [kmr.nearest(p, centroids) for p in points]
    assert distances == [kmr.squared_distance(p, centroids[k]) for p, k in zip(points, keys)]
    assert [[list(column) for column in member] for member in members] == \
        [kmr.to_columns([p for p, k in zip(points, keys) if k == key], len(points[0])) for key in range(len(centroids))]


def test_ties_go_to_the_lowest_centroid_index():
    centroids = [(2.0, 0.0), (0.0, 0.0), (-2.0, 0.0), (0.0, 0.0)]
    keys, _, _ = assign_clusters([[1.0, -1.0, 0.0], [0.0, 0.0, 0.0]], centroids)
    assert keys == [0, 1, 1]   # (1,0) is as near to 0 as to 1; (-1,0) to 1, 2 and 3
    assert [key for key, _, _ in kmr.map_points([(1.0, 0.0), (-1.0, 0.0), (0.0, 0.0)], centroids)] == [0, 1]


@given(st.integers(1, 4).flatmap(lambda d: st.tuples(points_of(d), points_of(d, 8))))
def test_textbook_map_groups_each_point_under_its_nearest_centroid(data):
    points, centroids = data
    expected = [(key, [p for p in points if kmr.nearest(p, centroids) == key]) for key in range(len(centroids))]
    assert [(key, count, columns) for key, count, columns in kmr.map_points(points, centroids)] == \
        [(key, len(group), kmr.to_columns(group, len(points[0]))) for key, group in expected if group]


# -- partition, combine, shuffle-sort, reduce ------------------------------------------------------

def test_compiled_assignment_without_unrolling_equals_nearest(monkeypatch):
    monkeypatch.setattr(kmr, "MAX_UNROLLED", 0)   # the path for K*D too large to unroll
    points = [(0.0, 0.0), (1.0, 1.0), (5.0, 5.0), (2.5, 2.5)]
    centroids = [(0.0, 0.0), (5.0, 5.0), (0.0, 0.0)]
    keys, distances, members = assign_clusters(kmr.to_columns(points, 2), centroids)
    assert keys == [kmr.nearest(p, centroids) for p in points] == [0, 0, 1, 0]
    assert distances == [0.0, 2.0, 0.0, 12.5]
    assert [[list(c) for c in m] for m in members] == [[[0.0, 1.0, 2.5], [0.0, 1.0, 2.5]], [[5.0], [5.0]], [[], []]]


@given(st.lists(st.integers(0, 40), max_size=200), st.integers(1, 9))
def test_partition_sends_each_key_to_exactly_one_reducer(keys, reducers):
    columns = [[float(i) for i in range(len(keys))]]
    members = [[[float(i) for i, k in enumerate(keys) if k == key]] for key in range(41)]
    records = kmr.map_records(members)
    partitions = kmr.partition(records, reducers)
    owners = {}
    for number, part in enumerate(partitions):
        assert [key for key, _, _ in part] == sorted(key for key, _, _ in part)
        for key, count, (values,) in part:
            assert kmr.partition_of(key, reducers) == number and count == len(values)
            assert all(keys[int(i)] == key for i in values)
            owners.setdefault(key, set()).add(number)
    assert all(len(o) == 1 for o in owners.values())
    assert sorted(i for part in partitions for _, _, (values,) in part for i in values) == columns[0]


def test_indices_by_key_keeps_input_order_within_a_key():
    assert kmr.indices_by_key([2, 0, 2, 1, 0], 4, 10) == [[11, 14], [13], [10, 12], []]


def test_shuffle_sort_groups_by_key_in_ascending_order():
    from_mapper_1 = [(0, 1, [[2.0], [20.0]]), (2, 2, [[1.0, 3.0], [10.0, 30.0]])]
    from_mapper_2 = [(0, 1, [[4.0], [40.0]])]
    groups = kmr.shuffle_sort([from_mapper_1, from_mapper_2], 2)
    assert [key for key, _ in groups] == [0, 2]
    assert (groups[0][1].count, groups[0][1].terms) == (2, [[[2.0], [4.0]], [[20.0], [40.0]]])
    assert groups[1][1].count == 2


def test_reduce_is_the_correctly_rounded_mean():
    columns = [[0.1, 0.2, 0.3], [1e16, 1.0, -1e16]]
    exact = [float(sum(map(Fraction, column))) / 3 for column in columns]   # round(exact sum) / count
    group = kmr.Group(3, [[column[:1], column[1:]] for column in columns])
    assert kmr.reduce_cluster(group) == tuple(exact) == (0.6 / 3, 1.0 / 3)
    assert (0.1 + 0.2 + 0.3, 1e16 + 1.0 - 1e16) != (0.6, 1.0)   # a naive sum would differ


@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e150, max_value=1e150)
                | st.sampled_from([0.0, 5e-324, 2.0 ** -1022, 2.0 ** -600, 1e-20, 1.0, 2.0 ** 53, 1e150, -1e150])))
def test_exact_terms_sum_exactly_to_the_values(values):
    """Exact from a list, an array (read in place) or an iterator, at every scale."""
    for given_as in (list, lambda v: array("d", v), iter):
        terms = kmr.exact_terms(given_as(values))
        assert sum(map(Fraction, terms), Fraction(0)) == sum(map(Fraction, values), Fraction(0))
        assert math.fsum(terms) == math.fsum(values) and 0.0 not in terms


@given(st.integers(1, 3).flatmap(lambda d: st.tuples(points_of(d, 80), st.integers(1, 5),
                                                      st.integers(1, 4))))
def test_combined_records_reduce_to_the_same_means_as_points(data):
    points, clusters, pieces = data
    dim = len(points[0])
    keys = [i % clusters for i in range(len(points))]

    def records_of(share_keys, share_points):
        members = [kmr.to_columns([p for p, k in zip(share_points, share_keys) if k == key], dim)
                   for key in range(clusters)]
        return kmr.map_records(members)

    plain = kmr.shuffle_sort([records_of(keys, points)], dim)
    combined = [with_combiner(records_of(keys[piece::pieces], points[piece::pieces]))   # per mapper
                for piece in range(pieces) if points[piece::pieces]]
    merged = kmr.shuffle_sort(combined, dim)
    assert [(k, g.count, repr(kmr.reduce_cluster(g))) for k, g in plain] == \
           [(k, g.count, repr(kmr.reduce_cluster(g))) for k, g in merged]


def test_empty_cluster_keeps_its_previous_centroid():
    old = [(0.0, 0.0), (5.0, 5.0), (9.0, 9.0)]
    assert kmr.next_centroids(old, {0: (1.0, 1.0), 2: (8.0, 8.0)}) == [(1.0, 1.0), (5.0, 5.0), (8.0, 8.0)]


def with_combiner(records):
    """What a mapper with the combiner sends: per record, the exact terms of each coordinate sum."""
    return [(key, count, [kmr.exact_terms(values) for values in sums]) for key, count, sums in records]


def as_lists(records):
    return [(key, count, [list(values) for values in sums]) for key, count, sums in records]


def test_partition_chunks_round_trip_through_bytes_and_stay_bounded(monkeypatch):
    monkeypatch.setattr(kmr, "CHUNK_VALUES", 4)
    records = [(1, 3, [[0.1, -2.5, 1e-300], [7.0, 8.0, -0.0]]), (3, 1, [[5.0], [6.0]])]
    chunks = list(kmr.record_chunks(records, 2, splittable=True))
    assert len(chunks) == 2 and all(len(c.values) <= 4 * 8 for c in chunks)
    decoded = [r for c in chunks for r in kmr.decode_chunk(c, 2)]
    assert as_lists(decoded) == [(1, 2, [[0.1, -2.5], [7.0, 8.0]]), (1, 1, [[1e-300], [-0.0]]),
                                 (3, 1, [[5.0], [6.0]])]
    combined = with_combiner(records)
    chunks = list(kmr.record_chunks(combined, 2, splittable=False))
    assert as_lists(r for c in chunks for r in kmr.decode_chunk(c, 2)) == as_lists(combined)


def test_malformed_chunk_is_refused():
    (chunk,) = kmr.record_chunks([(1, 2, [[1.0, 2.0]])], 1, splittable=True)
    chunk.values = chunk.values[:8]
    with pytest.raises(ValueError):
        kmr.decode_chunk(chunk, 1)
    with pytest.raises(ValueError):
        kmr.decode_chunk(next(kmr.record_chunks([(1, 1, [[1.0]])], 1, True)), 2)


@pytest.mark.parametrize("text, message", [
    ("1,2\n3,4\n\n5,x\n", "f:4: 'x' is not a number"),
    ("1,2\n3,4,5\n", "f:2: 3 coordinates, expected 2"),
    ("1,2\n3\n4,5,6\n", "f:2: 1 coordinates, expected 2"),   # the field count adds up, lines don't
    ("1,2\n3,inf\n", "f:2: inf is not a finite number"),
])
def test_fast_block_parser_falls_back_to_naming_the_line(text, message):
    with pytest.raises(kmr.InputError, match=message):
        kmr.parse_flat(text.splitlines(True), 1, "f", None)


@given(st.integers(1, 3).flatmap(lambda dim: st.tuples(st.just(dim), st.lists(st.lists(
    st.sampled_from([0.0, -0.0, 5e-324, -1e-300, 1e150, -1e150, 2.5]) | st.floats(-1e150, 1e150),
    min_size=dim, max_size=dim), min_size=1, max_size=60))), st.integers(0, 60), st.integers(0, 60),
       st.sampled_from([1, 40, 1 << 20]))
def test_a_split_read_fast_has_the_points_and_magnitudes_of_its_lines(tmp_path_factory, case, low, high, block):
    """Any split of any file, read in blocks of any size (a line at a time, a few, all of them)."""
    dim, points = case
    low, high = sorted((min(low, len(points)), min(high, len(points))))
    path = tmp_path_factory.mktemp("split") / "points.txt"
    path.write_text("".join(",".join(map(repr, point)) + "\n" for point in points))
    block_bytes, kmr.BLOCK_BYTES = kmr.BLOCK_BYTES, block
    try:
        columns, _, magnitudes = kmr.read_split(str(path), low, high, dim, False, kmr.input_identity(str(path)))
    finally:
        kmr.BLOCK_BYTES = block_bytes
    mine = points[low:high]
    assert [list(column) for column in columns] == [list(column) for column in zip(*mine)] or not mine
    assert magnitudes == kmr.coordinate_range([[p[d] for p in mine] for d in range(dim)])


@pytest.mark.parametrize("text", ["1,2\n3,nan\n", "1,2\n-Infinity,2\n", "1,2\n1e309,2\n", "1,-1e309\n",
                                  "1,2\n1.5e150,0\n", "1,2\n0,-2e150\n"])
def test_the_fast_path_lets_no_nan_infinity_or_huge_value_through(text):
    with pytest.raises(kmr.InputError, match="f:"):
        kmr.parse_flat(text.splitlines(True), 1, "f", None)


def test_fast_block_parser_reads_points_after_points():
    values, dim, lines, largest = kmr.parse_flat(["1, 2 \r\n", "\n", "-3e2,4.5"], 1, "f", None)
    assert (values, dim, len(lines), largest) == ([1.0, 2.0, -300.0, 4.5], 2, 2, 300.0)


# -- the sequential reference on published cases --------------------------------------------------

def test_reference_reproduces_a_hand_computed_iteration():
    points = [(0.0,), (1.0,), (10.0,), (12.0,)]
    centroids, iterations = kmr.kmeans_reference(points, [(0.0,), (1.0,)], 1)
    assert centroids == [(0.0,), (23.0 / 3,)] and iterations == 1
    centroids, iterations = kmr.kmeans_reference(points, [(0.0,), (1.0,)], 10)
    assert centroids == [(0.5,), (11.0,)] and iterations == 3


@given(st.lists(st.integers(0, 6), min_size=1, max_size=120), st.integers(1, 5), st.integers(1, 4), st.integers(0, 99))
def test_merged_split_draws_are_the_k_distinct_points_of_lowest_priority(values, size, splits, seed):
    """However the input is split, merging the splits' draws gives the K distinct points whose lowest
    copy has the lowest priority: what one pass over the whole input would pick."""
    points = [(float(v),) for v in values]
    priorities = [p for _, p in kmr.draw_priorities(seed, 0, len(points), 256)]   # every point's
    lowest = {}   # brute force: each point's lowest (priority, index)
    for index, (point, priority) in enumerate(zip(points, priorities)):
        lowest[point] = min(lowest.get(point, (math.inf, 0)), (priority, index))
    expected = sorted(lowest, key=lowest.get)[:size]
    draws = []
    for start, end in kmr.split_ranges(len(points), splits):
        part = [array("d", [p[0] for p in points[start:end]])]
        assert [p for _, p in kmr.draw_priorities(seed, start, end, 256)] == priorities[start:end]   # any M
        draws.append(kmr.lowest_drawn(part, seed, start, size))
    assert [point for _, _, point in kmr.merge_draws(draws, size)] == expected


def test_a_draw_looks_past_the_copies_for_k_distinct_points():
    """20,000 copies of one point and one other: the lowest priorities hold only copies, so the draw
    widens its limit until it finds the other point, which it returns second (its only copy is lowest)."""
    column = array("d", [1.0] * 20_000 + [2.0])
    drawn = kmr.lowest_drawn([column], 3, 0, 2)
    assert [point for _, _, point in drawn] == [(1.0,), (2.0,)]
    assert drawn[1][1] == 20_000 and drawn[0][0] == min(p for _, p in kmr.draw_priorities(3, 0, 20_001, 256))


@given(st.integers(1, 20_000), st.integers(0, 3500), st.integers(0, 2**32), st.integers(0, 10_000))
@settings(max_examples=60, deadline=None)
def test_the_lowest_drawn_points_are_those_of_every_priority(size, count, seed, first):
    """Whole priorities are taken only below a limit, yet the lowest `count` points (the plot's, not
    distinct) are heapq.nsmallest's over every point's priority, and a limit keeps exactly the points
    whose priority lies below it: the first byte decides."""
    column = array("d", range(size))
    every = kmr.draw_priorities(seed, first, first + size, 256)
    expected = heapq.nsmallest(count, ((p, first + i) for i, p in every))
    assert [(p, index) for p, index, _ in kmr.lowest_drawn([column], seed, first, count, distinct=False)] == expected
    for limit in (1, 7, 100):
        assert kmr.draw_priorities(seed, first, first + size, limit) == [(i, p) for i, p in every if p < limit / 256]
