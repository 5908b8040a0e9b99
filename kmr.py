"""kmr: K-means clustering run as a real MapReduce job over gRPC.

One script, three roles:

    python kmr.py --role master -M 3 -R 2 -K 2 -n 20   # spawn 3 mappers + 2 reducers, run the job
    python kmr.py --role mapper --port 6001            # a standalone mapper, until SIGTERM / Ctrl-C
    python kmr.py --role reducer --port 6002           # a standalone reducer

The master splits the input by index range among M map tasks; each mapper reads its range itself,
assigns every point to its nearest centroid and partitions the pairs by key % R; each reducer pulls
its partition from every mapper, shuffle-sorts it and averages each cluster; the master collects
the new centroids from the reducers.  Everything a run writes lives under --data-dir (default Data).
Results go to stdout, the log to stderr and Data/dump.txt.
"""

import argparse
import collections
import concurrent.futures
import functools
import hmac
import itertools
import logging
import math
import multiprocessing
import operator
import os
import random
import secrets
import signal
import sys
import tempfile
import threading
import time
from array import array
from dataclasses import dataclass, field

os.environ.setdefault("GRPC_VERBOSITY", "NONE")   # gRPC's own C-core lines would break one-line errors
import grpc  # noqa: E402  (after the environment it reads)

try:
    import kmeans_pb2 as pb
    import kmeans_pb2_grpc as pb_grpc
except ImportError:  # pragma: no cover - depends on the checkout
    sys.exit("kmr: error: the gRPC stubs are missing: run ./gen_pb.sh first")

log = logging.getLogger("kmr")

EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 130, 143
MAX_COORDINATE = 1e150        # larger values could overflow a squared distance to inf
MAX_WORKERS = 256             # bound on M, R and the worker processes a master spawns
CHUNK_VALUES = 65536          # doubles per streamed partition chunk (512 KiB)
BLOCK_BYTES = 1 << 20         # input is read and parsed in blocks of lines of about this size
MAX_MESSAGE_BYTES = 16 << 20     # bound on any one gRPC message, both ways
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_http_proxy", 0),   # worker addresses are direct peers, never via $http_proxy
]
REVIVE_EVERY = 10.0   # seconds between pings of a dead worker we did not spawn

# Glossary
#   p        a point: a tuple of D floats          c, centroids   K cluster centres, c[k] for cluster k
#   k, key   cluster id 0..K-1 (map output key)     N              number of input points
#   columns  points stored column by column: columns[d][i] is coordinate d of point i
#   M        map tasks (index ranges of the input)  R              reduce tasks = partitions, key % R
#   n        iterations at most                     tol            stop when no centroid moved more
#   terms    doubles whose exact sum is a cluster sum (what makes the combiner exact)
#   job      one run of the master; workers drop the state of other jobs


class InputError(ValueError):
    """Bad input or arguments the user can fix: one line on stderr, exit code 2."""


class JobError(RuntimeError):
    """The job cannot finish (workers gone, attempts used up): one line on stderr, exit code 1."""


class Terminated(BaseException):
    """SIGTERM arrived: unwind like Ctrl-C so every spawned worker is stopped."""


# ####################################################################################################
# Pure core: parsing, split, map, partition, combine, shuffle-sort, reduce (no I/O, no gRPC)
# ####################################################################################################


def parse_point(text, where, dim=None):
    """The point on one line 'x, y, ...'; None for a blank line. `where` names the line in errors."""
    text = text.strip()
    if not text:
        return None
    fields = text.split(",")
    try:
        point = tuple(map(float, fields))
    except ValueError:
        bad = next(f for f in fields if not _is_float(f))
        raise InputError(f"{where}: {bad.strip()!r} is not a number") from None
    if dim is not None and len(point) != dim:
        raise InputError(f"{where}: {len(point)} coordinates, expected {dim} like the lines before")
    for value in point:
        if not math.isfinite(value):
            raise InputError(f"{where}: {value} is not a finite number")
        if abs(value) > MAX_COORDINATE:
            raise InputError(f"{where}: {value!r} is too large (limit {MAX_COORDINATE:g})")
    return point


def _is_float(text):
    """Whether float() accepts text."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_points(lines, name, first_line=1, dim=None):
    """Yield (line number, point) for every non-blank line; all points must share one dimension."""
    for line_number, line in enumerate(lines, first_line):
        point = parse_point(line, f"{name}:{line_number}", dim)
        if point is not None:
            dim = len(point)
            yield line_number, point


def split_ranges(n_points, n_tasks):
    """Contiguous index ranges [start, end), one per task, sizes differing by at most one."""
    base, extra = divmod(n_points, n_tasks)
    ranges, start = [], 0
    for task in range(n_tasks):
        end = start + base + (task < extra)
        ranges.append((start, end))
        start = end
    return ranges


def to_columns(points, dim):
    """Points as D columns (the layout every map and reduce function works on)."""
    return [[p[d] for p in points] for d in range(dim)]


def squared_distance(point, centroid):
    """Sum of squared coordinate differences, added left to right (the order is part of exactness)."""
    total = 0.0
    for a, b in zip(point, centroid):
        diff = a - b
        total += diff * diff
    return total


def nearest(point, centroids):
    """Index of the nearest centroid; a tie goes to the lowest index."""
    best_key, best = 0, squared_distance(point, centroids[0])
    for key in range(1, len(centroids)):
        distance = squared_distance(point, centroids[key])
        if distance < best:
            best_key, best = key, distance
    return best_key


MAX_UNROLLED = 4096   # K*D up to which assign_clusters compiles its loop unrolled


@functools.lru_cache(maxsize=64)
def unrolled_assigner(clusters, dim):
    """A compiled loop doing, point by point, what `nearest` and `squared_distance` do, and dropping
    each point's coordinates into its cluster's lists.

    Python spends most of a K-means iteration interpreting this loop; with the K distance sums and
    comparisons written out (centroids in local variables) it runs about twice as fast as any
    list-at-a-time formulation. The arithmetic and the strict '<' are exactly those of `nearest`.
    """
    coords = [f"x{d}" for d in range(dim)]
    body = ["def assign(columns, centroids):",
            f"    ({', '.join('(' + ''.join(f'c{k}_{d}, ' for d in range(dim)) + ')' for k in range(clusters))},) "
            "= centroids",
            "    keys, best = [], []",
            "    add_key, add_best = keys.append, best.append",
            f"    members = [[[] for _ in range({dim})] for _ in range({clusters})]",
            *[f"    add{d} = [member[{d}].append for member in members]" for d in range(dim)],
            f"    for {', '.join(coords)}, in zip(*columns):"]
    for key in range(clusters):
        diffs = "; ".join(f"d{d} = x{d} - c{key}_{d}" for d in range(dim))
        total = " + ".join(f"d{d} * d{d}" for d in range(dim))
        if key == 0:
            body.append(f"        {diffs}; b = {total}; k = 0")
        else:
            body += [f"        {diffs}; d = {total}", f"        if d < b: b = d; k = {key}"]
    body += ["        add_key(k); add_best(b)", *[f"        add{d}[k](x{d})" for d in range(dim)],
             "    return keys, best, members"]
    namespace = {}
    exec(compile("\n".join(body), f"<assign K={clusters} D={dim}>", "exec"), namespace)
    return namespace["assign"]


def assign_clusters(columns, centroids):
    """Map: every point's nearest centroid (ties: lowest index) and squared distance to it, and the
    points of each cluster column by column: (keys, distances, members[k][d])."""
    dim = len(columns)
    if len(centroids) * dim <= MAX_UNROLLED:
        return unrolled_assigner(len(centroids), dim)(columns, centroids)
    keys, distances = [], []
    members = [[[] for _ in range(dim)] for _ in centroids]
    for point in zip(*columns):
        key = nearest(point, centroids)
        keys.append(key)
        distances.append(squared_distance(point, centroids[key]))
        for column, value in zip(members[key], point):
            column.append(value)
    return keys, distances, members


def group_by_key(keys):
    """The indices of each key's points, keys ascending, input order kept (for the partition files)."""
    members = collections.defaultdict(list)
    for index, key in enumerate(keys):
        members[key].append(index)
    return sorted(members.items())


def map_records(members):
    """The map output as records (key, count, [the coordinates of its points, per dimension])."""
    return [(key, len(columns[0]), columns) for key, columns in enumerate(members) if columns[0]]


def partition_of(key, reducers):
    """The reduce task (0-based) that owns a cluster."""
    return key % reducers


def partition(records, reducers):
    """Partition: the records of each reduce task, keys ascending within each."""
    partitions = [[] for _ in range(reducers)]
    for record in records:
        partitions[partition_of(record[0], reducers)].append(record)
    return partitions


def exact_terms(values):
    """A few doubles whose exact sum is the exact sum of `values`.

    fsum is correctly rounded, so fsum(values) is the sum's leading double; fsum of the values
    minus the terms found so far is the next one, until nothing is left.  Each term adds ~53 bits.
    """
    pending = list(values)
    terms = []
    while True:
        term = math.fsum(pending)
        if term == 0.0:
            return terms
        terms.append(term)
        pending.append(-term)


def combine(records):
    """Combiner: each record's coordinates replaced by the exact terms of their sum per dimension.

    The values are first copied into one contiguous array: fsum's passes then walk memory in order
    instead of chasing float objects scattered over the heap (a third faster).
    """
    return [(key, count, [exact_terms(array("d", values)) for values in sums])
            for key, count, sums in records]


@dataclass
class Group:
    """What a reducer knows of one cluster: its point count and, per dimension, sequences of doubles
    whose exact sum is the cluster's coordinate sum (points themselves, or combined terms)."""

    count: int
    terms: list


def shuffle_sort(record_lists, dim):
    """Shuffle-sort, reduce side: merge records from every map task into one Group per key, ascending."""
    groups = {}
    for records in record_lists:
        for key, count, sums in records:
            group = groups.get(key)
            if group is None:
                group = groups[key] = Group(0, [[] for _ in range(dim)])
            group.count += count
            for terms, values in zip(group.terms, sums):
                terms.append(values)
    return sorted(groups.items())


def reduce_cluster(group):
    """Reduce: the mean of one cluster, each coordinate fsum / count (exact whatever the split)."""
    return tuple(math.fsum(itertools.chain.from_iterable(terms)) / group.count for terms in group.terms)


def next_centroids(centroids, means):
    """New centroids from {key: mean}; a cluster that got no points keeps its previous centroid."""
    return [means.get(key, old) for key, old in enumerate(centroids)]


def largest_shift(old, new):
    """The largest distance any centroid moved."""
    return max(math.sqrt(squared_distance(a, b)) for a, b in zip(old, new))


def kmeans_reference(points, centroids, n, tol=0.0):
    """Sequential K-means built from the same map / partition / shuffle-sort / reduce functions.

    Returns (final centroids, iterations run).  The distributed job must match it bit for bit.
    """
    centroids = [tuple(c) for c in centroids]
    dim = len(centroids[0])
    columns = to_columns(points, dim)
    for iteration in range(1, n + 1):
        _, _, members = assign_clusters(columns, centroids)
        (records,) = partition(map_records(members), 1)
        means = {key: reduce_cluster(group) for key, group in shuffle_sort([records], dim)}
        new = next_centroids(centroids, means)
        shift = largest_shift(centroids, new)
        centroids = new
        if shift <= tol:
            return centroids, iteration
    return centroids, n


# ####################################################################################################
# Files: input scan, splits, human-readable outputs, atomic writes
# ####################################################################################################


def write_atomic(path, text):
    """Write a whole file or nothing: a temporary file in the same folder, then rename over."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def format_point(point):
    """'x,y,...' in repr precision, so a file read back gives the same doubles."""
    return ",".join(map(repr, point))


def format_centroids(centroids):
    """centroids.txt: one centroid per line."""
    return "".join(format_point(c) + "\n" for c in centroids)


def format_partition(groups, texts):
    """A partition file: one 'key<TAB>x,y,...' pair per line, the coordinates as the input wrote them
    (whitespace removed), which parse back to exactly the doubles the mapper used."""
    return "".join(f"{key}\t" + f"\n{key}\t".join(map(texts.__getitem__, indices)) + "\n"
                   for key, indices in groups)


def format_combined_partition(records):
    """A combined partition file: 'key<TAB>count<TAB>sum terms per coordinate' (terms joined by +)."""
    return "".join(f"{key}\t{count}\t" + ",".join("+".join(map(repr, t)) or "0.0" for t in sums) + "\n"
                   for key, count, sums in records)


def format_reducer_output(clusters):
    """A reducer file: one 'key<TAB>count<TAB>mean' line per cluster."""
    return "".join(f"{key}\t{count}\t{format_point(mean)}\n" for key, count, mean in clusters)


def open_text(path):
    """Open an input file for reading; a missing or unreadable file is an InputError."""
    try:
        return open(path, encoding="utf-8", errors="replace")
    except OSError as error:
        raise InputError(f"cannot read {path}: {error.strerror}") from None


def line_blocks(path):
    """The file as blocks of about 1 MiB of lines, each with the line number of its first line."""
    with open_text(path) as lines:
        first = 1
        while block := lines.readlines(BLOCK_BYTES):
            yield first, block
            first += len(block)


def parse_block(block, first_line, name, dim):
    """The points of a block of lines: (D columns, D, the non-blank lines), validated.

    Fast path: every field through one map(float) and whole-column checks; on any problem the
    block is parsed again line by line, so the error names the line and what is wrong with it.
    """
    lines = [line for line in block if not line.isspace()]
    if not lines:
        return None, dim, lines
    if dim is None:
        dim = lines[0].count(",") + 1
    commas = list(map(str.count, lines, itertools.repeat(",")))
    try:
        if min(commas) != dim - 1 or max(commas) != dim - 1:
            raise ValueError
        values = list(map(float, ",".join(lines).split(",")))
        if not all(map(math.isfinite, values)) or max(map(abs, values)) > MAX_COORDINATE:
            raise ValueError
    except ValueError:
        for _ in parse_points(block, name, first_line, dim):
            pass
        raise InputError(f"{name}:{first_line}: unreadable block") from None   # parse_points raised first
    return [values[d::dim] for d in range(dim)], dim, lines


@dataclass
class InputScan:
    """What the master learns from one pass over the input."""

    points: int
    dim: int
    sample: list   # K distinct points drawn at random (fewer if the input has fewer distinct points)


def scan_input(path, clusters, seed):
    """Validate the whole input in one streaming pass, count its points and draw K distinct ones.

    Every point gets a random priority; the sample is the K distinct points with the lowest
    priority (a point's priority is its lowest over its copies), so the draw is uniform over lines.
    """
    draw = random.Random(seed).random
    chosen = {}
    threshold = math.inf
    count, dim = 0, None
    for first_line, block in line_blocks(path):
        columns, dim, lines = parse_block(block, first_line, path, dim)
        for index, priority in enumerate([draw() for _ in lines]):
            if priority >= threshold:
                continue
            point = tuple(column[index] for column in columns)
            chosen[point] = min(priority, chosen.get(point, priority))
            if len(chosen) > clusters:
                del chosen[max(chosen, key=chosen.get)]
            if len(chosen) == clusters:
                threshold = max(chosen.values())
        count += len(lines)
    if count == 0:
        raise InputError(f"{path}: no points")
    return InputScan(count, dim, sorted(chosen, key=chosen.get))


def read_split(path, start, end, dim, keep_text):
    """Points [start, end) as D columns (and, if asked, each point's text), parsed and validated.

    Blocks before the split are only counted, so memory follows the split, not the file.
    """
    columns, texts = [[] for _ in range(dim)], []
    index = 0
    for first_line, block in line_blocks(path):
        if index >= end:
            break
        in_block = sum(1 for line in block if not line.isspace())
        if in_block and index + in_block > start:
            block_columns, _, lines = parse_block(block, first_line, path, dim)
            low, high = max(0, start - index), min(in_block, end - index)
            for column, values in zip(columns, block_columns):
                column.extend(values[low:high])
            if keep_text:
                texts.extend("".join(line.split()) for line in lines[low:high])
        index += in_block
    if index < end:
        raise InputError(f"{path}: has {index} points, fewer than {end}")
    return columns, texts if keep_text else None


def read_centroids(path, clusters, dim):
    """An --init file: exactly K points of dimension D."""
    with open_text(path) as lines:
        centroids = [p for _, p in parse_points(lines, path)]
    if len(centroids) != clusters:
        raise InputError(f"{path}: {len(centroids)} centroids, expected K={clusters}")
    if len(centroids[0]) != dim:
        raise InputError(f"{path}: centroids have {len(centroids[0])} coordinates, the input has {dim}")
    return centroids


def little_endian(values):
    """Array bytes in little-endian order, the wire order of PartitionChunk."""
    if sys.byteorder == "big":
        values = array(values.typecode, values)
        values.byteswap()
    return values.tobytes()


def from_little_endian(typecode, data):
    """An array from little-endian bytes."""
    values = array(typecode)
    values.frombytes(data)
    if sys.byteorder == "big":
        values.byteswap()
    return values


def record_chunks(records, dim, splittable):
    """Records as bounded PartitionChunk messages; a record of plain points too big for one chunk
    is split into records of fewer points (combined records are a few terms: never split)."""
    keys, counts, terms, values = array("i"), array("q"), array("q"), array("d")

    def chunk():
        return pb.PartitionChunk(dim=dim, keys=little_endian(keys), counts=little_endian(counts),
                                 terms=little_endian(terms), values=little_endian(values))

    for key, count, sums in records:
        step = max(1, CHUNK_VALUES // dim) if splittable else count
        for low in range(0, count, step):
            piece = [values_of_dim[low:low + step] for values_of_dim in sums] if splittable else sums
            if len(values) and len(values) + sum(map(len, piece)) > CHUNK_VALUES:
                yield chunk()
                keys, counts, terms, values = array("i"), array("q"), array("q"), array("d")
            keys.append(key)
            counts.append(min(step, count - low))
            for part in piece:
                terms.append(len(part))
                values.extend(part)
    if len(keys):
        yield chunk()


def decode_chunk(chunk, dim):
    """A PartitionChunk back as records (key, count, per-dimension arrays of doubles)."""
    keys = from_little_endian("i", chunk.keys)
    counts = from_little_endian("q", chunk.counts)
    lengths = from_little_endian("q", chunk.terms)
    values = from_little_endian("d", chunk.values)
    if chunk.dim != dim or len(counts) != len(keys) or len(lengths) != len(keys) * dim \
            or sum(lengths) != len(values) or (len(counts) and min(counts) < 1):
        raise ValueError("malformed partition chunk")
    records, position = [], 0
    for number, (key, count) in enumerate(zip(keys, counts)):
        sums = []
        for length in lengths[number * dim:(number + 1) * dim]:
            sums.append(values[position:position + length])
            position += length
        records.append((key, count, sums))
    return records


def flatten(centroids):
    """Centroids as a pb.Centroids message."""
    dim = len(centroids[0])
    return pb.Centroids(dim=dim, values=[x for c in centroids for x in c])


def unflatten(message):
    """A pb.Centroids message as a list of tuples."""
    dim, values = message.dim, list(message.values)
    return [tuple(values[i:i + dim]) for i in range(0, len(values), dim)]


# ####################################################################################################
# gRPC services: thin servicers that check requests, convert messages and call the pure core
# ####################################################################################################

TOKEN_KEY = "kmr-token"
CRASH_PHASES = ("map", "after-map", "reduce", "after-reduce")
MAX_CLUSTERS = 100_000
MAX_DIM = 4096


def success(message=""):
    """A SUCCESS status."""
    return pb.Status(success=True, message=message)


def failure(message):
    """A FAILURE status."""
    return pb.Status(success=False, message=message)


def token_metadata(token):
    """Call metadata carrying the shared token (none when no token is set)."""
    return ((TOKEN_KEY, token),) if token else ()


@dataclass
class WorkerSettings:
    """How a mapper or reducer behaves; picklable, so the master can hand it to spawned workers."""

    data_dir: str = "Data"
    rpc_timeout: float = 30.0
    token: str = ""
    input_root: str = "."
    fail_prob: float = 0.0
    fail_seed: int = None
    crashes: dict = field(default_factory=dict)   # phase -> iteration in which to die by SIGKILL


class FaultInjector:
    """Deliberate faults for tests and demonstrations: FAILURE replies and SIGKILL at a phase."""

    def __init__(self, settings):
        self.probability = settings.fail_prob
        self.rng = random.Random(settings.fail_seed)
        self.crashes = dict(settings.crashes)
        self.lock = threading.Lock()

    def fails(self, what):
        """Whether this task should answer FAILURE (probability --fail-prob)."""
        with self.lock:
            strike = self.probability > 0 and self.rng.random() < self.probability
        if strike:
            log.info("%s: injected FAILURE", what)
        return strike

    def crash_point(self, phase, iteration, context):
        """Die by SIGKILL here ('map', 'reduce') or right after the reply is sent ('after-...')."""
        if self.crashes.get(phase) != iteration:
            return
        log.info("injected crash: SIGKILL %s iteration %d", phase, iteration)
        if phase.startswith("after-"):
            context.add_callback(lambda: os.kill(os.getpid(), signal.SIGKILL))
        else:
            os.kill(os.getpid(), signal.SIGKILL)


class TokenCheck(grpc.ServerInterceptor):
    """Refuses every call that does not carry the shared token (UNAUTHENTICATED)."""

    def __init__(self, token):
        self.token = token.encode()

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        supplied = dict(details.invocation_metadata).get(TOKEN_KEY, "")
        if handler is None or hmac.compare_digest(supplied.encode(), self.token):
            return handler
        log.info("refused %s: missing or wrong token", details.method)

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")

        def deny_stream(request, context):
            deny(request, context)
            yield from ()

        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny_stream)
        return grpc.unary_unary_rpc_method_handler(deny)


def require(context, condition, message, code=grpc.StatusCode.INVALID_ARGUMENT):
    """Abort the call with `code` unless the request passes a check."""
    if not condition:
        log.info("refused: %s %s", code.name, message)
        context.abort(code, message)


def require_centroids(context, message, name):
    """A Centroids message must be K x D finite doubles within bounds."""
    dim, values = message.dim, message.values
    require(context, 1 <= dim <= MAX_DIM, f"{name}: dimension {dim} out of range")
    require(context, 0 < len(values) <= MAX_CLUSTERS * dim and len(values) % dim == 0,
            f"{name}: {len(values)} values is not K x {dim}")
    require(context, all(map(math.isfinite, values)), f"{name}: not finite")


def resolve_input(path, root):
    """The real path of an input file, which must lie below root (symlinks and '..' resolved)."""
    if "\0" in path:
        return None
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, path))
    return real if os.path.commonpath([real, real_root]) == real_root else None


class LatestIteration:
    """Remembers the newest iteration seen per task, so a stale attempt's output is dropped."""

    def __init__(self):
        self.newest = {}
        self.lock = threading.Lock()

    def admit(self, job, task, iteration):
        """Record iteration; False when a newer iteration of this task was already seen."""
        with self.lock:
            key = (job, task)
            if self.newest.get(key, 0) > iteration:
                return False
            if key[0] not in {k[0] for k in self.newest}:
                self.newest = {}   # a new job: forget the old one
            self.newest[key] = iteration
            return True


@dataclass
class Split:
    """A mapper's parsed split, kept for the whole job while the file is unchanged."""

    stamp: tuple
    columns: list
    texts: list = None      # each point's text, for the plain partition files
    keys: list = None
    iteration: int = 0


@dataclass
class MapOutput:
    """The partitions of one map task, kept in memory for the reducers to fetch."""

    job: str
    iteration: int
    partitions: list   # per partition: list of PartitionChunk


class MapperServicer(pb_grpc.MapperServicer):
    """Runs map tasks and serves their partitions to reducers."""

    def __init__(self, settings):
        self.settings = settings
        self.faults = FaultInjector(settings)
        self.latest = LatestIteration()
        self.lock = threading.Lock()
        self.splits = {}    # (job, path, start, end, dim) -> Split
        self.outputs = {}   # map task -> MapOutput

    def Ping(self, request, context):
        return pb.PingReply(role="mapper", pid=os.getpid())

    def Map(self, request, context):
        task, iteration = request.task, request.iteration
        log.info("Map task %d iteration %d attempt %d: points [%d, %d) of %s", task, iteration,
                 request.attempt, request.start, request.end, request.input_path)
        require(context, task >= 1 and iteration >= 1 and request.job, "task, iteration and job are required")
        require(context, request.start <= request.end, f"inverted range [{request.start}, {request.end})")
        require(context, 1 <= request.reducers <= MAX_WORKERS, f"R={request.reducers} out of range")
        require_centroids(context, request.centroids, "centroids")
        if request.HasField("previous"):
            require_centroids(context, request.previous, "previous centroids")
            require(context, request.previous.dim == request.centroids.dim and
                    len(request.previous.values) == len(request.centroids.values), "previous: other shape")
        path = resolve_input(request.input_path, self.settings.input_root)
        require(context, path is not None, f"{request.input_path} is outside the input root",
                grpc.StatusCode.PERMISSION_DENIED)
        if self.faults.fails(f"Map task {task}") or not self.latest.admit(request.job, task, iteration):
            return pb.MapResponse(status=failure("injected failure or stale attempt"))
        self.faults.crash_point("map", iteration, context)
        try:
            split = self.split(request, path)
        except OSError as error:   # the file may be missing on this host only: let another mapper try
            log.info("Map task %d: FAILURE %s", task, error)
            return pb.MapResponse(status=failure(f"cannot read {request.input_path}: {error.strerror}"))
        except InputError as error:
            require(context, False, str(error))
        keys, distances, members = assign_clusters(split.columns, unflatten(request.centroids))
        moved = self.count_moved(split, keys, request)
        split.keys, split.iteration = keys, iteration
        records = partition(map_records(members), request.reducers)
        if request.combine:
            records = [combine(part) for part in records]
            texts = [format_combined_partition(part) for part in records]
        else:
            texts = [format_partition(part, split.texts)
                     for part in partition(group_by_key(keys), request.reducers)]
        chunks = [list(record_chunks(part, len(split.columns), not request.combine)) for part in records]
        if not self.latest.admit(request.job, task, iteration):
            return pb.MapResponse(status=failure("stale attempt: a newer iteration of this task ran"))
        folder = os.path.join(self.settings.data_dir, "Mappers", f"M{task}")
        for number, text in enumerate(texts, 1):
            write_atomic(os.path.join(folder, f"partition_{number}.txt"), text)
        with self.lock:
            self.outputs[task] = MapOutput(request.job, iteration, chunks)
        sizes = [sum(count for _, count, _ in part) for part in records]
        log.info("Map task %d: SUCCESS %d points, partitions %s, %d moved", task, len(keys), sizes, moved)
        self.faults.crash_point("after-map", iteration, context)
        reply = pb.MapReply(points=len(keys), moved=moved, partition_points=sizes,
                            sse_terms=exact_terms(distances))
        return pb.MapResponse(status=success(), reply=reply)

    def split(self, request, path):
        """The task's points: parsed on first use, then kept while the file's size and mtime hold."""
        status = os.stat(path)
        stamp = (status.st_size, status.st_mtime_ns)
        key = (request.job, path, request.start, request.end, request.centroids.dim)
        keep_text = not request.combine   # plain partition files show each point's own text
        with self.lock:
            split = self.splits.get(key)
        if split is None or split.stamp != stamp or (keep_text and split.texts is None):
            split = Split(stamp, *read_split(path, request.start, request.end, request.centroids.dim,
                                             keep_text))
            with self.lock:
                self.splits = {k: v for k, v in self.splits.items() if k[0] == request.job}
                self.splits[key] = split
        return split

    @staticmethod
    def count_moved(split, keys, request):
        """Points whose cluster differs from the previous iteration (all of them in the first)."""
        if request.iteration <= 1 or not request.HasField("previous"):
            return len(keys)
        if split.keys is not None and split.iteration == request.iteration - 1:
            previous = split.keys
        else:   # this mapper did not map the task last iteration: recompute what it was
            previous = assign_clusters(split.columns, unflatten(request.previous))[0]
        return sum(map(operator.ne, previous, keys))

    def GetPartition(self, request, context):
        require(context, request.task >= 1 and request.partition >= 1, "task and partition start at 1")
        with self.lock:
            output = self.outputs.get(request.task)
        if output is None or (output.job, output.iteration) != (request.job, request.iteration):
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"no output of map task {request.task} iteration {request.iteration}")
        require(context, request.partition <= len(output.partitions), f"no partition {request.partition}")
        yield from output.partitions[request.partition - 1]


class ReducerServicer(pb_grpc.ReducerServicer):
    """Runs reduce tasks: pull one partition from every mapper, shuffle-sort, reduce."""

    def __init__(self, settings):
        self.settings = settings
        self.faults = FaultInjector(settings)
        self.latest = LatestIteration()
        self.lock = threading.Lock()
        self.channels = {}   # mapper address -> Mapper stub (one channel each, reused)
        self.results = {}    # partition -> (job, iteration, ResultReply)

    def Ping(self, request, context):
        return pb.PingReply(role="reducer", pid=os.getpid())

    def mapper(self, address):
        """The stub for a mapper, on a channel kept for the reducer's lifetime."""
        with self.lock:
            if address not in self.channels:
                channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
                self.channels[address] = pb_grpc.MapperStub(channel)
            return self.channels[address]

    def fetch(self, request, output, deadline):
        """All records of this partition from one map task's mapper; None if they cannot be had."""
        started = time.perf_counter()
        fetch = pb.PartitionRequest(job=request.job, iteration=request.iteration, task=output.task,
                                    partition=request.partition)
        log.info("-> GetPartition(task %d, partition %d) to mapper %s", output.task,
                 request.partition, output.address)
        try:
            stream = self.mapper(output.address).GetPartition(
                fetch, timeout=max(0.05, deadline - time.monotonic()),
                metadata=token_metadata(self.settings.token))
            records = [record for chunk in stream for record in decode_chunk(chunk, request.dim)]
        except grpc.RpcError as error:
            log.info("<- GetPartition(task %d) FAILURE from %s: %s", output.task, output.address,
                     error.code().name)
            if error.code() in REFUSALS:
                raise
            return None
        except ValueError as error:
            log.info("<- GetPartition(task %d) FAILURE from %s: %s", output.task, output.address, error)
            return None
        if any(not 0 <= key < request.clusters for key, _, _ in records):
            log.info("<- GetPartition(task %d) FAILURE from %s: cluster id out of range", output.task,
                     output.address)
            return None
        log.info("<- GetPartition(task %d) SUCCESS from %s: %d records, %.1f ms", output.task,
                 output.address, len(records), 1000 * (time.perf_counter() - started))
        return records

    def Reduce(self, request, context):
        partition, iteration = request.partition, request.iteration
        log.info("Reduce partition %d iteration %d attempt %d from %d map tasks", partition,
                 iteration, request.attempt, len(request.outputs))
        require(context, partition >= 1 and iteration >= 1 and request.job, "partition, iteration, job")
        require(context, 1 <= request.dim <= MAX_DIM and 1 <= request.clusters <= MAX_CLUSTERS,
                f"dimension {request.dim} or K={request.clusters} out of range")
        require(context, 1 <= len(request.outputs) <= 4 * MAX_WORKERS, "number of map outputs out of range")
        require(context, all(output.task >= 1 for output in request.outputs), "map tasks start at 1")
        if self.faults.fails(f"Reduce partition {partition}") or \
                not self.latest.admit(request.job, partition, iteration):
            return pb.ReduceResponse(status=failure("injected failure or stale attempt"))
        # leave time to report missing map output before the master's own deadline runs out
        remaining = context.time_remaining() or self.settings.rpc_timeout
        deadline = time.monotonic() + min(self.settings.rpc_timeout, 0.6 * remaining)
        with concurrent.futures.ThreadPoolExecutor(len(request.outputs)) as pool:
            try:
                fetched = list(pool.map(lambda output: self.fetch(request, output, deadline),
                                        request.outputs))
            except grpc.RpcError as error:
                context.abort(error.code(), f"a mapper refused this reducer: {error.details()}")
        missing = [output.task for output, records in zip(request.outputs, fetched) if records is None]
        if missing:
            log.info("Reduce partition %d: FAILURE, map output missing for tasks %s", partition, missing)
            return pb.ReduceResponse(status=failure(f"map output missing for tasks {missing}"),
                                     reply=pb.ReduceReply(missing_tasks=missing))
        self.faults.crash_point("reduce", iteration, context)
        per_task = [sum(count for _, count, _ in records) for records in fetched]
        groups = shuffle_sort(fetched, request.dim)
        clusters = [(key, group.count, reduce_cluster(group)) for key, group in groups]
        if not self.latest.admit(request.job, partition, iteration):
            return pb.ReduceResponse(status=failure("stale attempt: a newer iteration of this task ran"))
        write_atomic(os.path.join(self.settings.data_dir, "Reducers", f"R{partition}.txt"),
                     format_reducer_output(clusters))
        result = pb.ResultReply(clusters=[pb.ClusterMean(key=key, count=count, mean=mean)
                                          for key, count, mean in clusters],
                                points_from_task=per_task)
        with self.lock:
            self.results[partition] = (request.job, iteration, result)
        log.info("Reduce partition %d: SUCCESS %d clusters, %d points", partition, len(clusters),
                 sum(per_task))
        self.faults.crash_point("after-reduce", iteration, context)
        return pb.ReduceResponse(status=success(), reply=pb.ReduceReply(points=sum(per_task)))

    def GetResult(self, request, context):
        with self.lock:
            stored = self.results.get(request.partition)
        if stored is None or stored[:2] != (request.job, request.iteration):
            return pb.ResultResponse(status=failure(
                f"no result for partition {request.partition} iteration {request.iteration}"))
        return pb.ResultResponse(status=success(), reply=stored[2])


# A worker that answers LOST is gone or unreachable; one that answers REFUSALS never will do the task.
LOST = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
REFUSALS = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED}


def start_server(role, host, port, settings):
    """A started gRPC server for a mapper or reducer, and the port it bound."""
    interceptors = [TokenCheck(settings.token)] if settings.token else []
    # so_reuseport off: otherwise a port another process holds looks free
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=8), interceptors=interceptors,
                         options=GRPC_OPTIONS + [("grpc.so_reuseport", 0)])
    if role == "mapper":
        pb_grpc.add_MapperServicer_to_server(MapperServicer(settings), server)
    else:
        pb_grpc.add_ReducerServicer_to_server(ReducerServicer(settings), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if not bound:
        raise InputError(f"cannot listen on {address}: port in use or address not available")
    server.start()
    return server, bound


def serve_until_stopped(server, should_stop):
    """Block until SIGTERM/SIGINT (or should_stop()), then stop the server gracefully."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(0.2):
        if should_stop():
            break
    server.stop(grace=1.0).wait()
    log.info("stopped")


def spawned_worker(role, index, settings, log_path, connection):
    """Entry point of a worker process the master spawns: serve, report the port, obey the master."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the master's to handle
    setup_logging(f"{role} {index}", log_path, console_level=logging.WARNING)
    parent = os.getppid()
    try:
        server, port = start_server(role, "127.0.0.1", 0, settings)
    except InputError as error:
        connection.send(("error", str(error)))
        return
    log.info("%s %d listening on 127.0.0.1:%d", role, index, port)
    connection.send(("ready", port))
    connection.close()
    serve_until_stopped(server, lambda: os.getppid() != parent)   # the master died: leave too


# ####################################################################################################
# Master: workers, one iteration as named stages, the run loop
# ####################################################################################################


@dataclass
class Worker:
    """A mapper or reducer the master talks to, over one channel kept until the worker is replaced."""

    role: str
    index: int
    address: str
    process: object = None     # the multiprocessing.Process when the master spawned it
    receiver: object = None    # its end of the pipe the port arrives on, until it does
    channel: object = None
    stub: object = None
    alive: bool = True
    next_ping: float = 0.0     # when a dead worker we did not spawn is worth asking again

    @property
    def name(self):
        return f"{self.role} {self.index} ({self.address})"


@dataclass
class JobOptions:
    """Everything a master run needs, already validated."""

    input_path: str
    mappers: int
    reducers: int
    clusters: int
    iterations: int
    data_dir: str = "Data"
    seed: int = None
    init_path: str = None
    tol: float = 0.0
    mapper_addrs: list = None
    reducer_addrs: list = None
    rpc_timeout: float = 30.0
    max_attempts: int = 4
    combine: bool = False
    token: str = ""
    input_root: str = None        # for spawned mappers; default: the input file's folder
    fail_prob: float = 0.0
    fail_seed: int = None
    crashes: list = field(default_factory=list)   # (role, index, phase, iteration) for spawned workers


@dataclass
class IterationStats:
    """What one iteration did, for the log and the caller."""

    iteration: int
    shift: float
    moved: int
    sse: float
    seconds: float


@dataclass
class JobResult:
    """A finished run: final centroids and the story of each iteration."""

    centroids: list
    initial: list
    seed: int
    iterations: list
    converged: bool
    startup_seconds: float


class TaskFailed(Exception):
    """A worker answered FAILURE: the task is re-assigned, the worker stays."""

    def __init__(self, message, reply):
        super().__init__(message)
        self.reply = reply


class WorkerLost(Exception):
    """A worker did not answer in time or at all: it is marked dead."""


class Master:
    """Owns the workers and runs the job, one named stage at a time."""

    def __init__(self, options):
        self.options = options
        self.job = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.mappers, self.reducers = [], []
        self.context = multiprocessing.get_context("spawn")
        self.log_path = os.path.join(options.data_dir, "dump.txt")
        self.metadata = token_metadata(options.token)
        self.pool = None   # threads for concurrent RPCs, made once the workers are up

    # -- workers -------------------------------------------------------------------------------

    def start_workers(self):
        """Spawn (or connect to) every worker; spawning happens before the master touches gRPC."""
        options = self.options
        given = {"mapper": options.mapper_addrs, "reducer": options.reducer_addrs}
        counts = {"mapper": options.mappers, "reducer": options.reducers}
        pools = {}
        for role in ("mapper", "reducer"):
            if given[role] is None:
                pools[role] = [self.spawn(role, index, first=True) for index in range(1, counts[role] + 1)]
            else:
                pools[role] = [Worker(role, i, address) for i, address in enumerate(given[role], 1)]
        self.mappers, self.reducers = pools["mapper"], pools["reducer"]
        for worker in self.mappers + self.reducers:
            if worker.process is not None:
                worker.address = self.await_port(worker)
        for worker in self.mappers + self.reducers:
            self.connect(worker)
        self.pool = concurrent.futures.ThreadPoolExecutor(len(self.mappers) + len(self.reducers))

    def spawn(self, role, index, first=False):
        """Start one worker process; it reports its port through a pipe (see await_port).

        Injected crashes apply to the first process of a slot only, never to its replacement.
        """
        options = self.options
        crashes = {phase: iteration for r, i, phase, iteration in options.crashes
                   if first and (r, i) == (role, index)}
        settings = WorkerSettings(
            data_dir=options.data_dir, rpc_timeout=options.rpc_timeout, token=options.token,
            input_root=options.input_root or os.path.dirname(os.path.abspath(options.input_path)),
            fail_prob=options.fail_prob,
            fail_seed=None if options.fail_seed is None else options.fail_seed * 1000 + index,
            crashes=crashes)
        receiver, sender = self.context.Pipe(duplex=False)
        process = self.context.Process(target=spawned_worker, name=f"kmr-{role}-{index}",
                                       args=(role, index, settings, self.log_path, sender), daemon=True)
        process.start()
        sender.close()
        return Worker(role, index, "", process, receiver=receiver)

    def await_port(self, worker):
        """The address a spawned worker reports once it listens."""
        receiver, worker.receiver = worker.receiver, None
        try:
            if not receiver.poll(max(30.0, self.options.rpc_timeout)):
                raise JobError(f"{worker.role} {worker.index} did not start in time")
            state, detail = receiver.recv()
        except EOFError:
            raise JobError(f"{worker.role} {worker.index} exited while starting") from None
        finally:
            receiver.close()
        if state != "ready":
            raise JobError(f"{worker.role} {worker.index} could not start: {detail}")
        log.info("spawned %s %d, PID %d, at 127.0.0.1:%d", worker.role, worker.index,
                 worker.process.pid, detail)
        return f"127.0.0.1:{detail}"

    def connect(self, worker):
        """Open the worker's channel and wait (bounded) until it answers a Ping."""
        worker.channel = grpc.insecure_channel(worker.address, options=GRPC_OPTIONS)
        stub_type = pb_grpc.MapperStub if worker.role == "mapper" else pb_grpc.ReducerStub
        worker.stub = stub_type(worker.channel)
        timeout = self.options.rpc_timeout
        try:
            grpc.channel_ready_future(worker.channel).result(timeout=timeout)
            reply = worker.stub.Ping(pb.PingRequest(), timeout=timeout, metadata=self.metadata)
        except grpc.FutureTimeoutError:
            raise JobError(f"no {worker.role} answers at {worker.address} (waited {timeout:g} s)") from None
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise JobError(f"{worker.name} refused the token: set the same --token / "
                               f"KMR_TOKEN on master and workers") from None
            raise JobError(f"no {worker.role} answers at {worker.address}: {error.code().name}") from None
        if reply.role != worker.role:
            raise JobError(f"{worker.address} is a {reply.role}, not a {worker.role}")
        worker.alive = True
        log.info("%s answers: PID %d", worker.name, reply.pid)

    def answers(self, worker, timeout=2.0):
        """Whether a worker answers a Ping within a short deadline."""
        try:
            worker.stub.Ping(pb.PingRequest(), timeout=min(timeout, self.options.rpc_timeout),
                             metadata=self.metadata)
            return True
        except grpc.RpcError:
            return False

    def lose(self, worker, why):
        """A worker stopped answering: mark it dead and, if this master spawned it, replace it."""
        worker.alive = False
        log.info("%s marked dead (%s)", worker.name, why)
        if worker.process is None:
            worker.next_ping = time.monotonic() + REVIVE_EVERY
            return
        worker.channel.close()
        worker.process.kill()     # by PID, ours: also ends a stopped (SIGSTOP) process
        worker.process.join(5)
        fresh = self.spawn(worker.role, worker.index)
        worker.process, worker.receiver = fresh.process, fresh.receiver
        try:
            worker.address = self.await_port(worker)
            self.connect(worker)
        except JobError as error:
            log.info("respawning %s %d failed: %s", worker.role, worker.index, error)
            return
        log.info("respawned %s %d: PID %d at %s", worker.role, worker.index, worker.process.pid,
                 worker.address)

    def revive(self):
        """Give dead workers we did not spawn another chance if they answer again (pinged in
        parallel, each at most every REVIVE_EVERY seconds, so an unreachable host costs little)."""
        now = time.monotonic()
        due = [w for w in self.mappers + self.reducers
               if not w.alive and w.process is None and w.next_ping <= now]
        for worker, answered in zip(due, self.pool.map(lambda w: self.answers(w, 0.5), due)):
            if answered:
                worker.alive = True
                log.info("%s answers again", worker.name)
            else:
                worker.next_ping = now + REVIVE_EVERY

    def stop_workers(self):
        """Stop every process this master spawned (by PID, SIGTERM then SIGKILL), close channels."""
        for worker in self.mappers + self.reducers:
            if worker.channel is not None:
                worker.channel.close()   # cancels calls in flight, so no thread waits for a deadline
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        spawned = [w.process for w in self.mappers + self.reducers if w.process is not None]
        for process in spawned:
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + 3.0
        for process in spawned:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()

    # -- running tasks -------------------------------------------------------------------------

    def call(self, worker, method, request, what):
        """One RPC with a deadline, logged as sent and answered (SUCCESS or FAILURE)."""
        log.info("-> %s to %s", what, worker.name)
        started = time.perf_counter()
        try:
            response = getattr(worker.stub, method)(request, timeout=self.options.rpc_timeout,
                                                    metadata=self.metadata)
        except grpc.RpcError as error:
            code = error.code()
            log.info("<- %s FAILURE from %s: %s %s", what, worker.name, code.name, error.details())
            if code in REFUSALS:
                raise JobError(f"{worker.name} refused {what}: {code.name}: {error.details()}") from None
            if code in LOST:
                raise WorkerLost(code.name) from None
            raise TaskFailed(f"{code.name}: {error.details()}", None) from None
        elapsed = 1000 * (time.perf_counter() - started)
        if not response.status.success:
            log.info("<- %s FAILURE from %s: %s (%.1f ms)", what, worker.name, response.status.message,
                     elapsed)
            raise TaskFailed(response.status.message, response.reply)
        log.info("<- %s SUCCESS from %s (%.1f ms)", what, worker.name, elapsed)
        return response.reply

    def run_tasks(self, workers, tasks, attempts, run_one):
        """Run every task on some live worker, re-assigning failed ones; {task: (worker, result)}.

        `attempts` counts tries per task for the whole iteration; run_one(worker, task, attempt)
        may raise TaskFailed (re-assign) or WorkerLost (the worker is lost, re-assign).
        """
        role = workers[0].role
        pending, results, running, last_error = list(tasks), {}, {}, {}
        while pending or running:
            busy = {id(worker) for worker, _ in running.values()}
            for worker in workers:
                if pending and worker.alive and id(worker) not in busy:
                    task = pending.pop(0)
                    attempts[task] = attempts.get(task, 0) + 1
                    if attempts[task] > self.options.max_attempts:
                        raise JobError(f"{role} task {task} failed {self.options.max_attempts} times, "
                                       f"last: {last_error[task]}")
                    running[self.pool.submit(run_one, worker, task, attempts[task])] = (worker, task)
            if not running:
                raise JobError(f"no live {role} left for task {pending[0]}")
            done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                worker, task = running.pop(future)
                try:
                    results[task] = (worker, future.result())
                except TaskFailed as failed:
                    last_error[task] = failed
                    log.info("%s task %d re-assigned after FAILURE", role, task)
                    pending.append(task)
                except WorkerLost as lost:
                    last_error[task] = f"{worker.name} lost ({lost})"
                    log.info("%s task %d re-assigned: %s did not answer", role, task, worker.name)
                    pending.append(task)
                    self.lose(worker, str(lost))
        return results

    # -- one iteration -------------------------------------------------------------------------

    def map_stage(self, iteration, tasks, centroids, previous, attempts):
        """Map: run the given map tasks; {task: (mapper, MapReply)}."""
        def run_one(worker, task, attempt):
            start, end = self.ranges[task - 1]
            request = pb.MapRequest(job=self.job, iteration=iteration, task=task, attempt=attempt,
                                    input_path=self.input_path, start=start, end=end,
                                    reducers=self.options.reducers, centroids=flatten(centroids),
                                    combine=self.options.combine)
            if previous is not None:
                request.previous.CopyFrom(flatten(previous))
            return self.call(worker, "Map", request,
                             f"Map(task {task}, iteration {iteration}, attempt {attempt})")

        return self.run_tasks(self.mappers, tasks, attempts, run_one)

    def reduce_stage(self, iteration, partitions, map_results, attempts):
        """Reduce + collect: {partition: ResultReply}, and the map tasks whose output was lost."""
        outputs = [pb.MapOutput(task=task, address=worker.address)
                   for task, (worker, _) in sorted(map_results.items())]
        lost = set()

        def run_one(worker, partition, attempt):
            request = pb.ReduceRequest(job=self.job, iteration=iteration, partition=partition,
                                       attempt=attempt, outputs=outputs, dim=self.dim,
                                       clusters=self.options.clusters)
            what = f"Reduce(partition {partition}, iteration {iteration}, attempt {attempt})"
            try:
                self.call(worker, "Reduce", request, what)
            except TaskFailed as failed:
                if failed.reply is None or not failed.reply.missing_tasks:
                    raise
                lost.update(failed.reply.missing_tasks)
                return None
            return self.call(worker, "GetResult",
                             pb.ResultRequest(job=self.job, iteration=iteration, partition=partition),
                             f"GetResult(partition {partition}, iteration {iteration})")

        done = self.run_tasks(self.reducers, partitions, attempts, run_one)
        results = {p: reply for p, (_, reply) in done.items() if reply is not None}
        return results, lost

    def iterate(self, iteration, centroids, previous):
        """One MapReduce round: map, shuffle + reduce, compile and account; returns new centroids."""
        self.revive()
        map_attempts, reduce_attempts = {}, {}
        map_results = self.map_stage(iteration, range(1, self.options.mappers + 1), centroids,
                                     previous, map_attempts)
        results = {}
        pending = list(range(1, self.options.reducers + 1))
        while pending:
            finished, lost = self.reduce_stage(iteration, pending, map_results, reduce_attempts)
            results.update(finished)
            pending = [p for p in pending if p not in results]
            if lost:
                for worker in {id(map_results[t][0]): map_results[t][0] for t in lost}.values():
                    if worker.alive and not self.answers(worker):
                        self.lose(worker, "its map output could not be fetched")
                log.info("iteration %d: re-executing map tasks %s (output lost)", iteration, sorted(lost))
                map_results.update(self.map_stage(iteration, sorted(lost), centroids, previous,
                                                  map_attempts))
        return self.compile(iteration, centroids, map_results, results)

    def compile(self, iteration, centroids, map_results, results):
        """New centroids from the reducers' means, after checking every point was counted once."""
        replies = {task: reply for task, (_, reply) in map_results.items()}
        problems = []
        for task, (start, end) in enumerate(self.ranges, 1):
            if replies[task].points != end - start:
                problems.append(f"map task {task} mapped {replies[task].points} of {end - start} points")
        means, counted = {}, 0
        task_order = sorted(replies)
        for partition, result in sorted(results.items()):
            for task, received in zip(task_order, result.points_from_task):
                sent = replies[task].partition_points[partition - 1]
                if received != sent:
                    problems.append(f"reducer {partition} got {received} of {sent} points of map task {task}")
            for cluster in result.clusters:
                if cluster.key in means or partition_of(cluster.key, self.options.reducers) != partition - 1:
                    problems.append(f"cluster {cluster.key} reported by reducer {partition}")
                means[cluster.key] = tuple(cluster.mean)
                counted += cluster.count
        if counted != self.points:
            problems.append(f"reducers counted {counted} points, the input has {self.points}")
        if problems:
            raise JobError(f"iteration {iteration}: points lost or counted twice: {'; '.join(problems)}")
        log.info("iteration %d: all %d points accounted for exactly once (%d map tasks x %d partitions)",
                 iteration, self.points, len(replies), len(results))
        moved = sum(reply.moved for reply in replies.values())
        sse = math.fsum(term for reply in replies.values() for term in reply.sse_terms)
        return next_centroids(centroids, means), moved, sse

    # -- the run -------------------------------------------------------------------------------

    def run(self):
        """Validate the input, start workers, iterate; returns a JobResult."""
        options = self.options
        seed = options.seed if options.seed is not None else secrets.randbelow(2**32)
        scan = scan_input(options.input_path, options.clusters, seed)   # input errors before any log line
        if len(scan.sample) < options.clusters:
            raise InputError(f"K={options.clusters} is larger than the number of distinct points "
                             f"({len(scan.sample)}) in {options.input_path}")
        if options.init_path:
            initial = read_centroids(options.init_path, options.clusters, scan.dim)
        else:
            initial = scan.sample
        self.points, self.dim = scan.points, scan.dim
        self.input_path = os.path.abspath(options.input_path)
        self.ranges = split_ranges(scan.points, options.mappers)
        log.info("job %s: %s, M=%d R=%d K=%d n=%d tol=%g seed=%d", self.job, options.input_path,
                 options.mappers, options.reducers, options.clusters, options.iterations, options.tol, seed)
        log.info("%d points of dimension %d; map task ranges %s", scan.points, scan.dim, self.ranges)
        log.info("initial centroids: %s", "  ".join(map(format_point, initial)))
        started = time.perf_counter()
        self.start_workers()
        startup = time.perf_counter() - started
        log.info("workers ready in %.3f s", startup)
        centroids, previous, stats, converged = initial, None, [], False
        for iteration in range(1, options.iterations + 1):
            started = time.perf_counter()
            log.info("iteration %d: start", iteration)
            new, moved, sse = self.iterate(iteration, centroids, previous)
            shift = largest_shift(centroids, new)
            previous, centroids = centroids, new
            write_atomic(os.path.join(options.data_dir, "centroids.txt"), format_centroids(centroids))
            stats.append(IterationStats(iteration, shift, moved, sse, time.perf_counter() - started))
            log.info("iteration %d: centroids %s", iteration, "  ".join(map(format_point, centroids)))
            log.info("iteration %d: shift %.6g, %d points moved, SSE %.10g, %.3f s", iteration, shift,
                     moved, sse, stats[-1].seconds)
            if shift <= options.tol:
                converged = True
                log.info("converged after %d iterations (largest shift %g <= tol %g)", iteration,
                         shift, options.tol)
                break
        if options.iterations == 0:
            write_atomic(os.path.join(options.data_dir, "centroids.txt"), format_centroids(centroids))
        return JobResult(centroids, initial, seed, stats, converged, startup)


def run_job(options):
    """Run one master job with its own workers; they are stopped however the job ends."""
    master = Master(options)
    try:
        return master.run()
    finally:
        master.stop_workers()


# ####################################################################################################
# Command line
# ####################################################################################################


def setup_logging(role, log_path, console_level=logging.INFO):
    """Log lines prefixed by role and PID to stderr and, appended, to dump.txt."""
    log.handlers.clear()
    log.setLevel(logging.INFO)
    log.propagate = False
    formatter = logging.Formatter(f"%(asctime)s [{role} %(process)d] %(message)s")
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(console_level)
    console.setFormatter(formatter)
    log.addHandler(console)
    if log_path:
        os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
        dump = logging.FileHandler(log_path, mode="a", encoding="utf-8")
        dump.setFormatter(formatter)
        log.addHandler(dump)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line and exit code 2."""

    def error(self, message):
        raise InputError(message)


def addresses(text):
    """'host:port,host:port' as a list."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    for item in items:
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise argparse.ArgumentTypeError(f"{item!r} is not host:port")
    if not items:
        raise argparse.ArgumentTypeError("no address given")
    return items


def parse_args(argv=None):
    """The command line of every role."""
    parser = ArgumentParser(prog="kmr.py", description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--role", choices=["master", "mapper", "reducer"], required=True)
    parser.add_argument("--data-dir", default="Data", help="where a run writes everything (default Data)")
    parser.add_argument("--rpc-timeout", type=float, default=30.0,
                        help="deadline of every RPC and of waiting for a worker, seconds (default 30)")
    master = parser.add_argument_group("master")
    master.add_argument("-M", type=int, default=3, help="map tasks (default 3)")
    master.add_argument("-R", type=int, default=2, help="reduce tasks = partitions (default 2)")
    master.add_argument("-K", type=int, default=2, help="clusters (default 2)")
    master.add_argument("-n", type=int, default=20, help="iterations at most (default 20)")
    master.add_argument("--input", default="points.txt", help="points, one 'x,y,...' per line")
    master.add_argument("--seed", type=int, help="seed of the initial draw (default: random, logged)")
    master.add_argument("--init", metavar="FILE", help="initial centroids, one per line")
    master.add_argument("--tol", type=float, default=0.0,
                        help="stop when no centroid moved more than this (default 0: a fixed point)")
    master.add_argument("--mapper-addrs", type=addresses, help="running mappers host:port,... (no spawning)")
    master.add_argument("--reducer-addrs", type=addresses, help="running reducers host:port,...")
    master.add_argument("--combiner", action="store_true",
                        help="mappers pre-sum each cluster (exactly) so partitions carry sums, not points")
    master.add_argument("--max-attempts", type=int, default=4, help="tries per task per iteration (default 4)")
    master.add_argument("--crash", type=crash_spec, action="append", default=[], metavar="ROLE:I:PHASE:IT",
                        help="make spawned worker I die by SIGKILL at PHASE (map, after-map, reduce, "
                             "after-reduce) of iteration IT; repeatable (failure drills)")
    worker = parser.add_argument_group("mapper and reducer")
    worker.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    worker.add_argument("--port", type=int, default=0, help="port to bind (default 0: any free port)")
    worker.add_argument("--input-root", help="mappers read input only below this folder (default: the "
                                             "working directory; for spawned mappers the input's folder)")
    shared = parser.add_argument_group("every role")
    shared.add_argument("--token", default=os.environ.get("KMR_TOKEN", ""),
                        help="shared secret every RPC must carry (default $KMR_TOKEN; none: no check)")
    shared.add_argument("--fail-prob", type=float, default=0.0,
                        help="each task a worker gets fails with this probability (failure drills)")
    shared.add_argument("--fail-seed", type=int, help="seed of --fail-prob draws")
    args = parser.parse_args(argv)
    checks = [("-M", args.M, 1, MAX_WORKERS), ("-R", args.R, 1, MAX_WORKERS), ("-K", args.K, 1, 10**6),
              ("-n", args.n, 0, 10**6), ("--port", args.port, 0, 65535),
              ("--max-attempts", args.max_attempts, 1, 100)]
    for flag, value, low, high in checks:
        if not low <= value <= high:
            raise InputError(f"{flag} must be between {low} and {high}, got {value}")
    if not (math.isfinite(args.tol) and args.tol >= 0):
        raise InputError(f"--tol must be a finite number >= 0, got {args.tol}")
    if not (math.isfinite(args.rpc_timeout) and args.rpc_timeout > 0):
        raise InputError(f"--rpc-timeout must be > 0, got {args.rpc_timeout}")
    if not all(" " <= char <= "~" for char in args.token):
        raise InputError("--token / KMR_TOKEN must be printable ASCII (it travels as gRPC metadata)")
    if not 0 <= args.fail_prob < 1:
        raise InputError(f"--fail-prob must be in [0, 1), got {args.fail_prob}")
    if args.input_root is not None and not os.path.isdir(args.input_root):
        raise InputError(f"--input-root {args.input_root} is not a folder")
    return args


def crash_spec(text):
    """'mapper:2:after-map:3' as ('mapper', 2, 'after-map', 3)."""
    parts = text.split(":")
    if len(parts) != 4 or parts[0] not in ("mapper", "reducer") or parts[2] not in CRASH_PHASES \
            or not parts[1].isdigit() or not parts[3].isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not ROLE:INDEX:PHASE:ITERATION, PHASE one of "
                                         f"{', '.join(CRASH_PHASES)}")
    return parts[0], int(parts[1]), parts[2], int(parts[3])


def run_master(args):
    """The master role: run the job and print the final centroids on stdout."""
    log_path = os.path.join(args.data_dir, "dump.txt")
    try:
        write_atomic(log_path, "")
    except OSError as error:
        raise InputError(f"cannot write to {args.data_dir}: {error.strerror}") from None
    setup_logging("master", log_path)
    options = JobOptions(input_path=args.input, mappers=args.M, reducers=args.R, clusters=args.K,
                         iterations=args.n, data_dir=args.data_dir, seed=args.seed, init_path=args.init,
                         tol=args.tol, mapper_addrs=args.mapper_addrs, reducer_addrs=args.reducer_addrs,
                         rpc_timeout=args.rpc_timeout, max_attempts=args.max_attempts, token=args.token,
                         input_root=args.input_root, combine=args.combiner, fail_prob=args.fail_prob, fail_seed=args.fail_seed,
                         crashes=args.crash)
    result = run_job(options)
    sys.stdout.write(format_centroids(result.centroids))
    return 0


def run_worker(args):
    """The mapper or reducer role, standalone: serve until SIGTERM or Ctrl-C."""
    setup_logging(args.role, os.path.join(args.data_dir, f"{args.role}-{os.getpid()}.log"))
    settings = WorkerSettings(data_dir=args.data_dir, rpc_timeout=args.rpc_timeout, token=args.token,
                              input_root=args.input_root or os.getcwd(), fail_prob=args.fail_prob,
                              fail_seed=args.fail_seed)
    server, port = start_server(args.role, args.host, args.port, settings)
    log.info("%s listening on %s:%d%s", args.role, args.host, port, "" if args.token else " (no token)")
    print(f"{args.host}:{port}", flush=True)
    serve_until_stopped(server, lambda: False)
    return 0


def main(argv=None):
    """Run one role; every expected failure ends in one line on stderr and an exit code."""
    def on_sigterm(signum, frame):
        raise Terminated()

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        args = parse_args(argv)
        return run_master(args) if args.role == "master" else run_worker(args)
    except InputError as error:
        return report(error, EXIT_USAGE)
    except JobError as error:
        return report(error, EXIT_RUNTIME)
    except KeyboardInterrupt:
        return report("interrupted", EXIT_INTERRUPTED)
    except Terminated:
        return report("terminated", EXIT_TERMINATED)


def report(error, code):
    """One error line on stderr (and in dump.txt when logging is on); returns the exit code."""
    message = f"kmr: error: {error}"
    if log.handlers:
        for handler in log.handlers:
            if isinstance(handler, logging.FileHandler):
                handler.emit(logging.makeLogRecord({"msg": message, "levelno": logging.ERROR}))
    print(message, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
