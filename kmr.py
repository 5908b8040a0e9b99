"""kmr: K-means clustering run as a real MapReduce job over gRPC.

One script, three roles:

    python kmr.py --role master -M 3 -R 2 -K 2 -n 20   # spawn 3 mappers + 2 reducers, run the job
    python kmr.py --role mapper --port 6001            # a standalone mapper, until SIGTERM / Ctrl-C
    python kmr.py --role reducer --port 6002           # a standalone reducer

The master splits the input by index range among M map tasks; each mapper reads its range itself,
assigns every point to its nearest centroid and partitions the pairs by key % R; each reducer pulls
its partition from every mapper, shuffle-sorts it and averages each cluster; the master collects
the new centroids from the reducers.  Means use math.fsum, so the result is the sequential
reference's bit for bit for any M and R.  Failed, killed or hung workers (found by heartbeats) are
replaced and their tasks re-run; stragglers get backup copies; a killed master continues with
--resume; workers can speak TLS.  Everything a run writes lives under --data-dir (default Data).
Results go to stdout; the console shows every call and reply, and Data/dump.txt keeps everything.

The file reads as one iteration's story: the textbook core first, then what makes it exact and fast,
files, the wire, a worker's tasks and services, then the master's side (see README: Reading kmr.py).
"""

import argparse
import bisect
import collections
import concurrent.futures
import contextlib
import dataclasses
import errno
import functools
import hashlib
import heapq
import hmac
import html
import importlib.util
import ipaddress
import itertools
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import operator
import os
import random
import secrets
import shutil
import signal
import socket
import ssl
import statistics
import sys
import threading
import time
import urllib.parse
from array import array
from dataclasses import dataclass, field

os.environ.setdefault("GRPC_VERBOSITY", "NONE")   # gRPC's own C-core lines would break one-line errors
MISSING = None   # what to do when gRPC or the stubs cannot be imported: main() says it in one line
try:
    import grpc
except ImportError:
    grpc = None
    MISSING = "grpcio is not installed: python3 -m pip install -r requirements.txt"
try:
    import kmeans_pb2 as pb
    import kmeans_pb2_grpc as pb_grpc
except ImportError:
    pb = pb_grpc = None
    MISSING = MISSING or "the gRPC stubs are missing: run sh gen_pb.sh first"
if pb is not None and "JoinRequest" not in pb.DESCRIPTOR.message_types_by_name:
    MISSING = MISSING or "the gRPC stubs are older than kmeans.proto: run sh gen_pb.sh again"


# -- Constants ---------------------------------------------------------------------------------------

EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 130, 143
DETAIL = 15   # log level of the assignment's display: every call, reply and iteration's centroids

# input and job bounds
MAX_COORDINATE = 1e150        # larger values could overflow a squared distance to inf
MAX_WORKERS = 256             # bound on M, R and the worker processes a master spawns
MAX_CLUSTERS = 100_000        # bound on K
MAX_DIM = 4096                # bound on D
MAX_RESTARTS = 1000
INITS = ("random", "k-means++", "k-means||")   # --init, besides a file of centroids
PARALLEL_ROUNDS = 5           # k-means|| rounds (Bahmani et al.: about 5 suffice)
OVERSAMPLE_DIVISOR = 2        # k-means|| expects K / 2 candidates per round (l = 0.5 K)
RECLUSTER_WORK = 25_000_000   # distances the master's Lloyd rounds on the k-means|| candidates measure at most
BLOCK_BYTES = 1 << 17         # input is read and parsed in blocks of lines of about this size (kept in cache)
IDENTITY_BLOCK = 1 << 16      # bytes at each end of the input whose digest pins its content for a job

# map across iterations (the bounds engine)
MAX_UNROLLED = 4096              # K*D up to which the assignment loop is compiled unrolled
MAX_UNROLLED_DIM = 256           # D up to which the k-means|| pruned update's D^2 is compiled unrolled
NORM_FROM_DIM = 6                # D from which the assignment loops take their distances from math.dist (C speed)
ROUNDOFF = 2.0 ** -53            # the largest relative error of one rounded operation on doubles
ROUND_UP = 1 + 4 * ROUNDOFF      # a rounded sum of two non-negative doubles times this is at least the exact sum
FAR_MOVE = 64.0                  # a centroid that moved more than this x another's nearest-neighbour distance is far
TAME_RANGE = (1e-100, 1e100)     # nonzero |coordinates| within: their squares are summed as short integers
EXACT_PRODUCTS = (2.0 ** -900, 2.0 ** 990)   # |a * b| within, |a| and |b| below: Dekker's product is exact
ASSIGN_CHUNK = 65536             # points per pass, so a pass's temporary lists stay small
SPLITTER = 134217729.0           # 2**27 + 1: splits a double into two halves of 26 bits (Veltkamp)
PRIORITY_BLOCK = 4096            # points whose priorities' first bytes come from one SHAKE-128 digest
PICK_PRIORITY = 2.0 ** -8        # a k-means|| round priority is below this iff its first byte is 0 (round_priorities)

# files
CHECKPOINT = "checkpoint.json"   # in the data dir: where --resume continues from
CHECKPOINT_VERSION = 4           # 1: more than the centroid history; 2: the input's size and mtime only; 3: other draws
PLOT_POINTS = 3000               # input points the master samples for --plot

# the wire and the workers
TOKEN_KEY = "kmr-token"          # the call metadata that carries --token
CHUNK_VALUES = 65536             # doubles per streamed partition chunk (512 KiB)
MAX_MESSAGE_BYTES = 16 << 20     # bound on any one gRPC message, both ways
GRPC_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.enable_http_proxy", 0),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]   # workers are direct peers, never via a proxy
# a worker that answers LOST is gone or unreachable; one that answers REFUSALS never will do the task
LOST = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"})
REFUSALS = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED", "INVALID_ARGUMENT", "UNIMPLEMENTED"})
CRASH_PHASES = ("map", "after-map", "reduce", "after-reduce")   # where a --crash drill kills a worker mid-job
START_CRASH = "start"    # ... or before it listens (the job then ends: a worker that cannot start is reported)
MAX_SPLITS = 64          # parsed splits a mapper keeps per job (its own tasks, and tasks it took over)
MAX_JOBS = 8             # default: jobs a standalone worker serves at once (--max-jobs)
JOB_EXPIRY = 60.0        # default: seconds of silence after which a worker drops a job's state (--job-expiry)
KEEP_ALIVE = 10.0        # seconds between the master's pings that keep its job's state on every worker
MAX_CHANNELS = 256       # mapper channels a reducer keeps
FETCHERS = 16            # partition streams a reducer reads at once
REVIVE_EVERY = 10.0      # seconds between pings of a dead worker we did not spawn
CONNECT_SECONDS = 30.0   # longest wait for a worker we did not spawn to answer at all
START_TIMEOUT = 300.0    # default: longest wait for a spawned worker that is alive to listen (--start-timeout)
START_NOTICE = 3.0       # seconds after which the console says it is waiting for a spawned worker
END_JOB_SECONDS = 2.0    # deadline of the EndJob calls that tell workers a job is over
RPC_TIMEOUT = 300.0      # default deadline of a task RPC: a last resort, heartbeats act first
HEARTBEAT = 2.0          # default seconds without a ping answer before a worker holding a task is lost

# workers that join a master (--listen, --join); defaults of --join-timeout and --leave-timeout
JOIN_TIMEOUT, LEAVE_TIMEOUT, BEAT_SECONDS = 300.0, 120.0, 1.0   # ... and seconds between a joined worker's beats
MAX_MEMBERS, MAX_JOINS = 64, 256   # joined workers of one role a master keeps at once; joins in all (rejoins too)
VERIFY_AT_ONCE, VERIFY_SECONDS = 4, 3.0   # registrations checked at once (more: refused); seconds to answer the check
RETRY_SOON = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
              ("grpc.max_reconnect_backoff_ms", 1000)]   # a joining worker's channel to a master not up yet

# scheduling
BACKUP_AFTER = 2.0          # a straggler is backed up once it ran this many times the median task
BACKUP_MIN_SECONDS = 0.5    # ... and at least this long: short tasks are never worth a second copy
DRILL_RISK = 1e-6           # the chance that a --fail-prob drill fails by bad luck under the default budget
BASE_ATTEMPTS = 4           # tries per task and iteration when no failures are injected

# reports
PLOT_FRAME = (900, 640, 70, 230, 50, 60)   # px of the --plot picture: width, height, margins left, right, top, bottom
TIMELINE_WIDTH = 1600    # px: lane labels, the time axis and the legend fit a window this wide
TIMELINE_FULL = 10       # spans (iterations, k-means++, final SSE) drawn at full scale at most ...
TIMELINE_EDGE = 3        # ... always the first and the last few, then the earliest with trouble in them
BAND_WIDTH = 110         # px of a band standing for consecutive collapsed spans ...
BAND_SPANS = 3           # ... at least this many (fewer are drawn in full: a band would not save room)
LANE_LABEL = 250         # px of the column of lane labels
ROW, BAR, MIN_BAR = 30, 16, 2   # px per row of a lane, of a bar's height, of the narrowest bar
STAGE_COLOURS = {"Sample": "#9d755d", "Map": "#4c78a8", "Reduce": "#f58518", "Weigh": "#54a24b"}
COLLECT_COLOUR = "#8a3c00"   # the GetResult end of a Reduce bar
FAILURE_COLOUR, RERUN_COLOUR, LOSS_COLOUR, WON_COLOUR = "#d62728", "#7b3294", "#b00020", "#1a7f37"
JOIN_COLOUR, LEFT_COLOUR = "#1f77b4", "#555555"   # a worker joined the master mid-job; it left, released
PAGE_DUMP_LINES, DRILL_SECONDS = 40, 5.0   # the job page: lines of dump.txt shown; seconds a drill hangs or slows
PAGE_CONNECTIONS, PAGE_TIMEOUT = 32, 10.0  # ... connections it serves at once; seconds a silent one is kept

# passes that are not iterations, as the job record, the summary and the timeline number them: the Sample
# pass before run 1, the k-means++ rounds of a run, the final SSE pass of a run
SAMPLE_PASS, SEEDING_PASS, FINAL_PASS = -1, 0, None

# Glossary
#   p        a point: a tuple of D floats          c, centroids   K cluster centres, c[k] for cluster k
#   k, key   cluster id 0..K-1 (map output key)     N              number of input points
#   columns  points stored column by column: columns[d][i] is coordinate d of point i
#   M        map tasks (index ranges of the input)  R              reduce tasks = partitions, key % R
#   n        iterations at most                     tol            stop when no centroid moved more
#   terms    doubles whose exact sum is a cluster sum (what makes the combiner exact)
#   record   (key, count, terms per dimension): what a partition carries, points or combined sums
#            (what the job did is kept by the Recorder, an attempt's part of it in an AttemptEntry)
#   split    a map task's points, parsed once and kept by its mapper
#   job      one invocation of the master: its runs (JobOptions, Recorder, JobResult); its id names its
#            state on every worker, and each request carries the run, so older attempts are refused
#   run      one complete K-means from one seed (--restarts runs several)
#   pass     an iteration (1..n), or SAMPLE_PASS, SEEDING_PASS, FINAL_PASS: the stages that are not
#   stage    one pass's tasks of one kind (Sample, Map, Reduce, Weigh) on one role's workers
#   attempt  one try of a task on a worker; a backup is a second attempt of a straggling task
#   heartbeat  a ping to a worker while a call to it runs; silence for --heartbeat s means lost
#   checkpoint  Data/checkpoint.json, written each iteration: what --resume continues from
#   member   a worker that joined the master (--listen / --join); it beats, and leaves when released


# -- Exceptions --------------------------------------------------------------------------------------


class InputError(ValueError):
    """Bad input or arguments the user can fix: one line on stderr, exit code 2."""


class UnreadableInput(InputError):
    """The input cannot be read here (missing, unreadable, shorter): on a worker, another may manage."""


class JobError(RuntimeError):
    """The job cannot finish (workers gone, attempts used up): one line on stderr, exit code 1."""


class Terminated(BaseException):
    """SIGTERM arrived: unwind like Ctrl-C so every spawned worker is stopped."""


class TaskRefused(Exception):
    """A worker will not do this task now: it answers FAILURE with this kind (kmeans.proto's
    FailureKind), and another attempt may succeed."""

    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind


class FetchFailed(TaskRefused):
    """A reducer could not fetch some map tasks' output: the master runs those map tasks again."""

    def __init__(self, tasks):
        super().__init__(pb.MISSING_OUTPUT, f"map output missing for tasks {tasks}")
        self.tasks = tasks


class InputChanged(Exception):
    """The input is not the file its job pinned when it started: the job cannot go on."""


class WorkerBusy(Exception):
    """A worker serves as many jobs, or holds as much, as its bounds allow: a new job is refused."""


class WriteFailed(OSError):
    """A file could not be written (a full disk, say); `filename` is the file, not its temporary copy."""


class TaskFailed(Exception):
    """A worker answered FAILURE (`kind`: a FailureKind), or a gRPC error that is neither a refusal nor
    a lost worker (`kind` None): the task is re-assigned, the worker stays."""

    def __init__(self, message, kind, reply=None):
        super().__init__(message)
        self.kind = kind
        self.reply = reply


class WorkerLost(Exception):
    """A worker did not answer in time or at all: it is marked dead."""


class WorkerLeft(WorkerLost):
    """The worker left the job (released) just as an attempt was given to it: the task goes elsewhere,
    costing no attempt."""


class JoinRefused(Exception):
    """The master does not take a worker that registers, or does not know one that beats (`code`: a gRPC status)."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


# -- Logging -----------------------------------------------------------------------------------------

log = logging.getLogger("kmr")


class HeldConsole(logging.StreamHandler):
    """The master's console, holding its lines until the mappers have checked the input: bad input
    is then one line on stderr, as if it had been caught before the job began (dump.txt has all)."""

    def __init__(self):
        super().__init__(sys.stderr)
        self.held = []

    def emit(self, record):
        """Show a line, or hold it until let_go; a line marked urgent (the master is waiting) shows now."""
        if self.held is None or getattr(record, "urgent", False):
            super().emit(record)
        else:
            self.held.append(record)

    def let_go(self, show):
        """Stop holding; show the held lines, or drop them."""
        held, self.held = self.held or [], None
        for record in held if show else []:
            super().emit(record)


def release_console(show=True):
    """Let the console show (or drop) what it held and go on unheld (see HeldConsole)."""
    for handler in log.handlers:
        if isinstance(handler, HeldConsole):
            handler.let_go(show)


class DumpFile(logging.FileHandler):
    """dump.txt: a line that cannot be written (a full disk) is said once on stderr, in one line, and
    the job goes on (logging's default is a traceback per line)."""

    warned = False

    def handleError(self, record):
        """One warning for the first line lost."""
        if not self.warned:
            self.warned = True
            error = sys.exc_info()[1]
            print(f"kmr: warning: cannot write {self.baseFilename}: {getattr(error, 'strerror', None) or error}: "
                  "it misses lines from here on", file=sys.stderr)


def setup_logging(role, log_path, console_level=logging.INFO):
    """Log lines prefixed by role and PID to stderr (from console_level) and, all of them (every
    RPC is a DEBUG line), appended to dump.txt."""
    logging.addLevelName(DETAIL, "DETAIL")
    log.handlers.clear()
    log.setLevel(logging.DEBUG)
    log.propagate = False
    formatter = logging.Formatter(f"%(asctime)s [{role} %(process)d] %(message)s")
    console = HeldConsole() if role == "master" else logging.StreamHandler(sys.stderr)
    console.setLevel(console_level)
    console.setFormatter(logging.Formatter("%(asctime)s  %(message)s", "%H:%M:%S"))
    log.addHandler(console)
    if log_path:
        os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
        dump = DumpFile(log_path, mode="a", encoding="utf-8")
        dump.warned = " " in role   # a spawned worker ("mapper 2"): its master says it
        dump.setFormatter(formatter)
        log.addHandler(dump)


# ####################################################################################################
# Pure core: the textbook (parse, split, map, partition, shuffle-sort, reduce; no I/O, no gRPC)
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


def map_points(points, centroids):
    """Map: each point to its nearest centroid, as records (key, count, the coordinates of its points
    per dimension), keys ascending."""
    dim = len(centroids[0])
    members = [[] for _ in centroids]
    for point in points:
        members[nearest(point, centroids)].append(point)
    return map_records([to_columns(cluster, dim) for cluster in members])


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
    """Sequential K-means from the same map / partition / shuffle-sort / reduce functions, point by
    point with `nearest` (none of the compiled loops below).

    Returns (final centroids, iterations run).  The distributed job must match it bit for bit.
    """
    centroids = [tuple(c) for c in centroids]
    dim = len(centroids[0])
    for iteration in range(1, n + 1):
        (records,) = partition(map_points(points, centroids), 1)
        means = {key: reduce_cluster(group) for key, group in shuffle_sort([records], dim)}
        new = next_centroids(centroids, means)
        shift = largest_shift(centroids, new)
        centroids = new
        if shift <= tol:
            return centroids, iteration
    return centroids, n


# ####################################################################################################
# Exact sums: doubles whose exact sum is a cluster's sum or a split's SSE
# ####################################################################################################


def exact_terms(values):
    """A few doubles whose exact sum is the exact sum of `values`.

    fsum is correctly rounded, so fsum(values) is the sum's leading double; fsum of the values
    minus the terms found so far is the next one, until nothing is left.  Each term adds ~53 bits.
    """
    values = values if isinstance(values, (list, array)) else list(values)   # a list or array is read, not copied
    terms = []
    while term := math.fsum(itertools.chain(values, map(operator.neg, terms))):
        terms.append(term)
    return terms


def exact_product(a, b):
    """Whether two_product(a, b) is exact: no part of it can underflow or overflow (EXACT_PRODUCTS)."""
    low, high = EXACT_PRODUCTS
    return low <= abs(a * b) <= high and abs(a) <= high and abs(b) <= high


def two_product(a, b):
    """(p, e) with p + e == a * b exactly (Dekker; for a * b within EXACT_PRODUCTS)."""
    product = a * b
    a_scaled, b_scaled = SPLITTER * a, SPLITTER * b
    a_high, b_high = a_scaled - (a_scaled - a), b_scaled - (b_scaled - b)
    a_low, b_low = a - a_high, b - b_high
    return product, (((a_high * b_high - product) + a_high * b_low) + a_low * b_high) + a_low * b_low


def sse_of_sums(counts, sums, squares, centroids):
    """The exact SSE of clusters against their centroids from counts, exact sums and the exact sum of
    all squares: sum x^2 less, per cluster and dimension, 2 c sum x - n c^2 (every product split
    exactly into doubles, or beyond EXACT_PRODUCTS taken as integers in units of 2**-2148); as
    (exact doubles, integer), unrounded: exact_total rounds the job's whole SSE once."""
    terms, exact = list(squares[0]), squares[1]
    for count, sum_terms, centroid in zip(counts, sums, centroids):
        if not count:
            continue
        for total, c in zip(sum_terms, centroid):
            for term in total:
                if exact_product(2.0 * c, term):
                    terms += two_product(-2.0 * c, term)
                else:
                    exact -= 2 * fixed(c) * fixed(term)
            parts = [part for part in two_product(c, c) if part] if exact_product(c, c) else None
            if parts is not None and all(exact_product(float(count), part) for part in parts):
                terms += [piece for part in parts for piece in two_product(float(count), part)]
            else:
                exact += count * fixed(c) * fixed(c)
    return exact_terms(terms), exact


def exact_total(parts):
    """The correctly rounded sum of exact values, each (doubles, integer in units of 2**-2148) as
    sse_of_sums gives them: fsum when no integer is there, else one integer, divided once (int / int
    rounds correctly, subnormal results included)."""
    parts = list(parts)
    if not any(integer for _, integer in parts):
        return math.fsum(term for terms, _ in parts for term in terms)
    return sum(integer + sum(fixed(term) << 1074 for term in terms) for terms, integer in parts) / (1 << 2148)


def integer_bytes(value):
    """An integer as little-endian two's complement bytes (b"" for 0): how an exact rest travels."""
    return value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True) if value else b""


def bytes_integer(data):
    """integer_bytes undone."""
    return int.from_bytes(data, "little", signed=True)


def integer_terms(total, shift):
    """Doubles whose exact sum is total / 2**shift (down to 2**-1074): each the correctly rounded
    rest (int / int rounds correctly), a whole number of 2**-shift."""
    terms = []
    while (term := total / (1 << shift)) != 0.0:
        terms.append(term)
        total -= (fixed(term) << shift) >> 1074
    return terms


def fixed(value):
    """A double times 2**1074, as an exact integer."""
    numerator, denominator = value.as_integer_ratio()
    return numerator * ((1 << 1074) // denominator)


# ####################################################################################################
# Initial centroids: a uniform distinct draw (priorities by index), k-means++ weights, k-means|| candidates
# ####################################################################################################


def priority_blocks(start, end):
    """The blocks of PRIORITY_BLOCK points that the points [start, end) lie in: a point's priority
    comes from its block's stream, whichever split reads it."""
    return range(start // PRIORITY_BLOCK, (end - 1) // PRIORITY_BLOCK + 1)


def priorities_below(heads, tails, start, end, limit=1, also=()):
    """(index from start, priority) of the points of [start, end) whose priority is below limit / 256,
    and of the points `also` (indices from start), ascending by index. A priority is a multiple of
    2**-53 in [0, 1) that depends on the two names and the point's index only (any M): its first 8
    bits are a byte per point of a SHAKE-128 stream named `heads` and the point's block of
    PRIORITY_BLOCK (the same on every Python, which random's randbytes does not promise), scanned at C
    speed, its other 45 a hash of `tails` and the index, taken only for the points returned."""
    blocks = priority_blocks(start, end)
    stream = b"".join(hashlib.shake_128(f"{heads}/{block}".encode()).digest(PRIORITY_BLOCK) for block in blocks)
    offset = start - blocks.start * PRIORITY_BLOCK   # stream[offset + i]: the first byte of point start + i
    stop = offset + end - start
    if limit >= 256:
        chosen = range(end - start)
    else:
        chosen = set(also)
        marked = stream.translate(bytes(0 if byte < limit else 1 for byte in range(256)))   # below: 0
        at = marked.find(0, offset, stop)
        while at >= 0:
            chosen.add(at - offset)
            at = marked.find(0, at + 1, stop)
    indices = sorted(chosen)
    rest = (int.from_bytes(hashlib.blake2b(f"{tails}/{start + i}".encode(), digest_size=6).digest(), "little") >> 3
            for i in indices)
    return [(i, (stream[offset + i] * 2 ** 45 + low) / 2 ** 53) for i, low in zip(indices, rest)]


def draw_priorities(seed, start, end, limit):
    """The uniform draw's priorities (priorities_below) of the points of [start, end) below limit / 256."""
    return priorities_below(f"draw/{seed}", f"draw/{seed}", start, end, limit)


def lowest_drawn(columns, seed, first, count, distinct=True):
    """The `count` points of lowest draw priority, distinct ones if asked (a point's priority is then
    its lowest copy's), as (priority, index from `first`, point), lowest first (of equal priorities
    the lower index); fewer if there are fewer. Only points below a limit get whole priorities: one
    that expects 2 count + 16 of them, raised fourfold while they hold too few distinct points.
    Every point above it has a higher priority than every point below."""
    size = len(columns[0])
    limit = min(256, -(-256 * (2 * count + 16) // max(1, size)))
    while True:
        chosen = {}
        for priority, index in sorted((p, i) for i, p in draw_priorities(seed, first, first + size, limit)):
            if len(chosen) == count:
                break
            point = tuple(column[index] for column in columns)
            chosen.setdefault(point if distinct else index, (priority, first + index, point))
        if len(chosen) == count or limit == 256:
            return sorted(chosen.values())
        limit = min(256, 4 * limit)   # many copies among the lowest: look further


def merge_draws(draws, count, distinct=True):
    """The `count` points of lowest priority over several splits' draws (each already its split's
    lowest), distinct points only if asked; in priority order."""
    best = {}
    for priority, index, point in itertools.chain.from_iterable(draws):
        key = point if distinct else index
        if key not in best or (priority, index) < best[key][:2]:
            best[key] = (priority, index, point)
    return sorted(best.values())[:count]


def weighted_index(weights, fraction):
    """The index i where the running sum of weights first exceeds fraction * total (0 <= fraction < 1);
    a zero weight is never chosen."""
    running = list(itertools.accumulate(weights))
    index = bisect.bisect_right(running, fraction * running[-1])
    while index >= len(weights) or weights[index] == 0:   # rounding at the very top end
        index -= 1
    return index


def distance_source(result, centroid, dim, whole=None):
    """Source setting `result` to the squared distance of a point to a centroid, `nearest`'s arithmetic,
    for a compiled loop: unrolled over the point's x0, x1, ... and the centroid's coordinates that
    `centroid` names (a format of d), or, given `whole` (the centroid's name), squared_distance(point, it)."""
    if whole is not None:
        return f"{result} = squared_distance(point, {whole})"
    return (f"{'; '.join(f'd{d} = x{d} - {centroid.format(d=d)}' for d in range(dim))}; "
            f"{result} = {' + '.join(f'd{d} * d{d}' for d in range(dim))}")


@functools.lru_cache(maxsize=64)
def candidate_updater(count, dim):
    """A compiled loop bringing each point's D^2 and nearest candidate up to date with `count` new
    candidates (k-means||); of equal distances the earlier candidate stays."""
    body = ["def update(columns, candidates, weights, owners, first):",
            f"    ({', '.join('(' + ''.join(f'c{k}_{d}, ' for d in range(dim)) + ')' for k in range(count))},) "
            "= candidates",
            "    i = -1",
            f"    for {''.join(f'x{d}, ' for d in range(dim))}b in zip(*columns, weights):",
            "        i += 1; k = -1"]
    for key in range(count):
        body += [f"        {distance_source('d', f'c{key}_{{d}}', dim)}", f"        if d < b: b = d; k = {key}"]
    body.append("        if k >= 0: weights[i] = b; owners[i] = first + k")
    namespace = {}
    exec(compile("\n".join(body), f"<k-means|| update {count} x D={dim}>", "exec"), namespace)
    return namespace["update"]


@functools.lru_cache(maxsize=64)
def first_distances(dim):
    """A compiled loop setting each point's D^2 to one candidate, as candidate_updater computes it (the
    same doubles, inf where a square overflows), without its comparisons: the first round, where every
    point takes its only candidate."""
    source = (f"def first(columns, candidate, weights):\n    {''.join(f'c{d}, ' for d in range(dim))}= candidate\n"
              f"    for i, {''.join(f'x{d}, ' for d in range(dim))}in zip(count(), *columns):\n"
              f"        {distance_source('weights[i]', 'c{d}', dim)}")
    namespace = {"count": itertools.count}
    exec(compile(source, f"<first candidate's D^2, D={dim}>", "exec"), namespace)
    return namespace["first"]


def reach_margins(dim):
    """(factor, term): a candidate whose distance from a point, by the triangle inequality, is at least
    factor x (the point's computed distance to its nearest) + term cannot be nearer in the computed
    squared distances either: the factor covers rounding, the term squares that underflow (as in
    bound_factors)."""
    return 1.0 + 5e-10, 8 * math.sqrt(dim) * 2.0 ** -537


def reach_below(distances, dim):
    """Per distance, a D^2 (reach_margins, squared, rounded down) that a candidate at least that far
    from a point cannot beat if the point's D^2 is at most it, or -1 if there is none."""
    factor, term = reach_margins(dim)
    return [((distance - term) / factor) ** 2 * (1 - 2.0 ** -50) if distance > term else -1.0
            for distance in distances]


@functools.lru_cache(maxsize=64)
def pruned_updater(dim, measured, separated, projected=False):
    """A compiled loop like candidate_updater's for points that have a nearest candidate already: a
    new one can be nearer only if it lies within twice the point's distance r of that candidate
    (triangle inequality), or within r + r' once one at r' is found, so each point measures only
    those, nearest first from `near`, and none if its D^2 is at most its candidate's gate; of equal
    distances the lower number wins. The margins are reach_margins'.
    Without `separated` (a k-means++ round: one new candidate), each changed D^2 goes to `dropped`,
    its new value to `added`, so the mass follows the few that changed.
    With `separated` (a k-means|| round at D > 2), each row ends with the new candidate's
    `separations` (or None), and once a point has a new nearest one, a candidate separated from it by
    more than twice (an upper bound on) the point's distance to it is passed over (Elkan: it is
    farther, with room for any rounding). The loop is unrolled over the coordinates, or, `measured`
    (k-means|| at high D), takes math.dist's distances at C speed as the assignment does
    (measured_bounds): a point whose nearest is clearly apart from the next gets its D^2 with
    `nearest`'s arithmetic for that candidate, and one in doubt is settled with it (`settled`), so
    every D^2 and number is the same.
    `projected` (k-means|| round 2 at D > 2: its one anchor orders the new candidates badly), a point
    takes them instead from its cell of a grid over two coordinates (projected_grid), nearest first by
    their distance in those two, which is at most the whole: it stops where that passes the point's D^2
    (cell_updater's test) or, measured, where it passes an upper bound on the best one's distance, so
    every one left is clearly farther (as the best and second are when apart)."""
    reach, underflow = reach_margins(dim)
    namespace = {"count": itertools.count, "sqrt": math.sqrt, "REACH": reach, "UNDERFLOW": underflow,
                 "dist": math.dist, "inf": math.inf, "squared_distance": squared_distance, "settled": settled,
                 **bound_factors(dim)}
    header = f"def update(columns, near, gates, weights, owners, candidates{'' if separated else ', dropped, added'}):"
    xs, es = "".join(f"x{d}, " for d in range(dim)), "".join(f"e{d}, " for d in range(dim))
    skip = "            if apart is not None and apart[j] > twice: continue"
    exact = (f"{xs}= point; {es}= candidates[k]; {distance_source('b', 'e{d}', dim)}" if dim <= MAX_UNROLLED_DIM
             else "b = squared_distance(point, candidates[k])")
    settle = "        if not best * SWELL + TINY < second * SHRINK - TINY: k = settled(point, o, candidates, near[o], wide)[0]"
    # where a point's candidates come from, where it stops, and how that follows a nearer one
    if projected:
        namespace["trunc"] = math.trunc
        header = "def update(columns, near, gates, weights, owners, candidates, cells, lows, scales, width, across):"
        ys, across, prologue = ", y0, y1", ", *across", ["    (low0, low1), (scale0, scale1) = lows, scales"]
        row = f"cells[{grid_cell('y', 2)}]"
    else:
        ys, across, prologue, row = "", "", [], "near[o]"
    if measured:
        start, stop, follow = (("edge = root * SWELL + TINY", "far > edge", "edge = d * SWELL + TINY") if projected else
                               ("reach = wide", "far >= reach", "reach = REACH * (root + d) + UNDERFLOW"))
        body = [header, *prologue,
                f"    for i, point, b, k{ys} in zip(count(), zip(*columns), weights, owners{across}):",
                "        if gates[k] >= b: continue",
                f"        root = sqrt(b); wide = REACH * (root + root) + UNDERFLOW; {start}",
                "        best = root; o = k; second = inf; apart = None",
                f"        for far, j, candidate, between in {row}:",
                f"            if {stop}: break",
                skip,
                "            d = dist(point, candidate)",
                "            if d < best:",
                f"                second = best; best = d; k = j; {follow}",
                "                apart = between; twice = (d * SWELL + TINY + TINY) * TWICE",
                "            elif d < second: second = d",
                settle,
                f"        if k != o: {exact}; weights[i] = b; owners[i] = k"]
    elif separated:
        start, stop, follow = (("", "far >= b", "") if projected else
                               ("root = sqrt(b); reach = REACH * (root + root) + UNDERFLOW; ", "far >= reach",
                                "; reach = REACH * (root + root_d) + UNDERFLOW"))
        body = [header, *prologue,
                f"    for i, {xs}b, k{ys} in zip(count(), *columns, weights, owners{across}):",
                "        if gates[k] >= b: continue",
                f"        {start}o = k; apart = None",
                f"        for far, j, {es}between in {row}:",
                f"            if {stop}: break",
                skip,
                f"            {distance_source('d', 'e{d}', dim)}",
                "            if d < b or d == b and j < k:",
                f"                b = d; k = j; root_d = sqrt(d){follow}",
                "                apart = between; twice = (root_d * SWELL + TINY + TINY) * TWICE",
                "        if k != o: weights[i] = b; owners[i] = k"]
    else:
        body = [header,
                f"    for i, {xs}b, k in zip(count(), *columns, weights, owners):",
                "        if gates[k] >= b: continue",
                "        root = sqrt(b); reach = REACH * (root + root) + UNDERFLOW; o = k; w = b",
                f"        for far, j, {es}in near[o]:",
                "            if far >= reach: break",
                f"            {distance_source('d', 'e{d}', dim)}",
                "            if d < b or d == b and j < k: b = d; k = j; reach = REACH * (root + sqrt(d)) + UNDERFLOW",
                "        if k != o: weights[i] = b; owners[i] = k; dropped(w); added(b)"]
    exec(compile("\n".join(body), f"<k-means|| pruned update D={dim}{' measured' if measured else ''}"
                 f"{' projected' if projected else ''}>", "exec"),
         namespace)
    return namespace["update"]


def grid_cell(name, dim):
    """Source for the cell of grid_of's grid that a point's coordinates name0, name1 (dim of them) lie
    in: x - low >= 0, so trunc gives int()'s cell, in half the time."""
    return " * width + ".join(f"trunc(({name}{d} - low{d}) * scale{d})" for d in range(dim))


@functools.lru_cache(maxsize=8)
def cell_updater(dim, gated):
    """A compiled loop like pruned_updater's for D <= 2, where the table is by cell of a grid over the
    points rather than by nearest candidate: a new candidate can be nearer to a point only if it lies
    within the point's distance r of the point's cell, so each point measures only the candidates that
    near[its cell] lists within r, nearest first, and within r' once one at r' is found; and, `gated`,
    none if its D^2 is at most its nearest candidate's gate (pruned_updater's). Round 2 is not: its one
    old candidate's gate holds back few points (5 % on the bench's file), and the test costs all."""
    cell = grid_cell("x", dim)
    body = ["def update(columns, gates, near, lows, scales, width, weights, owners):",
            f"    ({''.join(f'low{d}, ' for d in range(dim))}), ({''.join(f'scale{d}, ' for d in range(dim))}) = lows, scales",
            f"    for i, {''.join(f'x{d}, ' for d in range(dim))}b, k in zip(count(), *columns, weights, owners):",
            *(["        if gates[k] >= b: continue"] if gated else []),
            "        o = k",
            f"        for far, j, {''.join(f'e{d}, ' for d in range(dim))}in near[{cell}]:",
            "            if far >= b: break",
            f"            {distance_source('d', 'e{d}', dim)}",
            "            if d < b or d == b and j < k: b = d; k = j",
            "        if k != o: weights[i] = b; owners[i] = k"]
    namespace = {"count": itertools.count, "trunc": math.trunc}
    exec(compile("\n".join(body), f"<k-means|| cell update D={dim}>", "exec"), namespace)
    return namespace["update"]


def grid_of(columns, new, first, box=None, keys=None, payload=None):
    """A grid over the points of D <= 2 columns for cell_updater, about 16 cells per new candidate,
    fewer where its table would cost more than a third of a pass: (per cell, each new candidate's
    (a D^2 it cannot beat from the cell (reach_below), number from `first`, coordinates), in
    that order; the lowest coordinates; cells per unit; cells per row). A point's cell is
    int((x - low) x scale) per coordinate, its highest one included; each cell's box is widened to
    hold every point whose rounded index is the cell's. `box`: each column's (lowest, highest), if known.
    For a grid over two coordinates of more (projected_grid), `keys` makes the first of each entry from
    the distances in those two, and `payload` (lists of a value per new candidate) the rest."""
    dim, cells = len(columns), max(1, min(16 * len(new), len(columns[0]) // (3 * len(new))))
    per_axis = math.isqrt(cells) if dim == 2 else cells
    lows, scales, gaps = [], [], []   # gaps[axis][cell index along it]: each candidate's squared gap to it
    numbers, coordinates = range(first, first + len(new)), list(zip(*new))
    for (low, high), along in zip(box or [(min(column), max(column)) for column in columns], coordinates):
        # a hair under per_axis cells: the highest point is not alone
        scale = per_axis * (1 - 2.0 ** -40) / (high - low) if high - low > 2.0 ** -1000 else 0.0
        pad = 4 * math.ulp(max(abs(low), abs(high))) + (2.0 ** -20 / scale if scale else 0.0)
        edges = [(low + i / scale - pad, low + (i + 1) / scale + pad) if scale else (low - pad, high + pad)
                 for i in range(int((high - low) * scale) + 1)]
        gaps.append([[max(lower - e, e - upper, 0.0) ** 2 for e in along] for lower, upper in edges])
        lows.append(low)
        scales.append(scale)
    keys = keys or functools.partial(reach_below, dim=dim)
    near = [sorted(zip(keys(map(math.sqrt, map(operator.add, *cell) if dim == 2 else cell[0])),
                       numbers, *(payload or coordinates))) for cell in itertools.product(*gaps)]
    return near, lows, scales, len(gaps[-1])


def projected_grid(columns, new, first, between, measured):
    """A grid over the two coordinates of D > 2 columns along which the new candidates spread most, for
    pruned_updater's projected loop: (per cell, each new candidate's (a bound from its distance to the
    cell in those two coordinates, number from `first`, coordinates or, `measured`, the candidate, its
    separations), in that order; the lowest coordinates; cells per unit; cells per row; the two columns).
    A distance in two coordinates is at most the whole, so the bound is reach_below's D^2, or, measured,
    a lower bound on the whole distance (the computed one less its rounding, as bound_factors' SHRINK)."""
    dim, spread = len(columns), [max(along) - min(along) for along in zip(*new)]
    axes = sorted(range(dim), key=spread.__getitem__)[-2:]
    across = [columns[axis] for axis in axes]
    factors = bound_factors(dim)
    if measured:
        shrink, tiny = factors["SHRINK"], factors["TINY"]
        keys, payload = (lambda distances: [distance * shrink - tiny for distance in distances]), [new, between]
    else:
        keys, payload = functools.partial(reach_below, dim=dim), [*zip(*new), between]
    return (*grid_of(across, [tuple(candidate[axis] for axis in axes) for candidate in new], first, None, keys,
                     payload), across)


def gates_of(nearest_new, dim):
    """Per old candidate, from its computed distance to the nearest new one: a D^2 up to which a point
    it owns cannot be nearer any new one (within half that distance, reach_below's margins)."""
    return [limit / 4 for limit in reach_below(nearest_new, dim)]


def separations(new, first):
    """Per new candidate, a lower bound on its true distance to each of the others (math.dist's, less its
    error), indexed by candidate number (new ones from `first`; the old ones' places hold 0): a point
    nearer one of them than half that is nearer it than the other."""
    factors = bound_factors(len(new[0]))
    shrink, tiny = factors["SHRINK"], factors["TINY"]
    return [[0.0] * first + [math.dist(a, b) * shrink - tiny for b in new] for a in new]


def update_candidates(columns, candidates, seen, weights, owners, box=None):
    """Every point's D^2 to its nearest candidate and that candidate's number, once the candidates
    after the first `seen` joined them; returns the D^2 that changed as (dropped, added) after a
    k-means++ round (one new candidate, which few points move to) or none new, else None: they are to
    be summed afresh. New candidates are measured against every point, in blocks the compiled loop takes, or,
    once points have a nearest candidate, only where the triangle inequality lets them compete, when
    the table of distances between old and new candidates that this needs costs no more than a pass:
    from each point's cell of a grid where D <= 2 and there are several (k-means||: in round 2 one old
    candidate tells the points little, and later a cell lists fewer than a candidate's neighbourhood),
    in round 2 at D > 2 from its cell of a grid over two coordinates (projected_grid), else from each
    point's nearest candidate. `box`: each column's (lowest, highest), if known."""
    dim = len(columns)
    if seen == len(candidates):   # none new: a backup copy of a round, or a k-means|| exact_mass request
        return [], []
    if seen == 0 and len(candidates) == 1:   # every point's D^2 is inf, its owner 0
        first_distances(dim)(columns, candidates[0], weights)
        return None
    if seen == 0 or seen * (len(candidates) - seen) > len(weights):
        block = max(1, MAX_UNROLLED // dim)
        for low in range(seen, len(candidates), block):
            part = candidates[low:low + block]
            candidate_updater(len(part), dim)(columns, part, weights, owners, low)
        return None
    new = candidates[seen:]
    several = len(new) > 1   # k-means||: a k-means++ round adds one, and a point that moves to it needs its D^2 anyway
    if dim <= 2 and several:
        nearest_new = (min(math.sqrt(squared_distance(old, candidate)) for candidate in new)
                       for old in candidates[:seen])
        cell_updater(dim, seen > 1)(columns, gates_of(nearest_new, dim), *grid_of(columns, new, seen, box), weights,
                                    owners)
        return None
    measured = several and dim >= NORM_FROM_DIM
    between = separations(new, seen) if several and len(new) ** 2 <= len(weights) else [None] * len(new)
    near = [sorted((math.sqrt(squared_distance(old, candidate)), j, *([candidate] if measured else candidate),
                    *([apart] if several else [])) for j, candidate, apart in
                   zip(itertools.count(seen), new, between)) for old in candidates[:seen]]
    gates = gates_of((table[0][0] if table else math.inf for table in near), dim)
    if not several:
        dropped, added = [], []
        pruned_updater(dim, False, False)(columns, near, gates, weights, owners, candidates, dropped.append,
                                          added.append)
        return dropped, added
    if seen == 1:   # round 2: one anchor orders the new candidates badly
        pruned_updater(dim, measured, True, projected=True)(columns, near, gates, weights, owners, candidates,
                                                            *projected_grid(columns, new, seen, between, measured))
    else:
        pruned_updater(dim, measured, True)(columns, near, gates, weights, owners, candidates)
    return None


def round_priorities(seed, start, end, also=()):
    """A k-means|| round's priorities (priorities_below) of the points of [start, end) below
    PICK_PRIORITY (a first byte of 0), and of the points `also`."""
    return priorities_below(f"k-means||/{seed}", seed, start, end, 1, also)


def block_masses(weights, start):
    """A k-means|| round's D^2 mass of a split [start, start + len(weights)) in parts the master can put
    together the same way for any M: per block of PRIORITY_BLOCK points (by index) that the split
    touches, (block, terms): the block's correctly rounded sum where the split holds all of it, else the
    exact terms of its part (exact_terms). One pass of fsum, where the split's exact sum takes three."""
    end, parts = start + len(weights), []
    for block in priority_blocks(start, end):
        low, high = max(start, block * PRIORITY_BLOCK) - start, min(end, (block + 1) * PRIORITY_BLOCK) - start
        part = weights[low:high]
        parts.append((block, [math.fsum(part)] if high - low == PRIORITY_BLOCK else exact_terms(part)))
    return parts


def whole_mass(parts):
    """The D^2 mass from block_masses' parts: each block's sum, correctly rounded, summed and correctly
    rounded again, so a function of the points alone, whatever the split (fsum: in any order). Of
    some splits' parts only, it is at most the whole mass: every block's sum and both roundings grow
    with what is added."""
    by_block = collections.defaultdict(list)
    for block, terms in parts:
        by_block[block].extend(terms)
    return math.fsum(map(math.fsum, by_block.values()))


def mass_bounds(weights):
    """(low, high) around the exact sum of a split's D^2 from one plain sum at C speed, where its mass
    by block (block_masses) takes a pass of fsum: adding n nonnegative doubles in any order errs by at
    most (n - 1) x 2**-53 of the sum (Higham, Accuracy and Stability, 4.2). The margin is twice that and
    ten roundings more: room for its own products, mass_between's fsum and whole_mass's two roundings.
    None where the sum is below 2**-900 (relative bounds do not hold among subnormals) or the high end
    overflows."""
    rough = sum(weights, 0.0)
    if rough == 0.0:   # nonnegative terms: every one is 0
        return 0.0, 0.0
    margin = (len(weights) + 4) * 2.0 ** -52   # 2 (n - 1) + 10 roundings
    high = rough * (1 + margin)
    return (rough * (1 - margin), high) if 2.0 ** -900 < rough and high < math.inf else None


def mass_between(bounds):
    """(low, high) around a k-means|| round's whole D^2 mass (whole_mass) from every split's mass_bounds
    (whose margins leave room for the roundings), or None if a split has none."""
    if not all(bounds):
        return None
    return math.fsum(low for low, _ in bounds), math.fsum(high for _, high in bounds)


def may_be_picked(candidates, weights, mass, oversample):
    """Of `candidates` ((index, priority) pairs, ascending), those a k-means|| round may pick. The
    master picks each point whose priority x the whole D^2 mass < l x D^2 (so with probability
    min(1, l D^2 / mass), Bahmani et al.); the whole mass is at least the split's `mass`, so each such
    point has priority x mass / l < D^2 here, with room for the rounding on both sides. (A priority is
    0 or at least 2**-53, so that product underflows only for a mass below 2**-900: then the master's
    own test, with this split's mass.)"""
    if mass < 2.0 ** -900:
        return [(i, p) for i, p in candidates if mass * p < oversample * weights[i]]
    bar = mass / oversample * (1 - 2.0 ** -40)
    return [(i, p) for i, p in candidates if bar * p < weights[i]]


def round_picks(seed, start, weights, mass, oversample):
    """The points of a split that a k-means|| round may pick (may_be_picked), as (index from start,
    priority). Only priorities below PICK_PRIORITY are drawn for every point: a point with a larger
    one is offered only if its D^2 exceeds PICK_PRIORITY x mass / l, and the few such heavy points
    (at most l / PICK_PRIORITY) are looked at whatever their priority; every point is, where the
    mass is so small (below 2**-900) that the test's products underflow."""
    if not mass:
        return []
    if mass < 2.0 ** -900:
        heavy = range(len(weights))   # the products underflow: every priority
    else:
        line = mass / oversample * (1 - 2.0 ** -40) * PICK_PRIORITY
        heavy = itertools.compress(range(len(weights)), map(line.__le__, weights)) if max(weights) >= line else ()
    return may_be_picked(round_priorities(seed, start, start + len(weights), heavy), weights, mass, oversample)


def recluster(candidates, weights, clusters, rng, rounds=30):
    """K centroids from k-means|| candidates, each weighing the points nearest to it: k-means++ with
    D^2 x weight, then weighted Lloyd until nothing moves (at most `rounds`, fewer at large K so that
    they measure at most RECLUSTER_WORK distances). Fewer than K when fewer candidates carry weight.
    The distances are the compiled loops' (update_candidates), `nearest`'s arithmetic and ties."""
    points = [c for c, w in zip(candidates, weights) if w]
    mass = [float(w) for w in weights if w]
    if len(points) <= clusters:
        return points
    columns = to_columns(points, len(points[0]))
    distances, owners = array("d", [math.inf]) * len(points), array("q", bytes(8 * len(points)))
    chosen = [points[weighted_index(mass, rng.random())]]
    update_candidates(columns, chosen, 0, distances, owners)
    while len(chosen) < clusters:
        weighted = list(map(operator.mul, distances, mass))
        if not any(weighted):
            break
        chosen.append(points[weighted_index(weighted, rng.random())])
        update_candidates(columns, chosen, len(chosen) - 1, distances, owners)
    centroids = chosen
    for _ in range(min(rounds, max(1, RECLUSTER_WORK // (len(centroids) * len(points))))):
        distances, owners = array("d", [math.inf]) * len(points), array("q", bytes(8 * len(points)))
        update_candidates(columns, centroids, 0, distances, owners)
        members = indices_by_key(owners, len(centroids))
        moved = [tuple(math.fsum(mass[i] * points[i][d] for i in indices) / math.fsum(mass[i] for i in indices)
                       for d in range(len(points[0]))) if indices else centroid
                 for indices, centroid in zip(members, centroids)]
        if moved == centroids:
            break
        centroids = moved
    return centroids


def topped_up(centroids, sample, clusters):
    """`centroids` without repeats, then points of the uniform sample (K distinct) until there are K."""
    chosen = list(dict.fromkeys(centroids))
    seen = set(chosen)
    return chosen + [point for point in sample if point not in seen][:clusters - len(chosen)]


# ####################################################################################################
# Map across iterations: a split's assignment, kept and updated (Hamerly's bounds)
# ####################################################################################################
#
# A mapper keeps each split's assignment between iterations, with Hamerly's two bounds per point: an
# upper bound on the distance to its own centroid and a lower bound on the distance to every other one.
# When centroids move, the upper bound grows by how far its own centroid moved and the lower bound
# shrinks by how far any other one moved. A point can change cluster only if its upper bound exceeds
# both its lower bound and half the distance from its centroid to the nearest other one; only such
# points are examined again, with exactly `nearest`'s arithmetic, and only against the centroids near
# enough to their own to compete (Elkan's test on the distances between centroids). A computed distance
# is within a relative error (and, where squares underflow, a tiny absolute one) of the true distance,
# whatever its scale; every bound is widened by those, and every per-cluster limit lies below its exact
# value by more than its rounding, so a point is skipped only when its centroid is strictly nearest in
# the computed squared distances too: the keys are always `nearest`'s, ties included. Being relative, the
# margins do not grow with the largest coordinate: a 1e150 point costs its own split nothing. A centroid
# that makes a move far larger than the distances between the others (a cluster taking an outlier) is
# marked far: its moves stay out of the other clusters' lower bounds, which one such move would wipe out,
# and a point is skipped past it only if its own centroid is nearer than half the way to it. If all it
# moved since is no longer far by that measure, it rejoins the others, and their lower bounds take in
# that move at once.
# The whole step is one compiled loop per (K, D), like the assignment loop: a skipped point costs a few
# comparisons. From D=6 both loops take their distances from math.dist, at C speed: it is within the
# error every bound allows a computed distance, so the bounds come from it alike, and a point whose
# nearest centroid it does not clearly set apart from the next is measured with `nearest`'s arithmetic.
#
# Plain partitions (no combiner) send every point, so each cluster's points are kept in a Bucket that
# changes by the points that moved, rather than gathered from the whole split every iteration.
#
# The SSE needs no distances: it is sum x^2 over the split (the same whatever the clusters, summed once
# with integers) less, per cluster and dimension, 2 c sum x - n c^2, every product split into doubles
# whose exact sum it is. So the SSE is the exact one, correctly rounded, and each cluster's part changes
# only with its exact sums, which change only by the points that moved.


@functools.lru_cache(maxsize=64)
def two_nearest_assigner(clusters, dim):
    """A compiled loop giving, per point, `nearest`'s key, the squared distance to that centroid and
    the second smallest squared distance (equal to the first on a tie); arithmetic and the strict '<'
    are `nearest`'s."""
    coords = [f"x{d}" for d in range(dim)]
    body = ["def assign(columns, centroids):",
            f"    ({', '.join('(' + ''.join(f'c{k}_{d}, ' for d in range(dim)) + ')' for k in range(clusters))},) "
            "= centroids",
            "    keys, best, second = array('i'), array('d'), array('d')",
            "    add_key, add_best, add_second = keys.append, best.append, second.append",
            f"    for {', '.join(coords)}, in zip(*columns):"]
    for key in range(clusters):
        if key == 0:
            body.append(f"        {distance_source('b', 'c0_{d}', dim)}; s = inf; k = 0")
        else:
            body += [f"        {distance_source('d', f'c{key}_{{d}}', dim)}",
                     f"        if d < b: s = b; b = d; k = {key}",
                     "        elif d < s: s = d"]
    body += ["        add_key(k); add_best(b); add_second(s)", "    return keys, best, second"]
    namespace = {"array": array, "inf": math.inf}
    exec(compile("\n".join(body), f"<two nearest K={clusters} D={dim}>", "exec"), namespace)
    return namespace["assign"]


def two_nearest(columns, centroids):
    """(keys, best, second) of some points, as `two_nearest_assigner` gives them."""
    dim = len(columns)
    if len(centroids) * dim <= MAX_UNROLLED:
        return two_nearest_assigner(len(centroids), dim)(columns, centroids)
    keys, best, second = array("i"), array("d"), array("d")
    for point in zip(*columns):
        distances = [squared_distance(point, centroid) for centroid in centroids]
        key = distances.index(min(distances))
        keys.append(key)
        best.append(distances[key])
        second.append(min(distances[:key] + distances[key + 1:], default=math.inf))
    return keys, best, second


@functools.lru_cache(maxsize=None)
def bound_factors(dim):
    """What every bound is made with. A distance computed with `nearest`'s arithmetic (D squares summed
    left to right, then the root) is within rho x the true one + tau of it, and the true one within as
    much of it: rho = (2D + 16) x ROUNDOFF (twice Higham's bound), tau = 2 sqrt(D) 2**-537 for squares
    that underflow. Each factor holds a further rho (and tau) for the rounding of the expression that
    applies it: `swell`, `tiny` make an upper bound on (1 + rho) x a true distance + tau from a computed
    one; `shrink` a lower bound; `half` half a lower bound on a distance between centroids, less tau;
    `twice` the reach within which a centroid can compete; `shade` rounds a stored lower bound down."""
    rho, tau = (2 * dim + 16) * ROUNDOFF, 2 * math.sqrt(dim) * 2.0 ** -537
    return {"SWELL": 1 + 3 * rho, "SHRINK": 1 - 3 * rho, "TINY": 3 * tau, "HALF": 0.5 - 1.5 * rho,
            "TWICE": 2 + 6 * rho, "SHADE": 1 - 4 * ROUNDOFF}


def below(value, scale):
    """A float strictly below `value` by more than the rounding of an operation on numbers up to `scale`
    that gave it: per-cluster limits err only on the side of measuring a point."""
    if value == math.inf:
        return value
    return math.nextafter(value - 8 * ROUNDOFF * scale, -math.inf)


@functools.lru_cache(maxsize=64)
def bounded_reassigner(clusters, dim, measured, far):
    """A compiled loop moving a split's points to new centroids with Hamerly's test: a point whose
    bounds prove its centroid still nearest (and, with `far` centroids, nearer than half the way to
    them) is skipped; otherwise its own distance tightens the upper bound, and if it is still in doubt
    it is measured against the centroids that can compete. Those are the ones nearer its centroid than
    twice its distance (triangle inequality: the others are farther than its own), taken nearest first
    from `neighbours`. Distances use `nearest`'s arithmetic and a tie goes to the lowest index, so the
    key is `nearest`'s. The loop is unrolled over the coordinates, or, `measured`, takes math.dist's
    distances, and a point whose nearest is not clearly apart from the next (see measured_bounds) is
    settled with `nearest`'s arithmetic. Updates keys and bounds in place; returns (moves, examined,
    rechecked)."""
    root = "" if measured else "sqrt"   # measured distances are distances, the others squared
    body = ["def reassign_points(columns, keys, upper, lower, centroids, neighbours, limits, grown, shrunk, half,"
            " far_half):",
            "    upper_limit, gap_limit, far_limit = limits",
            "    moves = []; add_move = moves.append; examined = rechecked = 0"]
    if not measured:
        xs = "".join(f"x{d}, " for d in range(dim))
        body += [f"    {''.join(f'own{d}, ' for d in range(dim))}= map(list, zip(*centroids))",
                 f"    for i, {xs}k, u, l in zip(count(), *columns, keys, upper, lower):"]
    else:
        body.append("    for i, point, k, u, l in zip(count(), zip(*columns), keys, upper, lower):")

    def measure(result, coordinates, whole):
        return f"{result} = dist(point, {whole})" if measured else distance_source(result, coordinates, dim)

    body += [f"        if u <= upper_limit[k] or u - l <= gap_limit[k]{' and u <= far_limit[k]' if far else ''}:"
             " continue",
             "        examined += 1",
             f"        {measure('b', 'own{d}[k]', 'centroids[k]')}",
             f"        reach = {root}(b) * SWELL + TINY",
             "        upper[i] = reach - grown[k]",
             f"        if reach < half[k] or reach < l - shrunk[k]{' and reach < far_half[k]' if far else ''}:"
             " continue",
             "        rechecked += 1",
             "        twice = (reach + TINY) * TWICE; s = beyond = inf; key = k"]
    names = "centroid, " if measured else "".join(f"e{d}, " for d in range(dim))
    body += [f"        for distance, j, {names}in neighbours[k]:",
             "            if distance >= twice: beyond = distance; break",
             f"            {measure('d', 'e{d}', 'centroid')}",
             "            if d < b or d == b and j < key: s = b; b = d; key = j",
             "            elif d < s: s = d"]
    if measured:
        body.append("        if not b * SWELL + TINY < s * SHRINK - TINY: key, b, s = settled(point, k, centroids, "
                    "neighbours[k], twice)")
    body += ["        if key != k:",
             f"            upper[i] = {root}(b) * SWELL + TINY - grown[key]; keys[i] = key; add_move((i, k, key))",
             f"        low = {root}(s) * SHRINK - TINY",
             "        past = beyond * SHRINK - reach - TINY   # below the distance to any centroid not measured",
             "        if past < low: low = past",
             "        lower[i] = (low + shrunk[key]) * SHADE if low > 0.0 else -inf",
             "    return moves, examined, rechecked"]
    namespace = {"count": itertools.count, "sqrt": math.sqrt, "inf": math.inf, "dist": math.dist, "settled": settled,
                 **bound_factors(dim)}
    exec(compile("\n".join(body), f"<bounded reassign K={clusters} D={dim}{' measured' if measured else ''}>", "exec"),
         namespace)
    return namespace["reassign_points"]


def settled(point, own, centroids, row, twice):
    """(key, distance, second distance) of a point in doubt among its own centroid and the neighbours
    in `row` nearer it than `twice`, with `nearest`'s arithmetic and ties: the key the compiled loops
    compute, and bounds as valid as theirs."""
    best, second, key = squared_distance(point, centroids[own]), math.inf, own
    for distance, index, centroid, *_ in row:   # a k-means|| row carries more
        if distance >= twice:
            break
        candidate = squared_distance(point, centroid)
        if candidate < best or candidate == best and index < key:
            best, second, key = candidate, best, index
        elif candidate < second:
            second = candidate
    return key, math.sqrt(best), math.sqrt(second)


def square_terms(columns, magnitudes):
    """(doubles, integer): the sum of every squared coordinate of a split (the SSE needs it, whatever
    the clusters) is the doubles' exact sum plus the integer in units of 2**-2148. Every coordinate is
    a whole multiple of the ulp of the smallest nonzero one, so in that unit they are integers, squared
    and summed exactly; the few beyond TAME_RANGE, which would make those integers thousands of bits
    long, are squared one by one."""
    if not is_tame(magnitudes):
        low, high = TAME_RANGE
        tame = [array("d", (x if low <= abs(x) <= high else 0.0 for x in column)) for column in columns]
        beyond = [x for column in columns for x in column if x and not low <= abs(x) <= high]
        return square_terms(tame, coordinate_range(tame))[0], sum(fixed(x) * fixed(x) for x in beyond)
    smallest = magnitudes[0]
    if smallest == math.inf:
        return [], 0   # every coordinate is zero
    shift = max(0, 1 - math.frexp(math.ulp(smallest))[1])   # 2**-shift divides every coordinate
    scale = math.ldexp(1.0, shift)
    total = 0
    for column in columns:
        for low in range(0, len(column), ASSIGN_CHUNK):
            whole = list(map(int, map(scale.__mul__, column[low:low + ASSIGN_CHUNK])))
            total += sum(map(operator.mul, whole, whole))
    return integer_terms(total, 2 * shift), 0


@dataclass
class Assignment:
    """Where a split's points stand against one set of centroids: what Map keeps between iterations."""

    centroids: list
    keys: array          # each point's cluster (the smallest integer type that holds K-1)
    upper: array         # per point: at least (1 + rho) x its distance to its centroid + tau, less `grown` of it
    lower: array         # per point: at most (1 - rho) x its distance to any other one - tau, plus `shrunk` of it
    grown: list          # per cluster: at least (1 + rho) x how far its centroid moved in all steps so far
    shrunk: list         # per cluster: at least that for the farthest move of any other centroid not far, summed
    far: list            # per cluster: None, or (as `grown`) how far its centroid moved since it became far
    counts: list         # points per cluster
    sums: list           # per cluster and dimension: doubles whose exact sum is the coordinate sum
    squares: tuple       # the split's square_terms
    buckets: list        # per cluster its Bucket, for plain partitions (None with the combiner)
    slots: array         # per point: its place in its cluster's bucket (None with the combiner)
    sse: tuple           # the exact SSE against `centroids`: (doubles, integer), see sse_of_sums
    examined: int        # points of the last step whose bounds did not prove their cluster (all, at first) ...
    rechecked: int       # ... and of those, points measured against other centroids


@dataclass
class Bucket:
    """A cluster's points as plain partitions send them, in no set order: indices, coordinates per
    dimension and texts, in step. Kept, not gathered again: a point moves out by the last one taking
    its place, so an iteration costs what moved, not what stayed."""

    indices: array
    columns: list
    texts: list

    @classmethod
    def of(cls, indices, columns, texts):
        """The bucket of the points `indices` of a split."""
        return cls(array("q", indices), [array("d", gather(column, indices)) for column in columns],
                   list(gather(texts, indices)))


def move_in_buckets(buckets, slots, columns, texts, moves):
    """Points that changed cluster go from one bucket to the other: the last point of the old bucket
    takes the place of the one leaving, which joins the new bucket at the end."""
    for index, old, new in moves:
        source, target, slot = buckets[old], buckets[new], slots[index]
        last = source.indices.pop()
        if last != index:
            source.indices[slot] = last
            slots[last] = slot
            for values in source.columns:
                values[slot] = values.pop()
            source.texts[slot] = source.texts.pop()
        else:
            for values in source.columns:
                values.pop()
            source.texts.pop()
        slots[index] = len(target.indices)
        target.indices.append(index)
        for values, column in zip(target.columns, columns):
            values.append(column[index])
        target.texts.append(texts[index])


def coordinate_range(columns):
    """The smallest nonzero and the largest |coordinate| (inf, 0 for no nonzero coordinate)."""
    smallest, largest = math.inf, 0.0
    for column in columns:
        smallest = min(smallest, min(filter(None, map(abs, column)), default=math.inf))
        largest = max(largest, max(map(abs, column), default=0.0))
    return smallest, largest


def is_tame(magnitudes):
    """Whether (smallest nonzero, largest) |coordinate| lie within TAME_RANGE."""
    smallest, largest = magnitudes
    return largest <= TAME_RANGE[1] and (largest == 0.0 or smallest >= TAME_RANGE[0])


def far_centroids(far, shifts, neighbours):
    """Which centroids are far after this step, and the moves the other clusters' lower bounds take in.
    A centroid becomes far when it moves more than FAR_MOVE times the largest distance from another
    centroid (not far) to its nearest neighbour, such as one taking an outlier; it rejoins the others
    when all it moved since is no more than that. Returns (far, counted): per cluster, None or how far
    it moved since it became far; and what the others' lower bounds count of it this step: its shift,
    nothing while it is far, and all it moved while far when it rejoins."""
    gaps = [row[0][0] if row and moved is None else 0.0 for row, moved in zip(neighbours, far)]
    widest, second = (heapq.nlargest(2, gaps) + [0.0])[:2]
    now, counted = [], []
    for shift, moved, gap in zip(shifts, far, gaps):
        scale = FAR_MOVE * (second if gap == widest else widest)
        if moved is not None:
            moved = (moved + shift) * ROUND_UP
            now.append(moved if moved > scale else None)
            counted.append(0.0 if moved > scale else moved)
        else:
            now.append(shift if shift > scale > 0.0 else None)
            counted.append(0.0 if shift > scale > 0.0 else shift)
    return now, counted


def key_array(clusters, size):
    """Zeroed keys of `size` points, in the smallest type that holds K-1 (1 byte a key up to K=128)."""
    typecode = "b" if clusters <= 128 else "h" if clusters <= 32768 else "i"
    return array(typecode, bytes(array(typecode).itemsize * size))


def by_norm(clusters, dim):
    """Whether the assignment measures with math.dist (high D, or too many centroids to unroll the loop)."""
    return dim >= NORM_FROM_DIM or clusters * dim > MAX_UNROLLED


def exact_bounds(columns, centroids):
    """(keys, upper, lower) of some points: `nearest`'s key and Hamerly's two bounds, from the two
    smallest squared distances `two_nearest` computes with `nearest`'s arithmetic."""
    factors = bound_factors(len(columns))
    swell, shrink, tiny = factors["SWELL"], factors["SHRINK"], itertools.repeat(factors["TINY"])
    keys, best, second = two_nearest(columns, centroids)
    return (keys, array("d", map(operator.add, map(swell.__mul__, map(math.sqrt, best)), tiny)),
            array("d", map(operator.sub, map(shrink.__mul__, map(math.sqrt, second)), tiny)))


def measured_bounds(columns, centroids):
    """exact_bounds, from math.dist's distances where they settle the key.

    math.dist runs at C speed (4.5x the compiled loop at D=64). Its result is the norm of the rounded
    differences within 1 ulp (Python >= 3.10, documented for hypot, the same routine): within 3
    ROUNDOFF x the true distance, or half the smallest subnormal where it underflows, well inside the
    rho and tau every bound already allows a computed distance (test_pruning checks it in exact
    arithmetic). So the bounds are made from it as from `nearest`'s, and where the upper bound to the
    nearest lies below the lower bound to every other centroid, `nearest`'s own computed distances
    order the same way, strictly: the key is `nearest`'s. Ties and near-ties fail that test, and those
    few points are measured again by exact_bounds.
    """
    factors = bound_factors(len(columns))
    swell, shrink, tiny = factors["SWELL"], factors["SHRINK"], factors["TINY"]
    centroids, count = [tuple(c) for c in centroids], len(centroids)
    keys, upper, lower, doubtful = array("i"), array("d"), array("d"), []
    add_key, add_upper, add_lower = keys.append, upper.append, lower.append
    for index, point in enumerate(zip(*columns)):
        distances = list(map(math.dist, itertools.repeat(point, count), centroids))
        best = min(distances)
        key = distances.index(best)
        distances[key] = math.inf
        reach, floor = best * swell + tiny, min(distances) * shrink - tiny
        if not reach < floor:
            doubtful.append(index)
        add_key(key)
        add_upper(reach)
        add_lower(floor)
    if doubtful:
        for index, key, reach, floor in zip(doubtful, *exact_bounds([gather(column, doubtful) for column in columns],
                                                                     centroids)):
            keys[index], upper[index], lower[index] = key, reach, floor
    return keys, upper, lower


def new_assignment(columns, centroids, texts, squares):
    """Every point of a split examined against the centroids: a fresh Assignment (with buckets of
    the points and their `texts` for plain partitions, unless texts is None)."""
    dim, clusters, size = len(columns), len(centroids), len(columns[0])
    first_bounds = measured_bounds if by_norm(clusters, dim) else exact_bounds
    keys = key_array(clusters, size)
    upper, lower = array("d", bytes(8 * size)), array("d", bytes(8 * size))
    counts, members = [0] * clusters, [[] for _ in centroids]
    sums = [[[] for _ in range(dim)] for _ in centroids]
    for low in range(0, size, ASSIGN_CHUNK):
        high = min(size, low + ASSIGN_CHUNK)
        part_keys, upper[low:high], lower[low:high] = first_bounds([column[low:high] for column in columns], centroids)
        keys[low:high] = array(keys.typecode, part_keys)
        for key, indices in enumerate(indices_by_key(part_keys, clusters, low)):
            if indices:
                counts[key] += len(indices)
                add_points(sums[key], columns, indices, [])
                if texts is not None:
                    members[key].extend(indices)
    buckets = slots = None
    if texts is not None:
        buckets, slots = [Bucket.of(indices, columns, texts) for indices in members], array("q", bytes(8 * size))
        for bucket in buckets:
            for slot, index in enumerate(bucket.indices):
                slots[index] = slot
    state = Assignment(list(centroids), keys, upper, lower, [0.0] * clusters, [0.0] * clusters, [None] * clusters,
                       counts, sums, squares, buckets, slots, [], examined=size, rechecked=size)
    state.sse = sse_of_sums(counts, sums, squares, centroids)
    return state


def add_points(sums, columns, came, went):
    """A cluster's exact sums after the points `came` joined it and `went` left: their coordinates
    added and subtracted without rounding."""
    for dimension, column in enumerate(columns):
        sums[dimension] = exact_terms(itertools.chain(sums[dimension], gather(column, came),
                                                      map(operator.neg, gather(column, went))))


def reassign(state, columns, texts, centroids):
    """Move an Assignment to new centroids, examining only points that may have changed cluster;
    returns how many changed. Counts, exact sums, buckets and SSE change by the points that moved."""
    dim, clusters = len(columns), len(centroids)
    factors = bound_factors(dim)
    swell, tiny = factors["SWELL"], factors["TINY"]
    shifts = [math.sqrt(squared_distance(a, b)) * swell + tiny for a, b in zip(state.centroids, centroids)]
    measured, targets = by_norm(clusters, dim), [tuple(c) for c in centroids]   # math.dist takes tuples as they are
    # per centroid, the others nearest first: (distance, index, coordinates)
    neighbours = [sorted((math.sqrt(squared_distance(c, other)), j, *([other] if measured else other))
                         for j, other in enumerate(targets) if j != k) for k, c in enumerate(targets)]
    far, counted = far_centroids(state.far, shifts, neighbours)
    if clusters > 1:   # a cluster's points are closer to the others by at most the farthest other shift
        second_largest, largest = sorted(counted)[-2:]
        farthest_other = [second_largest if shift == largest else largest for shift in counted]
    else:
        farthest_other = [0.0]
    grown = [(g + shift) * ROUND_UP for g, shift in zip(state.grown, shifts)]
    shrunk = [(s + other) * ROUND_UP for s, other in zip(state.shrunk, farthest_other)]
    half = [row[0][0] * factors["HALF"] - tiny if row else math.inf for row in neighbours]
    far_half = [min((entry[0] for entry in row if far[entry[1]] is not None), default=math.inf) * factors["HALF"] - tiny
                for row in neighbours] if any(moved is not None for moved in far) else None
    # skip a point if upper + grown < half (all others), or upper + grown < lower - shrunk and (with far
    # centroids) upper + grown < far_half; grown is rounded up once more for the rounding of upper
    swollen = [g * ROUND_UP for g in grown]
    limits = ([below(h - g, abs(h) + g) for h, g in zip(half, swollen)],
              [below(-(g + s), g + s) for g, s in zip(swollen, shrunk)],
              [below(h - g, abs(h) + g) for h, g in zip(far_half, swollen)] if far_half else None)
    moves, state.examined, state.rechecked = bounded_reassigner(clusters, dim, measured, far_half is not None)(
        columns, state.keys, state.upper, state.lower, targets, neighbours, limits, grown, shrunk, half, far_half)
    state.centroids, state.grown, state.shrunk, state.far = list(centroids), grown, shrunk, far
    apply_moves(state, columns, texts, moves)
    state.sse = sse_of_sums(state.counts, state.sums, state.squares, centroids)
    return len(moves)


def apply_moves(state, columns, texts, moves):
    """Counts, exact sums and buckets after points moved between clusters: each cluster's sums change
    by exactly the points that arrived and left."""
    arrived, left = collections.defaultdict(list), collections.defaultdict(list)
    for index, old, new in moves:
        left[old].append(index)
        arrived[new].append(index)
    for key in set(arrived) | set(left):
        came, went = arrived.get(key, []), left.get(key, [])
        state.counts[key] += len(came) - len(went)
        add_points(state.sums[key], columns, came, went)
    if state.buckets is not None:
        move_in_buckets(state.buckets, state.slots, columns, texts, moves)


def gather(values, indices):
    """values[i] for each of the indices, as a tuple: itemgetter does it at C speed."""
    if len(indices) > 1:
        return operator.itemgetter(*indices)(values)
    return tuple(values[i] for i in indices)


def indices_by_key(keys, clusters, first=0):
    """Per key, the indices of its points (counted from `first`), ascending."""
    members = [[] for _ in range(clusters)]
    add = [member.append for member in members]
    for index, key in enumerate(keys, first):
        add[key](index)
    return members


@dataclass
class Split:
    """A mapper's parsed split of one job's (pinned) input, kept across its iterations and runs."""

    columns: list           # array('d') per dimension: 8 bytes a coordinate
    texts: list = None      # each point's text, for the plain partition files
    magnitudes: tuple = None   # smallest nonzero and largest |coordinate|: how square_terms sums the squares
    assignment: Assignment = None   # where the points stood at the last Map or Weigh
    weights: array = None   # D^2 to the nearest of the centroids weighed so far (k-means++ or k-means||) ...
    owners: array = None    # ... the number of that centroid ...
    mass: list = None       # ... their exact sum (exact_terms) ...
    weights_for: tuple = ()  # ... and (run, how many centroids, the init): the next round measures only new ones
    lock: threading.Lock = field(default_factory=threading.Lock)   # one step of `assignment` at a time

    def nbytes(self):
        """About how much memory the split holds: coordinates, texts, its kept assignment and weights."""
        points, dim = len(self.columns[0]), len(self.columns)
        size = 8 * dim * points + (self.text_bytes if self.texts is not None else 0)
        state = self.assignment
        if state is not None:
            size += points * (state.keys.itemsize + 16) + (points * (8 * dim + 24) if state.buckets else 0)
        if self.weights is not None:
            size += 16 * len(self.weights)   # D^2 and owner, kept between seeding rounds
        return size

    @functools.cached_property
    def text_bytes(self):
        """What the points' texts take (Python strings), once."""
        return sum(map(len, self.texts)) + 49 * len(self.texts)

    @functools.cached_property
    def box(self):
        """Each column's lowest and highest coordinate, once: where k-means||'s grids lie (grid_of)."""
        return [(min(column), max(column)) for column in self.columns]

    @functools.cached_property
    def squares(self):
        """The split's square_terms, once."""
        return square_terms(self.columns, self.magnitudes)

    def weigh(self, run, centroids, init, mass=True):
        """Bring weights, owners and (if asked) mass up to date with `centroids` of this run and init
        (measuring only the ones added since the last round, or all after another run, init or an
        out-of-order round). The mass changes by the D^2 that changed, where fewer than half did.
        Call with `lock` held."""
        run_before, seen, init_before = self.weights_for or (None, 0, None)
        if (run_before, init_before) != (run, init) or seen > len(centroids):
            seen, size = 0, len(self.columns[0])
            self.weights, self.owners = array("d", [math.inf]) * size, array("q", bytes(8 * size))
        box = self.box if len(self.columns) <= 2 and init == "k-means||" else None   # where its rounds lay grids
        changed = update_candidates(self.columns, centroids, seen, self.weights, self.owners, box)
        if not mass:
            self.mass = None   # k-means|| sums its mass by block (block_masses)
        elif changed is None or self.mass is None or 2 * len(changed[1]) > len(self.weights):
            self.mass = exact_terms(self.weights)
        else:   # the old ones out first: the running sum never exceeds the old mass
            dropped, added = changed
            self.mass = exact_terms(itertools.chain(self.mass, map(operator.neg, dropped), added))
        self.weights_for = (run, len(centroids), init)

    def assign(self, centroids, previous=None, keep_buckets=False):
        """Bring the kept assignment to `centroids` (through `previous` first, if given, so that the
        moved points counted are those since the previous iteration); returns the moved count.
        Call with `lock` held."""
        state = self.assignment
        if state is not None and keep_buckets and state.buckets is None:
            state = None   # plain partitions need buckets the combiner did not keep
        moved = len(self.columns[0])
        for target in ([previous] if previous is not None else []) + [centroids]:
            if state is None:
                state = new_assignment(self.columns, target, self.texts if keep_buckets else None, self.squares)
            elif state.centroids != target:
                moved = reassign(state, self.columns, self.texts, target)
            else:
                moved = 0
        self.assignment = state
        return moved if previous is not None else len(self.columns[0])


def map_output(split, reducers, combine):
    """A map task's output from its split's assignment: per partition, the records (key, count, per
    dimension the doubles to sum: the points' coordinates, or with the combiner the exact sum terms)
    and the text of the partition file."""
    state = split.assignment
    if combine:
        records = [(key, count, state.sums[key]) for key, count in enumerate(state.counts) if count]
        parts = partition(records, reducers)
        return parts, [format_combined_partition(part) for part in parts]
    records = [(key, count, state.buckets[key].columns) for key, count in enumerate(state.counts) if count]
    parts = partition(records, reducers)
    return parts, [format_partition([(key, state.buckets[key].texts) for key, _, _ in part]) for part in parts]


# ####################################################################################################
# Files: the input (count, splits, identity), human-readable outputs, atomic writes
# ####################################################################################################


def write_atomic(path, text):
    """Write a whole file or nothing: a temporary file in the same folder, then rename over, so the
    previous file stays whole if anything fails (WriteFailed, naming `path`). The temporary file is
    created 0666 less the umask, like any file the user creates."""
    folder = os.path.dirname(path) or "."
    temporary = os.path.join(folder, f".tmp-{secrets.token_hex(8)}")
    try:
        os.makedirs(folder, exist_ok=True)
        handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as error:
        raise WriteFailed(error.errno, error.strerror, path) from None
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(temporary, path)
    except BaseException as error:
        os.unlink(temporary)
        if isinstance(error, OSError):
            raise WriteFailed(error.errno, error.strerror, path) from None
        raise


def format_point(point):
    """'x,y,...' in repr precision, so a file read back gives the same doubles."""
    return ",".join(map(repr, point))


def format_centroids(centroids):
    """centroids.txt: one centroid per line."""
    return "".join(format_point(c) + "\n" for c in centroids)


def format_partition(groups):
    """A partition file from (key, its points' texts): one 'key<TAB>x,y,...' pair per line, the
    coordinates as the input wrote them (whitespace removed), which parse back to exactly the
    doubles the mapper used."""
    return "".join(f"{key}\t" + f"\n{key}\t".join(texts) + "\n" for key, texts in groups)


def format_combined_partition(records):
    """A combined partition file: 'key<TAB>count<TAB>sum terms per coordinate' (terms joined by +)."""
    return "".join(f"{key}\t{count}\t" + ",".join("+".join(map(repr, t)) or "0.0" for t in sums) + "\n"
                   for key, count, sums in records)


def format_reducer_output(cluster_means):
    """A reducer file: one 'key<TAB>count<TAB>mean' line per cluster."""
    return "".join(f"{key}\t{count}\t{format_point(mean)}\n" for key, count, mean in cluster_means)


def open_text(path):
    """Open an input file for reading; a missing or unreadable file is an InputError."""
    try:
        return open(path, encoding="utf-8", errors="replace")
    except OSError as error:
        raise UnreadableInput(f"cannot read {path}: {error.strerror}") from None


def line_blocks(lines):
    """An open text file as blocks of about 1 MiB of lines, each with the line number of its first line."""
    first = 1
    while block := lines.readlines(BLOCK_BYTES):
        yield first, block
        first += len(block)


def parse_flat(block, first_line, name, dim):
    """The points of a block of lines: (their coordinates in one list, point after point, D, the
    non-blank lines, the largest |coordinate|), validated.

    Fast path, at C speed: the lines joined by commas and split once, where D fields a line means
    D x lines fields with every D-th one ending its line (only a line's last field holds its newline),
    every field through one map(float), their max and min against MAX_COORDINATE (which an overflow
    to infinity fails too), and no 'n' in the text (float() reads NaN and infinity only from words
    with an n). On any problem the block is parsed again line by line, so the error names the line
    and what is wrong with it.
    """
    lines = [line for line in block if not line.isspace()] if any(map(str.isspace, block)) else block
    if not lines:
        return None, dim, lines, 0.0
    if dim is None:
        dim = lines[0].count(",") + 1
    try:
        text = ",".join(lines)
        fields = text.split(",")
        if len(fields) != dim * len(lines) or \
                not all(map(str.endswith, fields[dim - 1:-1:dim], itertools.repeat("\n"))):
            raise ValueError
        values = list(map(float, fields))
        highest, lowest = max(values), min(values)
        if "n" in text or "N" in text or highest > MAX_COORDINATE or lowest < -MAX_COORDINATE:
            raise ValueError
    except ValueError:
        for _ in parse_points(block, name, first_line, dim):
            pass
        raise InputError(f"{name}:{first_line}: unreadable block") from None   # parse_points raised first
    return values, dim, lines, abs(max(highest, -lowest))


def magnitudes_of(values, largest=None):
    """(smallest nonzero, largest) |x| of some finite numbers, as coordinate_range gives them (the
    largest given, if known)."""
    if not values:
        return math.inf, 0.0
    smallest = min(map(abs, values))
    if smallest == 0.0:
        smallest = min(map(abs, filter(None, values)), default=math.inf)
    return smallest, abs(max(max(values), -min(values))) if largest is None else largest


def count_points(path):
    """(points, D) of an input file, without parsing it: non-blank lines are counted at C speed and
    only the first point is parsed, for D. Each mapper checks every line of its split when it first
    reads it (see Sample), so the whole file is still checked, once and in parallel."""
    count, dim = 0, None
    with open_text(path) as lines:
        for first_line, block in line_blocks(lines):
            if dim is None:
                for number, line in enumerate(block, first_line):
                    if not line.isspace():
                        dim = len(parse_point(line, f"{path}:{number}"))
                        break
            count += len(block) - sum(map(str.isspace, block))
    if count == 0:
        raise InputError(f"{path}: no points")
    return count, dim


def read_split(path, start, end, dim, keep_text, pinned):
    """Points [start, end) as D columns (and, if asked, each point's text) and their magnitudes (see
    coordinate_range), parsed and validated, from the very file `pinned` (InputChanged if it is
    another one or changed, before or after the read).

    Blocks before the split are only counted, so memory follows the split, not the file.
    """
    columns, texts = [array("d") for _ in range(dim)], []
    index, smallest, largest = 0, math.inf, 0.0
    with open_text(path) as lines:
        check_unchanged(path, pinned, identity_of(lines.fileno()))
        for first_line, block in line_blocks(lines):
            if index >= end:
                break
            in_block = len(block) - sum(map(str.isspace, block))
            if in_block and index + in_block > start:
                try:
                    values, _, kept, block_largest = parse_flat(block, first_line, path, dim)
                except InputError:   # a bad line, or the file rewritten while we read it
                    check_unchanged(path, pinned, identity_of(lines.fileno()))
                    check_unchanged(path, pinned)
                    raise
                low, high = max(0, start - index), min(in_block, end - index)
                whole = (low, high) == (0, in_block)
                mine = values if whole else values[low * dim:high * dim]
                least, most = magnitudes_of(mine, block_largest if whole else None)
                smallest, largest = min(smallest, least), max(largest, most)
                flat = array("d", mine)   # strided slices of an array are copied at C speed
                for d, column in enumerate(columns):
                    column.extend(flat[d::dim])
                if keep_text:
                    texts.extend("".join(line.split()) for line in kept[low:high])
            index += in_block
        check_unchanged(path, pinned, identity_of(lines.fileno()))   # not rewritten while we read
    if index < end:
        raise UnreadableInput(f"{path}: has {index} points, fewer than {end}")
    return columns, texts if keep_text else None, (smallest, largest)


def read_centroids(path, clusters, dim):
    """An --init file: exactly K points of dimension D."""
    with open_text(path) as lines:
        centroids = [p for _, p in parse_points(lines, path)]
    if len(centroids) != clusters:
        raise InputError(f"{path}: {len(centroids)} centroids, expected K={clusters}")
    if len(centroids[0]) != dim:
        raise InputError(f"{path}: centroids have {len(centroids[0])} coordinates, the input has {dim}")
    return centroids


def input_identity(path):
    """The input's identity, pinned when a job starts: the host (name and boot), size, modification time
    (ns), device, inode and a digest of its first and last IDENTITY_BLOCK bytes (a cheap content check)."""
    try:
        with open(path, "rb") as raw:
            return identity_of(raw.fileno())
    except OSError as error:
        raise UnreadableInput(f"cannot read {path}: {error.strerror}") from None


@functools.cache
def this_host():
    """This machine as an identity names it: host name and boot id (device and inode numbers are only
    comparable on one host, since one boot)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as boot:
            return f"{socket.gethostname()}/{boot.read().strip()}"
    except OSError:
        return socket.gethostname()


def identity_of(descriptor):
    """The identity of an open file (see input_identity)."""
    status = os.fstat(descriptor)
    ends = os.pread(descriptor, IDENTITY_BLOCK, 0) + \
        os.pread(descriptor, IDENTITY_BLOCK, max(0, status.st_size - IDENTITY_BLOCK))
    return {"host": this_host(), "size": status.st_size, "mtime_ns": status.st_mtime_ns, "device": status.st_dev,
            "inode": status.st_ino, "digest": hashlib.blake2b(ends, digest_size=16).hexdigest()}


def same_file(pinned, found):
    """Whether two identities name the very same file (host, device and inode)."""
    return all(found[key] == pinned[key] for key in ("host", "device", "inode"))


def identity_change(pinned, found, keys=None):
    """How a file differs from a pinned identity ('size 120 -> 96'), or None, compared by `keys`: by
    default everything for the same file and its content (size, first and last blocks) for another
    one, such as a copy of the input on another host."""
    if keys is None:
        keys = ("size", "mtime_ns", "digest") if same_file(pinned, found) else ("size", "digest")
    for key in keys:
        if key in found and found[key] != pinned[key]:
            if key == "size":
                return f"size {pinned[key]} -> {found[key]}"
            if key == "mtime_ns":
                when = time.strftime("%H:%M:%S", time.localtime(found[key] / 1e9))
                return f"modified at {when}: touched or rewritten"
            return "content: its first or last 64 KiB differ"
    return None


def check_unchanged(path, local, found=None):
    """InputChanged unless the file at `path` is still the very file `local` (this host's input as
    first read): the same device and inode, size and modification time (and digest, with `found`)."""
    if found is None:
        try:
            status = os.stat(path)
        except OSError:
            return   # gone from this host: reading it fails in its own words
        found = {"host": local["host"], "size": status.st_size, "mtime_ns": status.st_mtime_ns,
                 "device": status.st_dev, "inode": status.st_ino}
    if not same_file(local, found):
        raise InputChanged(f"{path} changed during the job (replaced: another file is at its path)")
    change = identity_change(local, found, ("size", "mtime_ns", "digest"))
    if change:
        raise InputChanged(f"{path} changed during the job ({change})")


# ####################################################################################################
# Wire format: protobuf <-> core, replies with a FAILURE kind, channels and heartbeats
# ####################################################################################################


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


def draw_message(drawn, dim):
    """(priority, index, point) triples as a pb.Draw."""
    return pb.Draw(priorities=[p for p, _, _ in drawn], indices=[i for _, i, _ in drawn],
                   points=pb.Centroids(dim=dim, values=[x for _, _, point in drawn for x in point]))


def weigh_reply(result, oversample, dim):
    """A pb.WeighReply from MapperTasks.weigh_task's result (mass, rest, candidate, counts, picks); a
    k-means|| round's mass is (its parts by block, its mass_bounds)."""
    mass, rest, candidate, counts, picks = result
    masses = ({"block_masses": [pb.BlockMass(block=block, terms=terms) for block, terms in mass[0]],
               "mass_bounds": mass[1]} if oversample else {"mass_terms": mass})
    return pb.WeighReply(**masses, mass_rest=integer_bytes(rest), candidate=candidate, counts=counts,
                         picked=draw_message([pick[:3] for pick in picks], dim),
                         picked_weights=[pick[3] for pick in picks])


def draw_triples(message):
    """A pb.Draw back as (priority, index, point) triples."""
    return list(zip(message.priorities, message.indices, unflatten(message.points))) if message.indices else []


def success():
    """A SUCCESS status."""
    return pb.Status(success=True)


def identity_message(pinned):
    """The input's pinned identity as a pb.InputIdentity."""
    return pb.InputIdentity(**pinned)


def identity_from(message):
    """A pb.InputIdentity back as the dict input_identity gives."""
    return {"host": message.host, "size": message.size, "mtime_ns": message.mtime_ns, "device": message.device,
            "inode": message.inode, "digest": message.digest}


def failure(refused):
    """A FAILURE status from a TaskRefused: its kind (what the master branches on) and its words."""
    return pb.Status(success=False, kind=refused.kind, message=str(refused))


def stale_attempt():
    """Why a worker refuses an attempt of a job it has seen replaced, or of an older iteration."""
    return TaskRefused(pb.STALE_ATTEMPT, "stale attempt: a newer job or iteration ran")


def token_metadata(token):
    """Call metadata carrying the shared token (none when no token is set)."""
    return ((TOKEN_KEY, token),) if token else ()


@dataclass(frozen=True)
class TlsFiles:
    """TLS material, as PEM bytes: a worker's certificate and key, and the CA its clients trust."""

    cert: bytes = None
    key: bytes = None
    ca: bytes = None


def open_channel(address, tls, options=()):
    """One channel to a worker (or a master): TLS, verifying the server against the CA, when a CA is given."""
    options = GRPC_OPTIONS + list(options)
    if tls is not None and tls.ca:
        return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=tls.ca), options=options)
    return grpc.insecure_channel(address, options=options)


def connection_problem(error, tls, peers="the workers"):
    """What to fix when a worker (or the master: `peers`) was reached but cannot be spoken to; None
    when it may just not be listening yet (or any more)."""
    details = error.details() or ""
    if error.code() == grpc.StatusCode.UNAUTHENTICATED:
        return "it refused the token: set the same --token / KMR_TOKEN on master and workers"
    if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith("busy:"):
        return details
    if "WRONG_VERSION_NUMBER" in details:
        return f"it does not speak TLS: start {peers} with --tls-cert/--tls-key, or drop --tls-ca"
    if "CERTIFICATE_VERIFY_FAILED" in details or "Peer name" in details:
        return ("its TLS certificate is not trusted: it must be signed by the CA of --tls-ca and name "
                f"the address used ({details.rsplit(': ', 2)[-2] if ': ' in details else details})")
    if "andshake" in details:
        return f"the TLS handshake failed ({details})"
    if "Socket closed" in details and tls is None:
        return "it closed the connection at once: it probably serves TLS (give --tls-ca)"
    return None


def await_calls(calls, silence, metadata, ping_request):
    """Wait until every call has ended, pinging each call's server meanwhile (heartbeats), and
    cancel the calls of a server that answered no ping for `silence` seconds.

    `calls` maps each call in flight (a gRPC future or response stream) to (its server's stub, its
    name). Pings start once a call has run silence/8 seconds, so quick calls cost none, and go one at
    a time with a deadline of `silence`, each the `ping_request` (it names the job, which keeps the
    job's state on the worker). A worker busy computing still answers: its gRPC threads get the GIL
    between the bytecodes of the computing one. Returns the calls cancelled.
    """
    interval = silence / 8
    ended = threading.Event()
    for call in calls:
        call.add_done_callback(lambda _: ended.set())
    heard = dict.fromkeys(calls, time.monotonic())
    pings, silent = {}, set()
    while running := [call for call in calls if not call.done()]:
        now = time.monotonic()
        for call in running:
            stub, name = calls[call]
            ping = pings.get(call)
            if ping is not None and ping.done():
                del pings[call]
                if ping.code() == grpc.StatusCode.OK:
                    heard[call] = now
                log.debug("<- Ping (heartbeat) %s from %s", "SUCCESS" if ping.code() == grpc.StatusCode.OK
                          else f"FAILURE {ping.code().name}", name)
            if now - heard[call] > silence:
                log.info("%s answered no heartbeat for %g s: its call is cancelled", name, silence)
                call.cancel()
                silent.add(call)
            elif call not in pings and now - heard[call] >= interval:
                log.debug("-> Ping (heartbeat) to %s", name)
                pings[call] = stub.Ping.future(ping_request, timeout=silence, metadata=metadata)
        ended.wait(interval)
        ended.clear()
    return silent


# ####################################################################################################
# Tasks on a worker: what a mapper keeps and does, what a reducer pulls and reduces (no gRPC server)
# ####################################################################################################


@dataclass
class WorkerSettings:
    """How a mapper or reducer behaves; picklable, so the master can hand it to spawned workers."""

    data_dir: str = "Data"
    rpc_timeout: float = RPC_TIMEOUT
    token: str = ""
    input_root: str = "."
    fail_prob: float = 0.0
    fail_seed: int = None
    crashes: dict = field(default_factory=dict)   # phase -> iteration in which to die by SIGKILL
    heartbeat: float = HEARTBEAT   # a mapper that answers no ping for this long while we fetch is lost
    tls: TlsFiles = None
    max_jobs: int = MAX_JOBS       # jobs served at once; past it (or max_bytes held) a new job is refused
    max_bytes: int = None          # memory of parsed splits and map outputs held (None: half the machine's)
    job_expiry: float = JOB_EXPIRY  # a job whose master was silent this long is dropped
    start_delay: float = 0.0       # a drill: seconds a spawned worker waits before it listens (a slow start)

    @classmethod
    def of(cls, flags, **given):
        """Settings from the master's JobOptions or a standalone worker's arguments (the same names),
        with some `given` otherwise."""
        shared = {f.name: getattr(flags, f.name) for f in dataclasses.fields(cls) if hasattr(flags, f.name)}
        return cls(**{**shared, **given})


class FaultInjector:
    """Deliberate faults for tests and demonstrations: FAILURE replies and SIGKILL at a phase."""

    def __init__(self, settings):
        self.probability = settings.fail_prob
        self.rng = random.Random(settings.fail_seed)
        self.crashes = dict(settings.crashes)
        self.lock = threading.Lock()

    def refuse(self, what):
        """Raise TaskRefused (an injected FAILURE) with probability --fail-prob."""
        with self.lock:
            strike = self.probability > 0 and self.rng.random() < self.probability
        if strike:
            log.info("%s: injected FAILURE", what)
            raise TaskRefused(pb.INJECTED, "injected failure")

    def crash_point(self, phase, iteration, context):
        """Die by SIGKILL here ('map', 'reduce') or right after the reply is sent ('after-...')."""
        if self.crashes.get(phase) != iteration:
            return
        log.info("injected crash: SIGKILL %s iteration %d", phase, iteration)
        if phase.startswith("after-"):
            context.add_callback(lambda: os.kill(os.getpid(), signal.SIGKILL))
        else:
            os.kill(os.getpid(), signal.SIGKILL)


class Freshness:
    """Tells a job's current attempt from a stale one: an attempt of an older run, or of an older
    iteration of a task than one already seen, is refused. Other jobs never make one stale."""

    def __init__(self):
        self.newest = {}   # task -> newest (run, iteration) seen
        self.lock = threading.RLock()   # held around "admit, then store", so the two stay together

    def admit(self, run, task, iteration):
        """Record the attempt; False when it is stale."""
        with self.lock:
            if self.newest.get(task, (0, 0)) > (run, iteration):
                return False
            self.newest[task] = (run, iteration)
            return True


@dataclass
class MapTaskOutput:
    """The partitions of one map task, kept in memory for the reducers to fetch."""

    run: int
    iteration: int
    partitions: list   # per partition: list of PartitionChunk
    nbytes: int        # what they take on the wire (and about what they hold)


@dataclass
class JobState:
    """What a worker keeps for one master's job, apart from every other job's."""

    fresh: Freshness = field(default_factory=Freshness)
    splits: dict = field(default_factory=dict)    # mapper: (path, start, end, dim) -> Split, least recently used first
    outputs: dict = field(default_factory=dict)   # mapper: map task -> MapTaskOutput
    results: dict = field(default_factory=dict)   # reducer: partition -> (run, iteration, cluster means, per task)
    heard: float = 0.0                            # when its master was last heard from (time.monotonic)
    local_input: dict = None                      # mapper: this host's input file as first found to match the pin
    lock: threading.Lock = field(default_factory=threading.Lock)

    def held_bytes(self):
        """About how much memory its parsed splits and map outputs take."""
        with self.lock:
            return sum(split.nbytes() for split in self.splits.values()) + \
                sum(output.nbytes for output in self.outputs.values())


class Jobs:
    """The jobs one worker serves at once, each one's state apart, so no job's request is ever stale
    because of another's. Workers share their cores between the jobs. A new job is refused (WorkerBusy)
    once `max_jobs` are served or `max_bytes` are held; a job's state is dropped when its master ends it
    or has been silent for `expiry` seconds (a reaper looks every few seconds), never to make room. An
    ended or expired job is remembered for `expiry` seconds, so a late request of it cannot bring it back."""

    def __init__(self, max_jobs, max_bytes, expiry, clock=time.monotonic):
        if max_bytes is None:
            max_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
        self.max_jobs, self.max_bytes, self.expiry, self.clock = max_jobs, max_bytes, expiry, clock
        self.states = {}   # job id -> JobState
        self.gone = {}     # job id -> when it ended or expired
        self.lock = threading.Lock()

    def state(self, job):
        """The state of a job, a new one for a job new here unless the worker is full (WorkerBusy);
        TaskRefused (ABANDONED) for a job that ended here."""
        with self.lock:
            now = self.clock()
            self.expire(now)
            if job in self.gone:
                raise TaskRefused(pb.ABANDONED, f"job {job} has ended on this worker")
            state = self.states.get(job)
            if state is None:
                self.refuse_if_full()
                state = self.states[job] = JobState()
                log.info("job %s: served here (%s)", job, counted(len(self.states), "job"))
            state.heard = now
            return state

    def refuse_if_full(self):
        """WorkerBusy, saying which bound is reached, if a new job cannot be taken. Call with `lock` held."""
        held = sum(state.held_bytes() for state in self.states.values())
        if len(self.states) >= self.max_jobs:
            why = f"{counted(len(self.states), 'job')} (its --max-jobs)"
        elif held >= self.max_bytes:
            why = f"{held / 2**30:.1f} GiB of splits and map outputs held (its --max-memory)"
        else:
            return
        raise WorkerBusy(f"busy: {why}; try later or add workers")

    def find(self, job):
        """The state of a job served here, or None; its master (or a reducer on its behalf) was heard."""
        with self.lock:
            self.expire(self.clock())
            state = self.states.get(job)
            if state is not None:
                state.heard = self.clock()
            return state

    def end(self, job):
        """Drop a job's state: its master is done."""
        with self.lock:
            self.gone[job] = self.clock()
            if self.states.pop(job, None) is not None:
                log.info("job %s: ended by its master, its state dropped (%s left)", job,
                         counted(len(self.states), "job"))

    def expire(self, now):
        """Drop the state of jobs whose master has been silent too long, and forget jobs gone long ago.
        Call with `lock` held."""
        for job in [job for job, state in self.states.items() if now - state.heard > self.expiry]:
            del self.states[job]
            self.gone[job] = now
            log.info("job %s: its master was silent for %g s, its state dropped", job, self.expiry)
        for job in [job for job, when in self.gone.items() if now - when > self.expiry]:
            del self.gone[job]

    def reap(self, stopped):
        """Expire silent jobs every few seconds until `stopped` is set (a worker's background thread)."""
        while not stopped.wait(min(5.0, self.expiry / 4)):
            with self.lock:
                self.expire(self.clock())


def file_error(error, verb):
    """A FAILURE naming the file a worker could not read or write, and why, in kmr's words."""
    return TaskRefused(pb.FILE_ERROR, f"cannot {verb} {error.filename}: {error.strerror}")


@dataclass
class MapSummary:
    """What a Map task tells the master: enough to check that no point was lost or counted twice."""

    points: int
    moved: int
    partition_points: list   # points in each partition
    sse: tuple               # the split's exact SSE against the centroids it was mapped to (see sse_of_sums)


class MapperTasks:
    """A mapper's tasks apart from gRPC, for every job it serves: parsed splits and their kept
    assignments (Split), and the map outputs reducers fetch. A split's first read checks every line
    of it; every task checks that the input is still the file the job pinned."""

    def __init__(self, settings):
        self.settings = settings
        self.jobs = Jobs(settings.max_jobs, settings.max_bytes, settings.job_expiry)

    def load(self, state, task, span, pinned, dim, keep_text):
        """The split of `span` (path, start, end) in a job's state: parsed on first use, then kept (for
        MAX_SPLITS splits at most: restarts and re-executed tasks reuse them). This host's input must
        match the job's `pinned` identity when first read (the same file unchanged, or a copy with the
        same size and ends), and then stay that very file. TaskRefused when this host cannot read it
        (another mapper may) or the input changed; a bad line is an InputError."""
        path, start, end = span
        key = (path, start, end, dim)
        try:
            if state.local_input is None:   # first read here: this host's file must be the pinned one
                found = input_identity(path)
                change = identity_change(pinned, found)
                if change:
                    raise InputChanged(f"{path} changed during the job ({change})")
                with state.lock:
                    state.local_input = found
            check_unchanged(path, state.local_input)
            with state.lock:
                split = state.splits.pop(key, None)
            if split is None or (keep_text and split.texts is None):
                split = Split(*read_split(path, start, end, dim, keep_text, state.local_input))
        except InputChanged as error:
            log.info("task %d: FAILURE %s", task, error)
            raise TaskRefused(pb.INPUT_CHANGED, str(error)) from None
        except UnreadableInput as error:
            log.info("task %d: FAILURE %s", task, error)
            raise TaskRefused(pb.UNREADABLE_INPUT, str(error)) from None
        except OSError as error:
            log.info("task %d: FAILURE cannot read %s: %s", task, path, error.strerror)
            raise TaskRefused(pb.UNREADABLE_INPUT, f"cannot read {path}: {error.strerror}") from None
        with state.lock:
            state.splits[key] = split
            while len(state.splits) > MAX_SPLITS:
                del state.splits[next(iter(state.splits))]
        return split

    def admit(self, job, run, task, iteration):
        """TaskRefused unless this is the newest attempt of a map task of its job seen here."""
        if not self.jobs.state(job).fresh.admit(run, task, iteration):
            raise stale_attempt()

    def map_task(self, job, run, task, iteration, span, pinned, reducers, combine, centroids, previous, still_wanted):
        """Map, for an admitted attempt: the split brought to `centroids` (from iteration 2 on, counting
        the points moved since `previous`), its partitions packed, written and kept for the reducers; a
        MapSummary. `still_wanted()` turns False once the master no longer waits (a backup won, or it left)."""
        state = self.jobs.state(job)
        split = self.load(state, task, span, pinned, len(centroids[0]), not combine)
        with split.lock:
            moved = split.assign(centroids, previous if iteration > 1 else None, keep_buckets=not combine)
            records, texts = map_output(split, reducers, combine)
            assignment = split.assignment
            # packed now: plain records are the kept buckets, which the next step of this split changes
            chunks = [list(record_chunks(part, len(split.columns), not combine)) for part in records]
            sizes = [sum(count for _, count, _ in part) for part in records]
        if not still_wanted():
            raise TaskRefused(pb.ABANDONED, "cancelled")
        with state.fresh.lock:   # a stale attempt must not overwrite a newer one's files or output
            if not state.fresh.admit(run, task, iteration):
                raise stale_attempt()
            folder = os.path.join(self.settings.data_dir, "Mappers", f"M{task}")
            try:
                for number, text in enumerate(texts, 1):
                    write_atomic(os.path.join(folder, f"partition_{number}.txt"), text)
            except OSError as error:
                raise file_error(error, "write") from None
            nbytes = sum(chunk.ByteSize() for part in chunks for chunk in part)
            with state.lock:
                state.outputs[task] = MapTaskOutput(run, iteration, chunks, nbytes)
        points = len(split.columns[0])
        log.debug("Map task %d: SUCCESS %d points, partitions %s, %d moved (%d examined, %d of them measured "
                  "against other centroids)", task, points, sizes, moved, assignment.examined, assignment.rechecked)
        return MapSummary(points, moved, sizes, assignment.sse)

    def output_of(self, job, run, iteration, task):
        """The kept partitions of a map task's attempt in this job, run and iteration (None if not kept)."""
        state = self.jobs.find(job)
        if state is None:
            return None
        with state.lock:
            output = state.outputs.get(task)
        if output is None or (output.run, output.iteration) != (run, iteration):
            return None
        return output.partitions

    def sample_task(self, job, task, span, pinned, dim, clusters, seeds, plot_points, keep_text):
        """Sample: the split's first read and check, then per seed its K distinct points of lowest
        priority, and for the first seed `plot_points` points to plot; (draws, plot, the first bad
        line's error or "")."""
        path, start, end = span
        try:
            split = self.load(self.jobs.state(job), task, span, pinned, dim, keep_text)
        except InputError as error:   # a bad line: the job cannot run
            return [], [], str(error)
        draws = [lowest_drawn(split.columns, seed, start, clusters) for seed in seeds]
        plot = lowest_drawn(split.columns, seeds[0], start, plot_points, distinct=False) if plot_points else []
        return draws, plot, ""

    def weigh_task(self, job, run, task, span, pinned, centroids, draw_seed, count_clusters, oversample, exact_mass):
        """Weigh: the split's exact D^2 mass against `centroids` and one point drawn in proportion to
        D^2 (a k-means++ round), or with count_clusters its exact SSE and cluster sizes instead. With
        `oversample`, a k-means|| round (oversample_round) instead.
        Returns (mass terms, the exact rest of an SSE (see sse_of_sums), candidate, counts, picks)."""
        split = self.load(self.jobs.state(job), task, span, pinned, len(centroids[0]), False)
        if oversample:
            with split.lock:
                return self.oversample_round(split, run, span[1], centroids, draw_seed, count_clusters, oversample,
                                             exact_mass)
        if count_clusters:
            with split.lock:
                split.assign(centroids)
                return *split.assignment.sse, [], split.assignment.counts, []
        with split.lock:   # a backup copy of this task may weigh the same split
            split.weigh(run, centroids, "k-means++")
            weights, mass = split.weights, split.mass
        if not mass:
            return mass, 0, [], [], []
        index = weighted_index(weights, random.Random(draw_seed).random())
        return mass, 0, [column[index] for column in split.columns], [], []

    @staticmethod
    def oversample_round(split, run, start, candidates, draw_seed, count_clusters, oversample, exact_mass):
        """A k-means|| round on a split: D^2 brought up to date with the candidates it has not seen, then
        ((its mass by block where it has no mass_bounds, those bounds), 0, [], [], the points the round
        may pick (may_be_picked) as (priority, index, point, D^2)). With `exact_mass`, only its mass by
        block (the master is in doubt about a pick); with count_clusters, the points nearest to each
        candidate and no mass (the master does not need it). Call with the split's lock held."""
        split.weigh(run, candidates, "k-means||", mass=False)
        if count_clusters:
            nearest_to = collections.Counter(split.owners)
            return ([], []), 0, [], [nearest_to[number] for number in range(len(candidates))], []
        if exact_mass:
            return (block_masses(split.weights, start), []), 0, [], [], []
        bounds = mass_bounds(split.weights)
        parts = [] if bounds else block_masses(split.weights, start)   # no bounds: the master needs the mass
        picked = round_picks(draw_seed, start, split.weights, bounds[0] if bounds else whole_mass(parts), oversample)
        return (parts, bounds or []), 0, [], [], [(priority, start + i, tuple(column[i] for column in split.columns),
                                                  split.weights[i]) for i, priority in picked]


class ReducerTasks:
    """A reducer's tasks apart from serving them: pull a partition from every map task's mapper
    (heartbeating each), shuffle-sort, reduce, write the reducer file and keep the result."""

    def __init__(self, settings):
        self.settings = settings
        self.jobs = Jobs(settings.max_jobs, settings.max_bytes, settings.job_expiry)
        self.lock = threading.Lock()
        self.channels = {}   # mapper address -> (channel, Mapper stub): one channel each, reused, for every job
        self.fetchers = concurrent.futures.ThreadPoolExecutor(FETCHERS)   # pulls from many mappers at once

    def mapper(self, address):
        """The stub for a mapper, on a channel kept while the mapper is in use (replaced mappers'
        channels are closed once more than MAX_CHANNELS addresses were seen)."""
        with self.lock:
            if address not in self.channels:
                if len(self.channels) >= MAX_CHANNELS:
                    for channel, _ in self.channels.values():
                        channel.close()
                    self.channels.clear()
                channel = open_channel(address, self.settings.tls)
                self.channels[address] = (channel, pb_grpc.MapperStub(channel))
            return self.channels[address][1]

    def fetch(self, output, stream, dim, clusters):
        """All records of this partition from one map task's stream; None if they cannot be had; a
        mapper's refusal (a wrong token, say) is raised."""
        started = time.perf_counter()
        try:
            records = [record for chunk in stream for record in decode_chunk(chunk, dim)]
            if any(not 0 <= key < clusters for key, _, _ in records):
                raise ValueError("cluster id out of range")
        except (grpc.RpcError, ValueError) as error:
            stream.cancel()
            why = error.code().name if isinstance(error, grpc.RpcError) else str(error)
            log.info("<- GetPartition(task %d) FAILURE from %s: %s", output.task, output.address, why)
            if isinstance(error, grpc.RpcError) and error.code().name in REFUSALS:
                raise
            return None
        log.debug("<- GetPartition(task %d) SUCCESS from %s: %d records, %.1f ms", output.task,
                  output.address, len(records), 1000 * (time.perf_counter() - started))
        return records

    def pull_partition(self, job, run, iteration, partition, outputs, dim, clusters, time_remaining):
        """The shuffle's input of a reduce task: its partition of every map output, FETCHERS streams at
        once, each heartbeating its mapper. TaskRefused when the attempt is stale; FetchFailed
        (naming the map tasks) when some map outputs cannot be had, reported while the master still
        waits (`time_remaining`: the call's seconds left, None for no deadline)."""
        if not self.jobs.state(job).fresh.admit(run, partition, iteration):
            raise stale_attempt()
        limit = self.settings.rpc_timeout if time_remaining is None else time_remaining
        deadline = time.monotonic() + min(self.settings.rpc_timeout, 0.6 * limit)
        metadata = token_metadata(self.settings.token)
        fetched = []
        for low in range(0, len(outputs), FETCHERS):
            streams = {}
            for output in outputs[low:low + FETCHERS]:
                log.debug("-> GetPartition(task %d, partition %d) to mapper %s", output.task, partition,
                          output.address)
                stub = self.mapper(output.address)
                request = pb.PartitionRequest(job=job, run=run, iteration=iteration, task=output.task,
                                              partition=partition)
                stream = stub.GetPartition(request, timeout=max(0.05, deadline - time.monotonic()),
                                           metadata=metadata)
                streams[stream] = (stub, f"mapper {output.address}")
            pulls = [self.fetchers.submit(self.fetch, output, stream, dim, clusters)
                     for output, stream in zip(outputs[low:low + FETCHERS], streams)]
            await_calls(streams, self.settings.heartbeat, metadata, pb.PingRequest(job=job))
            fetched += [pull.result() for pull in pulls]
        missing = [output.task for output, records in zip(outputs, fetched) if records is None]
        if missing:
            log.info("Reduce partition %d: FAILURE, map output missing for tasks %s", partition, missing)
            raise FetchFailed(missing)
        return fetched

    def reduce_partition(self, job, run, iteration, partition, fetched, dim):
        """Reduce: shuffle-sort and average a partition's records; the reducer file is written and the
        result kept for GetResult."""
        per_task = [sum(count for _, count, _ in records) for records in fetched]
        cluster_means = [(key, group.count, reduce_cluster(group)) for key, group in shuffle_sort(fetched, dim)]
        state = self.jobs.state(job)
        with state.fresh.lock:   # a stale attempt must not overwrite a newer one's file or result
            if not state.fresh.admit(run, partition, iteration):
                raise stale_attempt()
            try:
                write_atomic(os.path.join(self.settings.data_dir, "Reducers", f"R{partition}.txt"),
                             format_reducer_output(cluster_means))
            except OSError as error:
                raise file_error(error, "write") from None
            with state.lock:
                state.results[partition] = (run, iteration, cluster_means, per_task)
        log.debug("Reduce partition %d: SUCCESS %d clusters, %d points", partition, len(cluster_means),
                  sum(per_task))

    def result(self, job, run, iteration, partition):
        """(cluster means, points from each map task) of a partition's reduce in this job, run and iteration."""
        state = self.jobs.find(job)
        stored = None
        if state is not None:
            with state.lock:
                stored = state.results.get(partition)
        if stored is None or stored[:2] != (run, iteration):
            raise TaskRefused(pb.NO_RESULT, f"no result for partition {partition} iteration {iteration}")
        return stored[2:]


# ####################################################################################################
# gRPC services (thin): check the request, call the worker's tasks, convert the answer
# ####################################################################################################


class TokenCheck:
    """A grpc.ServerInterceptor that refuses every call without the shared token (UNAUTHENTICATED)."""

    def __init__(self, token):
        self.token = token.encode()

    def intercept_service(self, continuation, details):
        """The call's handler if it carries the token, else one that refuses it."""
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


def require(context, condition, message, code="INVALID_ARGUMENT"):
    """Abort the call with the status `code` (its name) unless the request passes a check."""
    if not condition:
        log.info("refused: %s %s", code, message)
        context.abort(grpc.StatusCode[code], message)


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


def input_span(request, root, context):
    """((real path, start, end), pinned identity) of a request's split: a task and job given, the range
    upright, the file below the input root and its identity given."""
    require(context, request.task >= 1 and request.job, "task and job are required")
    require(context, request.start <= request.end, f"inverted range [{request.start}, {request.end})")
    require(context, request.HasField("input"), "the input's identity is required")
    path = resolve_input(request.input_path, root)
    require(context, path is not None, f"{request.input_path} is outside the input root", "PERMISSION_DENIED")
    return (path, request.start, request.end), identity_from(request.input)


def task_rpc(response):
    """An RPC method whose TaskRefused is answered FAILURE with its kind (in the `response` message
    type, by name); a file it cannot read or write is such a FAILURE, in kmr's words; a worker too busy
    for a new job refuses the call (RESOURCE_EXHAUSTED), and so does an InputError (the file is unlike
    what the master checked)."""
    def decorate(method):
        @functools.wraps(method)
        def rpc(self, request, context):
            try:
                return method(self, request, context)
            except TaskRefused as refused:
                return getattr(pb, response)(status=failure(refused))
            except OSError as error:
                error.filename = error.filename or f"a file ({method.__name__})"
                log.info("%s: FAILURE %s: %s", method.__name__, error.filename, error.strerror)
                return getattr(pb, response)(status=failure(file_error(error, "read or write")))
            except WorkerBusy as busy:
                require(context, False, str(busy), "RESOURCE_EXHAUSTED")
            except InputError as error:
                require(context, False, str(error))
        return rpc
    return decorate


def end_job(jobs, request):
    """EndJob: the master is done with a job; its state here goes."""
    jobs.end(request.job)
    return pb.EndJobReply()


@functools.cache
def code_digest():
    """A digest of this kmr.py. A master takes only workers that run the same code: splits measured,
    drawn or summed by two versions would not add up to one job's answer."""
    with open(__file__, "rb") as source:
        return hashlib.sha256(source.read()).hexdigest()[:12]


def heard(jobs, request, role, context):
    """Ping: this worker's role and PID, and how long it keeps a silent job. A ping that names a job
    keeps its state; one that begins a job takes it, or refuses it now if the worker is full."""
    if request.begin and request.job:
        try:
            jobs.state(request.job)
        except WorkerBusy as busy:
            require(context, False, str(busy), "RESOURCE_EXHAUSTED")
        except TaskRefused:
            pass   # a job that ended here: its master is going
    elif request.job:
        jobs.find(request.job)
    return pb.PingReply(role=role, pid=os.getpid(), job_expiry=jobs.expiry, code=code_digest())


class MapperServicer:
    """The Mapper service (kmeans.proto): map tasks, their partitions for reducers, Sample and Weigh."""

    def __init__(self, settings):
        self.core = MapperTasks(settings)
        self.faults = FaultInjector(settings)

    def Ping(self, request, context):
        """This is a mapper, and its PID: what connects and heartbeats ask."""
        return heard(self.core.jobs, request, "mapper", context)

    def EndJob(self, request, context):
        """The master is done with a job: drop its splits and outputs."""
        return end_job(self.core.jobs, request)

    @task_rpc("MapResponse")
    def Map(self, request, context):
        """Map one split to the request's centroids, then partition, write and keep its output."""
        task, iteration = request.task, request.iteration
        log.debug("Map task %d iteration %d attempt %d: points [%d, %d) of %s", task, iteration,
                  request.attempt, request.start, request.end, request.input_path)
        span, pinned = input_span(request, self.core.settings.input_root, context)
        require(context, iteration >= 1, "iterations start at 1")
        require(context, 1 <= request.reducers <= MAX_WORKERS, f"R={request.reducers} out of range")
        require_centroids(context, request.centroids, "centroids")
        previous = None
        if request.HasField("previous"):
            require_centroids(context, request.previous, "previous centroids")
            require(context, request.previous.dim == request.centroids.dim and
                    len(request.previous.values) == len(request.centroids.values), "previous: other shape")
            previous = unflatten(request.previous)
        self.faults.refuse(f"Map task {task}")
        self.core.admit(request.job, request.run, task, iteration)
        self.faults.crash_point("map", iteration, context)
        done = self.core.map_task(request.job, request.run, task, iteration, span, pinned, request.reducers,
                                  request.combine, unflatten(request.centroids), previous, context.is_active)
        self.faults.crash_point("after-map", iteration, context)
        reply = pb.MapReply(points=done.points, moved=done.moved, partition_points=done.partition_points,
                            sse_terms=done.sse[0], sse_rest=integer_bytes(done.sse[1]))
        return pb.MapResponse(status=success(), reply=reply)

    @task_rpc("SampleResponse")
    def Sample(self, request, context):
        """Read and check one split (its first read) and draw its candidates for every run's initial
        centroids (and points to plot)."""
        log.debug("Sample task %d attempt %d: points [%d, %d) of %s", request.task, request.attempt,
                  request.start, request.end, request.input_path)
        span, pinned = input_span(request, self.core.settings.input_root, context)
        require(context, 1 <= request.dim <= MAX_DIM and 1 <= request.clusters <= MAX_CLUSTERS,
                f"dimension {request.dim} or K={request.clusters} out of range")
        require(context, len(request.seeds) <= MAX_RESTARTS, "too many seeds")
        self.faults.refuse(f"Sample task {request.task}")
        draws, plot, input_error = self.core.sample_task(request.job, request.task, span, pinned, request.dim,
                                                         request.clusters, request.seeds, request.plot_points,
                                                         request.keep_text)
        reply = pb.SampleReply(draws=[draw_message(drawn, request.dim) for drawn in draws],
                               plot=draw_message(plot, request.dim), input_error=input_error)
        return pb.SampleResponse(status=success(), reply=reply)

    @task_rpc("WeighResponse")
    def Weigh(self, request, context):
        """Weigh one split against centroids: a k-means++ round, or the final SSE and cluster sizes."""
        log.debug("Weigh task %d attempt %d against %d centroids", request.task, request.attempt,
                  len(request.centroids.values) // max(1, request.centroids.dim))
        span, pinned = input_span(request, self.core.settings.input_root, context)
        require_centroids(context, request.centroids, "centroids")
        self.faults.refuse(f"Weigh task {request.task}")
        require(context, request.oversample <= MAX_CLUSTERS, f"oversample is at most {MAX_CLUSTERS}")
        result = self.core.weigh_task(request.job, request.run, request.task, span, pinned,
                                      unflatten(request.centroids), request.draw_seed, request.count_clusters,
                                      request.oversample, request.exact_mass)
        return pb.WeighResponse(status=success(), reply=weigh_reply(result, request.oversample, request.centroids.dim))

    def GetPartition(self, request, context):
        """Stream one partition of a map task's kept output to a reducer, in bounded chunks."""
        require(context, request.task >= 1 and request.partition >= 1, "task and partition start at 1")
        partitions = self.core.output_of(request.job, request.run, request.iteration, request.task)
        if partitions is None:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"no output of map task {request.task} iteration {request.iteration}")
        require(context, request.partition <= len(partitions), f"no partition {request.partition}")
        yield from partitions[request.partition - 1]


class ReducerServicer:
    """The Reducer service (kmeans.proto): reduce tasks and their results."""

    def __init__(self, settings):
        self.core = ReducerTasks(settings)
        self.faults = FaultInjector(settings)

    def Ping(self, request, context):
        """This is a reducer, and its PID: what connects and heartbeats ask."""
        return heard(self.core.jobs, request, "reducer", context)

    def EndJob(self, request, context):
        """The master is done with a job: drop its results."""
        return end_job(self.core.jobs, request)

    @task_rpc("ReduceResponse")
    def Reduce(self, request, context):
        """Pull one partition from every map task's mapper, shuffle-sort and reduce it, and keep the
        result for GetResult; FAILURE naming the map tasks whose output could not be fetched."""
        partition, iteration = request.partition, request.iteration
        log.debug("Reduce partition %d iteration %d attempt %d from %d map tasks", partition,
                  iteration, request.attempt, len(request.outputs))
        require(context, partition >= 1 and iteration >= 1 and request.job, "partition, iteration, job")
        require(context, 1 <= request.dim <= MAX_DIM and 1 <= request.clusters <= MAX_CLUSTERS,
                f"dimension {request.dim} or K={request.clusters} out of range")
        require(context, 1 <= len(request.outputs) <= 4 * MAX_WORKERS, "number of map outputs out of range")
        require(context, all(output.task >= 1 for output in request.outputs), "map tasks start at 1")
        self.faults.refuse(f"Reduce partition {partition}")
        try:
            fetched = self.core.pull_partition(request.job, request.run, iteration, partition, request.outputs,
                                               request.dim, request.clusters, context.time_remaining())
        except FetchFailed as missing:
            return pb.ReduceResponse(status=failure(missing), reply=pb.ReduceReply(missing_tasks=missing.tasks))
        except grpc.RpcError as error:
            context.abort(error.code(), f"a mapper refused this reducer: {error.details()}")
        self.faults.crash_point("reduce", iteration, context)
        self.core.reduce_partition(request.job, request.run, iteration, partition, fetched, request.dim)
        self.faults.crash_point("after-reduce", iteration, context)
        return pb.ReduceResponse(status=success())

    @task_rpc("ResultResponse")
    def GetResult(self, request, context):
        """The kept result of a partition's reduce in this job and iteration: each cluster's count and
        mean, and how many points came from each map task (the master's accounting)."""
        cluster_means, per_task = self.core.result(request.job, request.run, request.iteration, request.partition)
        reply = pb.ResultReply(clusters=[pb.ClusterMean(key=key, count=count, mean=mean)
                                         for key, count, mean in cluster_means], points_from_task=per_task)
        return pb.ResultResponse(status=success(), reply=reply)


def registration_problem(request, peer):
    """(the address a worker registers, what is wrong with its JoinRequest or None). An address without a
    host (':6001', or a wildcard) is completed with the one it joined from (`peer`, as gRPC names it:
    'ipv4:10.0.0.3:51234')."""
    if request.role not in ("mapper", "reducer"):
        return None, f"role {request.role[:20]!r} is not mapper or reducer"
    if not 0 < request.pid < 2**31:
        return None, f"PID {request.pid} out of range"
    if len(request.host) > 255 or not all(" " <= char <= "~" for char in request.host):
        return None, "the host name is not printable ASCII of at most 255 characters"
    host, _, port = request.address.rpartition(":")
    port = port_number(port)
    if len(request.address) > 300 or port is None:
        return None, f"{request.address[:300]!r} is not HOST:PORT"
    came_from = urllib.parse.unquote(peer.partition(":")[2].rpartition(":")[0])   # gRPC escapes IPv6 brackets
    if came_from.startswith("[::ffff:"):   # an IPv4 peer of a dual-stack server
        came_from = came_from[len("[::ffff:"):-1]
    if host in ("", "0.0.0.0", "[::]"):
        host = came_from
    bare = unbracketed(host)
    if not (0 < len(bare) <= 253 and all(char.isascii() and (char.isalnum() or char in ".-:") for char in bare)) \
            or (":" in bare) != (bare != host):
        return None, f"{host[:300]!r} is not a host name or IP address ([...] around IPv6)"
    if is_loopback(host) and not is_loopback(came_from):
        return None, f"{host} is a loopback address, registered from another host ({came_from})"
    return f"{host}:{port}", None


def port_number(text):
    """A TCP port written in ASCII digits (1..65535) as an int, else None."""
    return int(text) if text.isascii() and text.isdecimal() and 0 < int(text) < 65536 else None


def unbracketed(host):
    """A host without the brackets around an IPv6 address."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_loopback(host):
    """Whether a host (a name or an address, IPv6 in brackets) is this machine's loopback."""
    bare = unbracketed(host)
    if bare == "localhost":
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False


class RegistryServicer:
    """The Registry service (kmeans.proto), on a master with --listen: workers join, beat and leave.
    Refusals are logged to dump.txt only, so a flood of junk does not bury the job's console."""

    def __init__(self, workers):
        self.workers = workers

    def Join(self, request, context):
        """A worker registers: checked, then a lane of the job (see Workers.join)."""
        address, problem = registration_problem(request, context.peer())
        try:
            if problem:
                raise JoinRefused("INVALID_ARGUMENT", problem)
            worker = self.workers.join(request.role, address, request.pid, request.host)
        except JoinRefused as refused:
            log.debug("<- Join FAILURE from %s: %s %s", context.peer(), refused.code, refused)
            context.abort(grpc.StatusCode[refused.code], str(refused))
        log.debug("<- Join SUCCESS from %s: %s", context.peer(), worker.name)
        return pb.JoinReply(member=worker.member, lane=worker.lane, beat=BEAT_SECONDS)

    def Beat(self, request, context):
        """A joined worker is still there (and may ask to leave); whether it is released."""
        try:
            released = self.workers.beat(request.member, request.leaving)
        except JoinRefused as refused:
            log.debug("<- Beat FAILURE from %s: %s", context.peer(), refused)
            context.abort(grpc.StatusCode[refused.code], str(refused))
        log.debug("<- Beat SUCCESS from %s%s", context.peer(), ": released" if released else "")
        return pb.BeatReply(released=released)


def start_registry(listen, token, tls, workers):
    """The master's registration service, started: (server, the port it bound). TLS and the token as on
    every worker; few threads and a bound on calls at once, so a flood of joins is refused, not queued."""
    host, port = listen
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=VERIFY_AT_ONCE + 4),
                         interceptors=[TokenCheck(token)] if token else [],
                         options=GRPC_OPTIONS + [("grpc.so_reuseport", 0)], maximum_concurrent_rpcs=64)
    pb_grpc.add_RegistryServicer_to_server(RegistryServicer(workers), server)
    bound = bind(server, host, port, tls)
    server.start()
    return server, bound


def start_server(role, host, port, settings):
    """A started gRPC server for a mapper or reducer, the port it bound and the threads that run its
    calls."""
    interceptors = [TokenCheck(settings.token)] if settings.token else []
    # so_reuseport off: otherwise a port another process holds looks free
    # threads to spare: a partition stream holds one while flow control blocks it, and pings must get one
    handlers = concurrent.futures.ThreadPoolExecutor(max_workers=64)
    server = grpc.server(handlers, interceptors=interceptors, options=GRPC_OPTIONS + [("grpc.so_reuseport", 0)])
    servicer = MapperServicer(settings) if role == "mapper" else ReducerServicer(settings)
    (pb_grpc.add_MapperServicer_to_server if role == "mapper" else pb_grpc.add_ReducerServicer_to_server)(
        servicer, server)
    # expires silent jobs until the worker leaves
    threading.Thread(target=servicer.core.jobs.reap, args=(threading.Event(),), name="job-reaper", daemon=True).start()
    bound = bind(server, host, port, settings.tls)
    server.start()
    return server, bound, handlers


def bind(server, host, port, tls):
    """Give a server its port (TLS when there is a certificate); the port bound. One that cannot be had
    is an InputError in one line."""
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if tls is not None and tls.cert:
            bound = server.add_secure_port(address, grpc.ssl_server_credentials([(tls.key, tls.cert)]))
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if not bound:
        raise InputError(f"cannot listen on {address}: port in use or address not available")
    return bound


def serve_until_stopped(server, handlers, should_stop, signals=(signal.SIGTERM, signal.SIGINT)):
    """Block until one of the signals arrives (or should_stop()), then stop the server gracefully:
    calls still running after the grace period are cancelled, and their threads finish."""
    stop = threading.Event()
    for signum in signals:
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(0.2):
        if should_stop():
            break
    server.stop(grace=1.0).wait()
    handlers.shutdown(wait=True)
    log.info("stopped")


def exit_status(code):
    """How a process ended, in words: its exit code, or the signal that killed it."""
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}" if code is not None else "it closed its pipe"


def import_main_by_name():
    """Let spawned workers import this script as the module `kmr`, from its cached bytecode:
    multiprocessing imports the main module again in every child, by name if it has a spec, else by
    running its file, which compiles the whole script each time (about 35 ms a worker)."""
    main = sys.modules["__main__"]
    if getattr(main, "__spec__", None) is None and getattr(main, "__file__", None) == __file__:
        spec = importlib.util.find_spec("kmr")
        if spec is not None and spec.origin and os.path.samefile(spec.origin, __file__):
            main.__spec__ = spec


def spawned_worker(role, index, settings, log_path, connection):
    """Entry point of a worker process the master spawns: serve, report the port, obey the master."""
    setup_logging(f"{role} {index}", log_path, console_level=logging.WARNING)
    parent = os.getppid()
    if START_CRASH in settings.crashes:   # the drills: die before listening, or be slow to start
        log.info("injected crash: SIGKILL at start")
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(settings.start_delay)
    try:
        server, port, handlers = start_server(role, "127.0.0.1", 0, settings)
    except InputError as error:
        connection.send(("error", str(error)))
        return
    log.info("%s %d listening on 127.0.0.1:%d", role, index, port)
    connection.send(("ready", port))
    connection.close()
    # SIGINT stays ignored (inherited from spawn): Ctrl-C is the master's to handle; if the master
    # dies, leave too
    serve_until_stopped(server, handlers, lambda: os.getppid() != parent, signals=(signal.SIGTERM,))
    logging.shutdown()
    os._exit(0)   # every call has finished and the log is flushed: skip tearing down the interpreter (~80 ms)


class Membership:
    """A standalone worker's place in a master's job (--join). It registers, asking again while the
    master is not up yet (at most --join-timeout), beats every second, joins again when the master
    forgets it or goes (the next job's master may come), and leaves when asked (the first SIGTERM or
    Ctrl-C): no new task, what runs finishes, and it goes once released or after --leave-timeout."""

    def __init__(self, master, role, address, settings, join_timeout, leave_timeout):
        self.master, self.role, self.address = master, role, address
        self.tls = settings.tls
        # one channel, kept; a master that is not up yet is tried again within a second, not gRPC's backoff
        self.stub = pb_grpc.RegistryStub(open_channel(master, settings.tls, RETRY_SOON))
        self.metadata = token_metadata(settings.token)
        self.join_timeout, self.leave_timeout = join_timeout, leave_timeout
        self.leaving, self.done = threading.Event(), threading.Event()
        self.member = None     # our name in the master's beats, while it knows us
        self.error = None      # why we stopped without being released (one line)

    def serve(self, server, handlers):
        """Serve while a member. The first SIGTERM or Ctrl-C asks to leave; a second leaves at once (the
        master then finds this worker lost). Returns the exit code."""
        signals = []

        def on_signal(signum, frame):
            signals.append(signum)
            if len(signals) == 1:
                self.leaving.set()
            else:
                self.done.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, on_signal)
        threading.Thread(target=self.take_part, name="membership", daemon=True).start()
        while not self.done.wait(0.2):
            pass
        at_once = len(signals) > 1
        server.stop(grace=0 if at_once else 1.0).wait()
        handlers.shutdown(wait=not at_once)
        if at_once:
            raise Terminated() if signals[-1] == signal.SIGTERM else KeyboardInterrupt()
        if self.error:
            raise JobError(self.error)
        log.info("left")
        return 0

    def take_part(self):
        """Join, beat, join again, leave: until released, or the error that ends this worker."""
        try:
            self.rounds()
        except JobError as error:
            self.error = str(error)
        finally:
            self.done.set()

    def rounds(self):
        """One join or beat a second (sooner when asked to leave), until there is no reason to stay."""
        waiting_since = heard = time.monotonic()
        leave_by, why = None, "UNAVAILABLE"
        while not self.done.is_set():
            now = time.monotonic()
            if self.leaving.is_set() and leave_by is None:
                leave_by = now + self.leave_timeout
                log.info("leaving: no new task; going once the master releases this %s (at most %g s)", self.role,
                         self.leave_timeout)
            if leave_by is not None and (self.member is None or now >= leave_by):
                if self.member is not None:
                    log.info("not released in %g s: leaving anyway (the master will find this %s lost)",
                             self.leave_timeout, self.role)
                return
            if self.member is None:
                why = self.join() or why
                if self.member is not None:
                    heard = now
                elif now - waiting_since >= self.join_timeout:
                    raise JobError(f"no master took this {self.role} at {self.master} in {self.join_timeout:g} s "
                                   f"(last: {why}): start the master with --listen, or see --join-timeout")
            else:
                try:
                    released = self.stub.Beat(pb.BeatRequest(member=self.member, leaving=self.leaving.is_set()),
                                              timeout=BEAT_SECONDS * 3, metadata=self.metadata).released
                    log.debug("<- Beat SUCCESS from the master%s", ": released" if released else "")
                    heard = now
                    if released:
                        log.info("released by the master at %s", self.master)
                        return
                except grpc.RpcError as error:
                    log.debug("<- Beat FAILURE from the master: %s", error.code().name)
                    if self.leaving.is_set():
                        log.info("the master at %s does not answer: leaving now", self.master)
                        return
                    if error.code() == grpc.StatusCode.NOT_FOUND or now - heard > 5 * BEAT_SECONDS:
                        log.info("the master at %s %s: joining again (at most %g s)", self.master,
                                 "forgot this worker" if error.code() == grpc.StatusCode.NOT_FOUND else "is gone",
                                 self.join_timeout)
                        self.member, waiting_since = None, now
                        continue
            if self.leaving.is_set():
                time.sleep(BEAT_SECONDS / 4)   # beat sooner while leaving: released sooner
            else:
                self.leaving.wait(BEAT_SECONDS)   # a request to leave is sent at once

    def join(self):
        """Ask the master to take this worker; None once a member, else why not yet (a master that is
        not up, or busy checking others). A refusal that will not change raises JobError."""
        request = pb.JoinRequest(role=self.role, address=self.address, pid=os.getpid(), host=socket.gethostname())
        try:
            reply = self.stub.Join(request, timeout=VERIFY_SECONDS + 5, metadata=self.metadata)
        except grpc.RpcError as error:
            code, details = error.code(), error.details() or ""
            log.debug("<- Join FAILURE from the master: %s %s", code.name, details)
            if problem := connection_problem(error, self.tls, peers="the master"):
                raise JobError(f"cannot join the master at {self.master}: {problem}") from None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                        grpc.StatusCode.RESOURCE_EXHAUSTED):
                return f"{code.name} {details}".strip()
            if code == grpc.StatusCode.UNIMPLEMENTED:
                details = "it is not a master with --listen"
            raise JobError(f"the master at {self.master} refused this {self.role} ({self.address}): {details}") \
                from None
        self.member = reply.member
        log.info("joined the master at %s as %s", self.master, reply.lane)
        return None


# ####################################################################################################
# Workers: spawning, connecting, heartbeats, losing, respawning and reviving (the master's side)
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
    job_expiry: float = JOB_EXPIRY   # how long it keeps a silent job: the keep-alive pings come sooner
    round_trip: float = None   # seconds its last answered ping took
    pid: int = None            # of the process answering now (a respawned worker's new one)
    joined: float = None       # seconds into the job when it joined the master (None: spawned or given)
    member: str = None         # a joined worker's name in its beats
    host: str = ""             # a joined worker's host name, as it registered
    arrived_in: object = None  # the stage under way when it joined: it takes tasks from the next one on
    leaving: bool = False      # a joined worker asked to leave: no new task, released once none needs it
    left: bool = False         # released: gone on purpose, not lost
    calls: int = 0             # attempts running on it (a leaving worker is released only at 0)

    @property
    def lane(self):
        """Its role and index ("mapper 1"): its lane on the timeline and its row on the page."""
        return f"{self.role} {self.index}"

    @property
    def name(self):
        """Its lane and address, as the console names it."""
        return f"{self.lane} ({self.address})"


def unlike(worker, reply):
    """Why a worker's Ping reply shows it is not the worker the master needs (another role, or another
    kmr.py: see code_digest), or None."""
    if reply.role != worker.role:
        return f"{worker.address} is a {reply.role}, not a {worker.role}"
    if reply.code != code_digest():
        return (f"{worker.address} runs another kmr.py (code {reply.code or 'unknown'}, this master's "
                f"{code_digest()}): start the workers from the master's kmr.py")
    return None


def heard_back(worker, sent, ping):
    """Note how long a worker took to answer a ping (the live page shows it)."""
    if ping.code() == grpc.StatusCode.OK:
        worker.round_trip = time.perf_counter() - sent


class Workers:
    """Every mapper and reducer of a job and whether it is alive.

    The master and its scheduler see a small interface: `start`, `live(role)`, `submit`, `call`,
    `answers`, `lose`, `await_live(role)`, `revive` and `stop`. Behind it: spawning (before the master touches gRPC),
    one channel per worker, heartbeats while a call runs (see `await_calls`), killing a lost
    spawned worker by PID and respawning it in its slot in the background, asking lost
    workers we did not spawn again from time to time, and (--listen) workers that join and leave.
    """

    def __init__(self, options, token, log_path, recorder, job):
        self.options = options
        self.job = job   # the job's id: heartbeats name it, and EndJob ends it on workers we did not spawn
        self.token = token
        self.metadata = token_metadata(token)
        self.log_path = log_path
        self.recorder = recorder   # losses and respawns are written there
        self.context = multiprocessing.get_context("spawn")
        import_main_by_name()
        self.pool = {"mapper": [], "reducer": []}
        self.returned = threading.Condition()   # notified when a lost worker answers again
        self.stopping = False   # calls cut short by our own shutdown are no failures worth showing
        self.stopped = threading.Event()   # set once the job is over: the keep-alive pings stop
        self.threads = None     # runs RPCs concurrently, made once the workers are up
        self.lock = threading.Lock()   # joins change the pool while the scheduler reads it
        self.registry = None    # the registration service (--listen), once open
        self.listening = None   # its (host, port)
        self.checking = threading.BoundedSemaphore(VERIFY_AT_ONCE)   # registrations being checked
        self.members = {}       # member name -> joined Worker
        self.joins = 0          # lanes of joined workers so far (bounded by MAX_JOINS)
        self.held = set()       # ids of mappers whose map outputs this iteration's reducers still need

    def submit(self, call, attempt):
        """Run call(attempt) on the master's call threads: its Future. The worker counts the attempt as
        running until it ends (a leaving worker is not released meanwhile); one released since the
        scheduler picked it fails the attempt at once with WorkerLeft."""
        worker = attempt.worker
        with self.lock:
            if worker.left:
                gone = concurrent.futures.Future()
                gone.set_exception(WorkerLeft("it left (released) as the task was given"))
                return gone
            worker.calls += 1
        future = self.threads.submit(call, attempt)
        future.add_done_callback(functools.partial(self.attempt_over, worker))
        return future

    def attempt_over(self, worker, future):
        """An attempt on this worker ended (see submit)."""
        with self.lock:
            worker.calls -= 1

    def every(self):
        """All workers, mappers first."""
        return self.pool["mapper"] + self.pool["reducer"]

    def live(self, role):
        """The live workers of a role that may take a task now: not leaving, and not joined during the
        stage under way (a worker that joins gets tasks from the next stage on)."""
        stage = self.recorder.stage
        return [worker for worker in self.pool[role] if worker.alive and not worker.leaving
                and (worker.arrived_in is None or worker.arrived_in is not stage)]

    def staying(self, role):
        """The live workers of a role that are not leaving (joined during this stage or not)."""
        return [worker for worker in self.pool[role] if worker.alive and not worker.leaving]

    def start(self):
        """Spawn (or connect to) every worker; spawning happens before the master touches gRPC."""
        options = self.options
        given = {"mapper": options.mapper_addrs, "reducer": options.reducer_addrs}
        counts = {"mapper": options.mappers, "reducer": options.reducers}
        for role in ("mapper", "reducer"):
            if given[role] is not None:
                self.pool[role] = [Worker(role, i, address) for i, address in enumerate(given[role], 1)]
            elif role in options.spawn:
                self.pool[role] = [self.spawn(role, i, first=True) for i in range(1, counts[role] + 1)]
        if options.listen:   # after spawning: the master touches gRPC from here on
            self.registry, port = start_registry(options.listen, options.token, options.tls, self)
            self.listening = (options.listen[0], port)
        self.await_ports([worker for worker in self.every() if worker.process is not None])
        # backups too, and every worker that may join
        self.threads = concurrent.futures.ThreadPoolExecutor(2 * (len(self.every()) + 2 * MAX_MEMBERS))
        # all at once (the first problem, in worker order, is the one reported); those that joined meanwhile are
        for connected in [self.threads.submit(self.connect, w) for w in self.every() if w.joined is None]:
            connected.result()
        threading.Thread(target=self.keep_alive, name="keep-alive", daemon=True).start()
        if self.registry is not None:
            self.await_members()

    def keep_alive(self):
        """Ping every live worker, naming the job, every KEEP_ALIVE seconds until the job ends: a worker
        keeps a job's state while its master is heard from, however long it waits for its next task
        (a master that died stops pinging, and the job's state expires after the worker's --job-expiry)."""
        while not self.stopped.wait(min([KEEP_ALIVE] + [worker.job_expiry / 3 for worker in self.every()])):
            pings = []
            for worker in self.every():
                stub = worker.stub
                if worker.alive and stub is not None:
                    try:
                        ping = stub.Ping.future(pb.PingRequest(job=self.job), timeout=KEEP_ALIVE / 2,
                                                metadata=self.metadata)
                    except ValueError:   # its channel was closed meanwhile (lost, or the job ended)
                        continue
                    ping.add_done_callback(functools.partial(heard_back, worker, time.perf_counter()))
                    pings.append((worker, ping))
            for worker, ping in pings:
                log.debug("<- Ping (keep-alive) %s from %s", "SUCCESS" if ping.code() == grpc.StatusCode.OK
                          else f"FAILURE {ping.code().name}", worker.name)

    def spawn(self, role, index, first=False):
        """Start one worker process; it reports its port through a pipe (see await_ports).

        Injected crashes apply to the first process of a slot only, never to its replacement.
        """
        options = self.options
        crashes = {phase: iteration for r, i, phase, iteration in options.crashes
                   if first and (r, i) == (role, index)}
        start_delay = sum(seconds for r, i, seconds in options.slow_starts if first and (r, i) == (role, index))
        settings = WorkerSettings.of(
            options, token=self.token,
            input_root=options.input_root or os.path.dirname(os.path.abspath(options.input_path)),
            fail_seed=None if options.fail_seed is None else options.fail_seed * 1000 + index, crashes=crashes,
            start_delay=start_delay)
        receiver, sender = self.context.Pipe(duplex=False)
        process = self.context.Process(target=spawned_worker, name=f"kmr-{role}-{index}",
                                       args=(role, index, settings, self.log_path, sender), daemon=True)
        on_interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)   # the child starts ignoring Ctrl-C
        try:
            process.start()
        finally:
            signal.signal(signal.SIGINT, on_interrupt)
        sender.close()
        return Worker(role, index, "", process, receiver=receiver)

    def await_ports(self, workers):
        """Wait for spawned workers to listen and take the addresses they report, all at once. Slow is not
        dead: workers whose processes are alive are waited for up to --start-timeout from now, and the
        console says so after a few seconds; one that exited is reported at once, with how it ended."""
        pending = {worker.receiver: worker for worker in workers}
        started, told = time.monotonic(), False
        try:
            while pending:
                for receiver in multiprocessing.connection.wait(list(pending), timeout=0.25):
                    worker = pending.pop(receiver)
                    worker.address = self.port_of(worker)
                waited = time.monotonic() - started
                if pending and (self.stopping or waited >= self.options.start_timeout):
                    worker = next(iter(pending.values()))
                    raise JobError(f"{worker.role} {worker.index} (PID {worker.process.pid}) did not start in "
                                   f"{waited:.0f} s although it is alive (see --start-timeout)")
                if pending and waited >= START_NOTICE and not told:
                    told = True
                    log.info("waiting for %s to start: alive, %.0f s so far", ", ".join(
                        f"{w.role} {w.index} (PID {w.process.pid})" for w in pending.values()), waited,
                        extra={"urgent": True})
        finally:
            for worker in workers:
                worker.receiver.close()

    def port_of(self, worker):
        """The address a spawned worker reported through its pipe (JobError if it could not start)."""
        try:
            state, detail = worker.receiver.recv()
        except EOFError:
            worker.process.join(5.0)
            raise JobError(f"{worker.role} {worker.index} (PID {worker.process.pid}) exited while starting "
                           f"({exit_status(worker.process.exitcode)})") from None
        if state != "ready":
            raise JobError(f"{worker.role} {worker.index} could not start: {detail}")
        log.debug("spawned %s %d, PID %d, at 127.0.0.1:%d", worker.role, worker.index, worker.process.pid, detail)
        return f"127.0.0.1:{detail}"

    def connect(self, worker, patience=CONNECT_SECONDS):
        """Open the worker's channel and wait (bounded) until it answers a Ping. A worker that can be
        reached but not spoken to (a wrong token, TLS on one side only, an untrusted certificate)
        fails at once with what to fix; one not listening yet is asked again for `patience` seconds."""
        worker.channel = open_channel(worker.address, self.options.tls)
        stub_type = pb_grpc.MapperStub if worker.role == "mapper" else pb_grpc.ReducerStub
        worker.stub = stub_type(worker.channel)
        waited = min(self.options.rpc_timeout, patience)
        deadline = time.monotonic() + waited
        while True:
            sent = time.perf_counter()
            try:
                reply = worker.stub.Ping(pb.PingRequest(job=self.job, begin=True),
                                         timeout=max(0.05, min(2.0, deadline - time.monotonic())),
                                         metadata=self.metadata)
                break
            except grpc.RpcError as error:
                problem = connection_problem(error, self.options.tls)
                if problem:
                    raise JobError(f"{worker.name}: {problem}") from None
                if error.code() == grpc.StatusCode.UNIMPLEMENTED:   # it serves, but not this role's service
                    raise JobError(f"{worker.address} is not a {worker.role}") from None
                if time.monotonic() >= deadline or self.stopping:
                    raise JobError(f"no {worker.role} answers at {worker.address} (waited {waited:g} s: "
                                   f"{error.code().name})") from None
                time.sleep(0.1)
        if problem := unlike(worker, reply):
            raise JobError(problem)
        worker.alive = True
        worker.pid, worker.job_expiry = reply.pid, reply.job_expiry or JOB_EXPIRY
        worker.round_trip = time.perf_counter() - sent
        log.debug("%s answers: PID %d", worker.name, reply.pid)

    def answers(self, worker, timeout):
        """Whether a worker answers a Ping within a short deadline, as its role and running this master's
        kmr.py (a process started again at its address with other code is not taken back, and the
        console says why)."""
        log.debug("-> Ping to %s", worker.name)
        try:
            reply = worker.stub.Ping(pb.PingRequest(), timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as error:
            log.debug("<- Ping FAILURE from %s: %s", worker.name, error.code().name)
            return False
        log.debug("<- Ping SUCCESS from %s", worker.name)
        if problem := unlike(worker, reply):
            log.info("%s answers again, but %s: not taken back", worker.name, problem)
            return False
        return True

    def call(self, attempt, method, request, label):
        """One RPC of an attempt, with a deadline and heartbeats, shown as sent and as answered
        (SUCCESS or FAILURE, with the reason) in aligned columns: the assignment's display."""
        worker = attempt.worker
        what = f"{method:<9} {label:<12} attempt {attempt.number:<3}"
        log.log(DETAIL, "  -> %s %-23s%s", what, "sent", worker.name)
        started = time.perf_counter()
        if method == "Map":   # a mapper that mapped in this iteration stays until the reducers have its output
            with self.lock:
                self.held.add(id(worker))
        future = getattr(worker.stub, method).future(request, timeout=self.options.rpc_timeout,
                                                     metadata=self.metadata)
        silent = await_calls({future: (worker.stub, worker.name)}, self.options.heartbeat, self.metadata,
                             pb.PingRequest(job=self.job))
        elapsed = 1000 * (time.perf_counter() - started)
        if silent:
            log.log(DETAIL, "  <- %s FAILURE %9.1f ms   %s: no heartbeat for %g s", what, elapsed, worker.name,
                    self.options.heartbeat)
            raise WorkerLost(f"no heartbeat for {self.options.heartbeat:g} s")
        try:
            response = future.result()
        except grpc.RpcError as error:
            code = error.code()
            log.log(logging.DEBUG if self.stopping else DETAIL, "  <- %s FAILURE %9.1f ms   %s: %s %s",
                    what, elapsed, worker.name, code.name, error.details())
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED and (error.details() or "").startswith("busy:"):
                raise WorkerLost(error.details()) from None   # full with other jobs: this job does without it
            if code.name in REFUSALS:
                raise JobError(f"{worker.name} refused {method} {label}: {code.name}: {error.details()}") from None
            if code.name in LOST:
                raise WorkerLost(code.name) from None
            raise TaskFailed(f"{code.name}: {error.details()}", None) from None
        if not response.status.success:
            log.log(DETAIL, "  <- %s FAILURE %9.1f ms   %s: %s", what, elapsed, worker.name,
                    response.status.message)
            if response.status.kind == pb.INPUT_CHANGED:
                raise JobError(f"{response.status.message}: start it again")
            raise TaskFailed(response.status.message, response.status.kind, response.reply)
        log.log(DETAIL, "  <- %s SUCCESS %9.1f ms   %s", what, elapsed, worker.name)
        return response.reply

    def lose(self, worker, why, process=None):
        """A worker stopped answering: mark it dead and, if this master spawned it, kill it by PID
        and start its replacement, which joins in the background once it answers. `process`: the
        one a failed call went to; a worker replaced since then is not lost again for it."""
        if not worker.alive or (process is not None and process is not worker.process):
            return
        worker.alive = False
        loss = self.recorder.worker_lost(worker, why)
        log.info("%s marked dead (%s)", worker.name, why)
        if worker.process is None:
            worker.next_ping = time.monotonic() + REVIVE_EVERY
            if worker.joined is not None:
                worker.channel.close()   # it comes back by joining again, over a new channel
            return
        worker.channel.close()
        worker.process.kill()     # by PID, ours: also ends a stopped (SIGSTOP) process
        worker.process.join(5)
        fresh = self.spawn(worker.role, worker.index)
        worker.process, worker.receiver = fresh.process, fresh.receiver
        loss["new_pid"] = worker.process.pid
        log.info("replacing %s %d: PID %d starting", worker.role, worker.index, worker.process.pid)
        threading.Thread(target=self.rejoin, args=(worker,), name=f"respawn-{worker.role}-{worker.index}",
                         daemon=True).start()

    def rejoin(self, worker):
        """Wait for a respawned worker to listen and answer, then count it live again."""
        try:
            self.await_ports([worker])
            self.connect(worker)
        except JobError as error:
            if not self.stopping:
                log.info("respawning %s %d failed: %s", worker.role, worker.index, error)
            return
        if self.stopping:   # the job ended meanwhile: stop() has closed the other channels
            worker.channel.close()
            return
        self.recorder.count("respawns")
        log.info("respawned %s %d: PID %d at %s", worker.role, worker.index, worker.process.pid, worker.address)
        with self.returned:
            self.returned.notify_all()

    def revive(self):
        """Give dead workers we did not spawn another chance if they answer again (pinged in
        parallel, each at most every REVIVE_EVERY seconds, so an unreachable host costs little)."""
        now = time.monotonic()
        due = [w for w in self.every() if not w.alive and w.process is None and w.joined is None and w.next_ping <= now]
        if not due:
            return
        for worker, answered in zip(due, self.threads.map(lambda w: self.answers(w, 0.5), due)):
            if answered:
                worker.alive = True
                log.info("%s answers again", worker.name)
            else:
                worker.next_ping = now + REVIVE_EVERY

    def await_live(self, role):
        """With no live worker of a role, wait for a respawn or ask the dead ones we did not spawn,
        for at most CONNECT_SECONDS (with --listen: --join-timeout, for one to join); whether one is live now."""
        patience = self.options.join_timeout if self.registry else min(self.options.rpc_timeout, CONNECT_SECONDS)
        deadline, told = time.monotonic() + patience, False
        while not self.live(role) and time.monotonic() < deadline:
            for worker in self.pool[role]:
                worker.next_ping = 0.0
                worker.arrived_in = None   # none other to wait for: one that joined during this stage works now
            if self.registry and not self.live(role) and not told:
                told = True
                log.info("no live %s: waiting up to %g s for one to join at %s:%d", role, patience, *self.listening,
                         extra={"urgent": True})
            self.revive()
            with self.returned:
                self.returned.wait_for(lambda: self.staying(role), timeout=0.5)
        return bool(self.live(role))

    def await_members(self):
        """Wait until --min-mappers and --min-reducers workers are here (joined, given or spawned), at
        most --join-timeout; the console says how to join meanwhile."""
        options, started = self.options, time.monotonic()
        wanted = options.min_workers

        def enough():
            return all(len(self.staying(role)) >= wanted[role] for role in wanted)

        host, port, tls = *self.listening, " (TLS)" if options.tls is not None else ""
        if enough():
            log.info("workers may join at %s:%d%s", host, port, tls)
        else:
            log.info("waiting for workers to join at %s:%d%s (%s); on each worker host run:\n    python kmr.py --role "
                     "mapper|reducer --join %s:%d%s%s", host, port, tls, ", ".join(
                         f"{len(self.staying(role))} of {wanted[role]} {role}s" for role in wanted),
                     socket.gethostname() if host in ("0.0.0.0", "") else host, port,
                     " --host ADDRESS" if host not in ("127.0.0.1", "localhost") else "",
                     " (with the job's token in $KMR_TOKEN)" if options.token else "", extra={"urgent": True})
        with self.returned:
            if not self.returned.wait_for(lambda: enough() or self.stopping, timeout=options.join_timeout):
                present = "; ".join(f"{len(self.staying(role))} of {wanted[role]} {role}s ("
                                    f"{', '.join(w.name for w in self.staying(role)) or 'none'})" for role in wanted)
                raise JobError(f"not enough workers joined in {time.monotonic() - started:.0f} s (see --join-timeout): "
                               f"{present}")

    def join(self, role, address, pid, host):
        """A worker registers: check that its address answers as that role and process, with our token,
        then give it a lane (a new process: a new lane) and, while the job runs, tasks from the next
        stage on. Returns the Worker; refusals raise JoinRefused."""
        with self.lock:
            for worker in self.every():
                if worker.address == address and worker.alive and worker.joined is None:
                    raise JoinRefused("ALREADY_EXISTS", f"{address} is already {worker.name} of this job")
                if worker.address == address and worker.pid == pid and worker.joined is not None and worker.alive:
                    return worker   # it joins again (it missed our answer): the same lane
            if len(self.staying(role)) >= MAX_MEMBERS or self.joins >= MAX_JOINS:
                raise JoinRefused("RESOURCE_EXHAUSTED", f"this master takes no more workers ({MAX_MEMBERS} {role}s "
                                                        f"at once, {MAX_JOINS} joins in all)")
        if not self.checking.acquire(blocking=False):
            raise JoinRefused("RESOURCE_EXHAUSTED", "too many workers joining at once: try again")
        candidate = Worker(role, 0, address, alive=False)
        try:
            self.connect(candidate, patience=VERIFY_SECONDS)
        except JobError as error:
            if candidate.channel is not None:
                candidate.channel.close()
            raise JoinRefused("FAILED_PRECONDITION", f"the master cannot use {address}: "
                                                     f"{str(error).replace(candidate.name + ': ', '')}") from None
        finally:
            self.checking.release()
        if candidate.pid != pid:
            candidate.channel.close()
            raise JoinRefused("FAILED_PRECONDITION", f"{address} answers as PID {candidate.pid}, not {pid}")
        port = address.rpartition(":")[2]
        twin = next((w for w in self.every() if w.joined is None and w.role == role and w.pid == pid
                     and w.address.rpartition(":")[2] == port), None)
        if twin is not None:   # the same process under another name: never two lanes for one process
            candidate.channel.close()
            raise JoinRefused("ALREADY_EXISTS", f"{address} is {twin.name} of this job already")
        return self.admit(candidate, host)

    def admit(self, worker, host):
        """A checked worker joins: the same process back in its lane, or a new lane; one of ours at that
        address before it is gone (another process answers there now)."""
        with self.lock:
            if self.stopping:   # the job ended while we checked it
                worker.channel.close()
                raise JoinRefused("UNAVAILABLE", "the job has ended")
            earlier = [w for w in self.every() if w.address == worker.address and w.joined is not None]
            back = next((w for w in earlier if w.pid == worker.pid and not w.left), None)
            if back is not None:   # lost (a link down, say) and back: the same process, the same lane
                back.channel.close()
                back.channel, back.stub, back.alive = worker.channel, worker.stub, True
                back.arrived_in = self.recorder.stage
                self.members[back.member] = back
                worker = back
            else:
                self.joins += 1
                worker.index = len(self.pool[worker.role]) + 1
                worker.member, worker.host, worker.joined = secrets.token_hex(8), host, self.recorder.now()
                worker.arrived_in = self.recorder.stage
                self.pool[worker.role].append(worker)
                self.members[worker.member] = worker
        for old in earlier:
            if old is not worker:
                self.lose(old, f"PID {worker.pid} answers at its address now")
        if back is None:
            self.recorder.joined(worker)
        log.info("%s %s: PID %d on %s%s", worker.name, "is back" if back else "joined", worker.pid, host or "?",
                 "; tasks from the next stage on" if self.recorder.stage else "")
        with self.returned:
            self.returned.notify_all()
        return worker

    def beat(self, member, leaving):
        """A joined worker's beat; whether it may go (released). A worker that asks to leave takes no
        new task, and is released once no call runs there and no reducer needs its map outputs."""
        worker = self.members.get(member)
        if worker is None or not (worker.alive or worker.left):
            self.members.pop(member, None)
            raise JoinRefused("NOT_FOUND", "this master does not know that worker (lost, or a new master): join again")
        if leaving and not worker.leaving:
            worker.leaving = True
            log.info("%s asks to leave: no new task for it; released once its calls end and the reducers have "
                     "its map outputs", worker.name)
        return self.release(worker)

    def release(self, worker):
        """Release a member that asked to leave once no call runs there and no reducer needs its map
        outputs (it hears so at its next beat); whether it is released."""
        with self.lock:
            if worker.left:
                return True
            if not (worker.alive and worker.leaving and worker.calls == 0 and id(worker) not in self.held):
                return False   # a lost one is lost, not released
            worker.alive, worker.left = False, True
        if worker.channel is not None:
            worker.channel.close()
        self.recorder.left(worker)
        log.info("%s left (released)", worker.name)
        return True

    def hold_outputs(self, mappers):
        """These mappers hold map outputs the reducers still need: the winners once a map stage is over,
        none once the iteration is reduced (every Map sent holds its mapper until then). A leaving member
        is released only when it holds none: at once, so that it leaves within the iteration it was
        needed for, however soon the job ends."""
        with self.lock:
            self.held = {id(worker) for worker in mappers}
        for worker in list(self.members.values()):
            if worker.leaving:
                self.release(worker)

    def end_job(self):
        """Tell the live workers this master did not spawn that the job is over, so they drop its state
        (each call bounded; one that does not hear it drops the job once its master has been silent
        for its --job-expiry)."""
        calls = []
        for worker in self.every():
            if worker.process is None and worker.alive and worker.stub is not None:
                log.debug("-> EndJob to %s", worker.name)
                calls.append((worker, worker.stub.EndJob.future(pb.EndJobRequest(job=self.job), timeout=END_JOB_SECONDS,
                                                                metadata=self.metadata)))
        for worker, call in calls:
            try:
                call.result()
                log.debug("<- EndJob SUCCESS from %s", worker.name)
            except grpc.RpcError as error:
                log.debug("<- EndJob FAILURE from %s: %s", worker.name, error.code().name)

    def stop(self):
        """Stop every process this master spawned (by PID, SIGTERM then SIGKILL), end the job on the
        workers it did not spawn, close channels."""
        self.stopped.set()
        self.stopping = True
        if self.registry is not None:   # joins and beats end here: joined workers wait for the next master
            self.registry.stop(grace=None).wait(VERIFY_SECONDS + 1)
        spawned = [w.process for w in self.every() if w.process is not None]
        for process in spawned:
            if process.is_alive():
                process.terminate()
        try:
            self.end_job()
        finally:
            for worker in self.every():
                if worker.channel is not None:
                    worker.channel.close()   # cancels calls in flight, so no thread waits for a deadline
            if self.threads is not None:
                self.threads.shutdown(wait=False, cancel_futures=True)
            deadline = time.monotonic() + 3.0
            for process in spawned:
                process.join(max(0.0, deadline - time.monotonic()))
                if process.is_alive():
                    process.kill()
                    process.join()


# ####################################################################################################
# Scheduling: one stage's tasks on a pool of workers (pick, re-assign, budget, backups)
# ####################################################################################################


@dataclass(frozen=True)
class Stage:
    """One pass's tasks of one kind, as the timeline labels them: Sample, Map, Reduce or Weigh, on a
    role's workers; `rerun`: map tasks run again because their output could not be fetched."""

    role: str
    name: str
    iteration: int   # an iteration, or SAMPLE_PASS, SEEDING_PASS, FINAL_PASS
    rerun: bool = False


@dataclass
class Attempt:
    """One try of one task on one worker (a backup copy is an attempt too)."""

    worker: Worker
    task: int
    number: int
    started: float
    backup: bool = False
    process: object = None     # the worker's process when the attempt started (a replaced one is not lost again)
    relocated: bool = False    # another worker ran the task last: this one parses or recounts first
    entry: object = None       # its AttemptEntry in the recorder


@dataclass
class MissingOutput:
    """A reduce attempt's outcome when some map output could not be fetched: those map tasks."""

    tasks: set


@dataclass
class StageRun:
    """One TaskScheduler.run under way: its tasks' state."""

    stage: Stage
    call: object          # call(attempt) -> result; may raise TaskFailed or WorkerLost
    attempts: dict        # task -> tries so far in this iteration (shared with re-runs of the stage)
    pending: list
    results: dict = field(default_factory=dict)    # task -> (worker, result of its first successful copy)
    running: dict = field(default_factory=dict)    # future -> Attempt
    durations: list = field(default_factory=list)  # seconds of each task's first successful copy
    backed_up: set = field(default_factory=set)
    reasons: dict = field(default_factory=lambda: collections.defaultdict(collections.Counter))

    def unfinished(self):
        """Whether a task still waits for a worker or for its first successful copy."""
        return self.pending or any(attempt.task not in self.results for attempt in self.running.values())


def first_done(futures, timeout):
    """The futures done once the first is, or once `timeout` seconds passed."""
    return concurrent.futures.wait(futures, timeout, return_when=concurrent.futures.FIRST_COMPLETED).done


class TaskScheduler:
    """Runs one stage's tasks on the live workers of a pool, mincemeat's way: an explicit state per
    task, re-issued after FAILURE or a lost worker, duplicate results ignored.

    The pool is anything with live(role), await_live(role), lose(worker, why, process) and
    submit(call, attempt) -> Future; the clock is the recorder's and the wait a parameter, so tests
    drive a scheduler with fake workers and fake time. Every attempt and its end go to the recorder.
    """

    def __init__(self, pool, recorder, max_attempts, wait=first_done):
        self.pool, self.recorder, self.max_attempts = pool, recorder, max_attempts
        self.clock, self.wait = recorder.clock, wait
        self.holders = {}      # (role, task) -> the worker that last finished it
        self.leftovers = {}    # future -> Attempt: losers of backup races, still running
        self.beaten = set()    # ids of workers whose last task a backup copy finished first

    def run(self, stage, tasks, attempts, call):
        """Run every task on some live worker of the stage's role; {task: (worker, result)}.

        A task that failed is re-assigned; a worker that went silent is lost. Once no task is waiting,
        a straggler gets a backup copy on an idle worker (MapReduce section 3.6, see `straggler`). The
        first copy to succeed wins; the other is left to finish and ignored, and its worker gets no new
        task until it has. `attempts` counts tries per task for the whole iteration.
        """
        state = StageRun(stage, call, attempts, list(tasks))
        self.recorder.stage = (stage, self.recorder.now())
        while state.unfinished():
            self.settle_leftovers()
            self.assign_idle(state)
            if not state.running:
                self.await_worker(state)
                continue
            for future in self.wait(state.running, BACKUP_MIN_SECONDS / 4):
                self.settle(state, state.running.pop(future), future)
        self.leftovers.update(state.running)   # losers of backup races: they finish (or go silent) on their own
        return state.results

    def assign_idle(self, state):
        """Give every idle worker a pending task, or once none is pending, a straggler's backup copy."""
        busy = {id(attempt.worker) for attempt in [*state.running.values(), *self.leftovers.values()]}
        idle = [worker for worker in self.pool.live(state.stage.role) if id(worker) not in busy]
        for worker in list(idle):
            if state.pending:
                if (task := self.pick(state, worker, idle)) is not None:
                    self.launch(state, worker, task)
                    idle.remove(worker)
                continue
            candidates = [attempt for attempt in state.running.values() if attempt.task not in state.results
                          and attempt.task not in state.backed_up and state.attempts[attempt.task] < self.max_attempts]
            if straggler := self.straggler(candidates, state.durations):
                state.backed_up.add(straggler.task)   # one backup per task, and never past the budget
                copy = self.launch(state, worker, straggler.task, backup=True)
                self.recorder.count("backups")
                log.log(DETAIL, "  %s task %d: backup copy (attempt %d) on %s: attempt %d on %s has run "
                        "%.2f s, the median finished task %.2f s", state.stage.role, straggler.task, copy.number,
                        worker.name, straggler.number, straggler.worker.name, self.clock() - straggler.started,
                        statistics.median(state.durations))

    def launch(self, state, worker, task, backup=False):
        """Start an attempt of a task on a worker, within the attempt budget (else the job ends,
        naming why the task's tries failed)."""
        attempts = state.attempts
        attempts[task] = attempts.get(task, 0) + 1
        if attempts[task] > self.max_attempts:
            why = state.reasons[task] or {"its map output was lost": 1}
            raise JobError(f"{state.stage.role} task {task} failed {self.max_attempts} times: " + "; ".join(
                f"{count} x {reason}" for reason, count in sorted(why.items(), key=lambda r: -r[1])))
        holder = self.holders.get((state.stage.role, task))
        attempt = Attempt(worker, task, attempts[task], self.clock(), backup, worker.process,
                          relocated=holder is not None and holder is not worker)
        attempt.entry = self.recorder.attempt_started(attempt, state.stage)
        future = self.pool.submit(state.call, attempt)
        future.add_done_callback(functools.partial(self.recorder.attempt_ended, attempt.entry))
        state.running[future] = attempt
        return attempt

    def settle(self, state, attempt, future):
        """An attempt's call returned: keep the first result of a task, else put the task back."""
        task, worker, role = attempt.task, attempt.worker, state.stage.role
        try:
            result = future.result()
        except WorkerLeft:
            state.attempts[task] -= 1   # a leave costs no attempt
            log.log(DETAIL, "  %s task %d goes elsewhere: %s left", role, task, worker.name)
        except WorkerLost as error:
            state.reasons[task][f"{worker.name} lost ({error})"] += 1
            log.info("  %s task %d re-assigned: %s did not answer", role, task, worker.name)
            self.pool.lose(worker, str(error), attempt.process)
        except TaskFailed as error:
            state.reasons[task][str(error)] += 1
            self.recorder.count("failures")
            log.log(DETAIL, "  %s task %d re-assigned after FAILURE", role, task)
        else:
            if task not in state.results:
                state.results[task] = (worker, result)
                attempt.entry.won = True
                self.holders[role, task] = worker
                state.durations.append(self.clock() - attempt.started)
                self.race_won(role, attempt, [a for a in state.running.values() if a.task == task])
            return
        if task not in state.results and all(other.task != task for other in state.running.values()):
            state.pending.append(task)

    def await_worker(self, state):
        """Nothing runs: wait for a busy worker to finish a lost backup race, or for a worker to come
        back (a respawn, a revived one); the job ends if none does."""
        role = state.stage.role
        if self.pool.live(role):
            self.wait(self.leftovers, BACKUP_MIN_SECONDS / 4)
        elif not self.pool.await_live(role):
            raise JobError(f"no live {role} left for task {state.pending[0]}")

    def pick(self, state, worker, idle):
        """The pending task to give an idle worker, or None:
        - one it ran last: its split is parsed and its last assignment known, so Map does no extra pass;
        - else one no live worker ran last (the first run of the task, or its worker is gone or leaving),
          or whose worker is busy only finishing a copy that lost a backup race (that may take long);
        - else a share of a busy worker's: a moved task is parsed once where it goes (about one task's
          time more, once), and pays from the next iteration on if it evens the loads, so it moves only
          from a worker with at least two tasks more in this stage (done, running and waiting) than this
          one: the last waiting task of the most loaded (a worker that joined gets its share this way).
        None when every pending task's own worker will take it as soon."""
        role, pending = state.stage.role, state.pending
        holder = {task: self.holders.get((role, task)) for task in pending}
        live, idle_ids = {id(w) for w in self.pool.live(role)}, {id(w) for w in idle}
        working = {id(attempt.worker) for attempt in state.running.values()}   # in this stage, not a lost race
        mine = [task for task in pending if holder[task] is worker]
        orphans = [task for task in pending if id(holder[task]) not in live or
                   id(holder[task]) not in idle_ids | working]
        load = collections.Counter(id(holder[task]) for task in pending)
        load.update(id(done) for done, _ in state.results.values())
        load.update(id(attempt.worker) for attempt in state.running.values())
        shares = [task for task in pending
                  if id(holder[task]) not in idle_ids and load[id(holder[task])] - load[id(worker)] >= 2]
        if mine or orphans:
            task = (mine or orphans)[0]
        elif shares:
            task = max(reversed(shares), key=lambda t: load[id(holder[t])])
        else:
            return None
        pending.remove(task)
        return task

    def race_won(self, role, winner, others):
        """A task's first successful copy: the others lose, and their workers count as beaten."""
        self.beaten.discard(id(winner.worker))
        for other in others:
            self.beaten.add(id(other.worker))
            if winner.backup:
                self.recorder.count("backups won")
            log.log(DETAIL, "  %s task %d: %s copy (attempt %d on %s) finished first; attempt %d on %s is "
                    "ignored", role, winner.task, "the backup" if winner.backup else "the original", winner.number,
                    winner.worker.name, other.number, other.worker.name)

    def settle_leftovers(self):
        """Forget finished losers of backup races; one that went silent meanwhile is lost, and one that
        found the job cannot go on ends it."""
        for future in [f for f in self.leftovers if f.done()]:
            attempt = self.leftovers.pop(future)
            if isinstance(future.exception(), WorkerLost):
                self.pool.lose(attempt.worker, str(future.exception()), attempt.process)
            elif isinstance(future.exception(), JobError):   # it found what ends the job (the input changed)
                raise future.exception()

    def straggler(self, attempts, durations):
        """The running attempt to back up now, if any: the longest-running task with a single copy
        that has run BACKUP_AFTER times the median finished task (twice that if it moved to a worker
        that must first parse the split or recount its last assignment; the median alone if its worker
        was beaten by a backup before), and at least BACKUP_MIN_SECONDS."""
        if not durations:
            return None
        copies = collections.Counter(attempt.task for attempt in attempts)
        now, median = self.clock(), statistics.median(durations)

        def patience(attempt):
            if id(attempt.worker) in self.beaten:
                return median
            return BACKUP_AFTER * median * (2 if attempt.relocated else 1)

        due = [attempt for attempt in attempts if copies[attempt.task] == 1 and
               now - attempt.started >= max(BACKUP_MIN_SECONDS, patience(attempt))]
        return min(due, key=lambda attempt: attempt.started, default=None)


def task_runs(options):
    """How many tasks the job may run at most: M for the Sample pass, and per restart M + R per
    iteration and M per Weigh pass (one per k-means++ round, PARALLEL_ROUNDS + 1 for k-means||, one for the
    final SSE)."""
    seeding = {"k-means++": options.clusters - 1, "k-means||": PARALLEL_ROUNDS + 1}.get(options.init, 0)
    weigh_passes = seeding + 1
    return options.mappers + options.restarts * (options.iterations * (options.mappers + options.reducers)
                                                 + weigh_passes * options.mappers)


def attempt_budget(fail_prob, runs):
    """Tries per task and iteration: BASE_ATTEMPTS, or under a drill where each try fails with
    probability P, the fewest A with runs * P^A < DRILL_RISK.  A task fails for good only after A
    failures in a row, so by the union bound the whole job fails by bad luck with probability
    below DRILL_RISK, while a failure that does not go away still ends the run after A tries."""
    if fail_prob <= 0:
        return BASE_ATTEMPTS
    return max(BASE_ATTEMPTS, math.floor(math.log(DRILL_RISK / runs) / math.log(fail_prob)) + 1)


# ####################################################################################################
# Job record: what the job did (attempts, passes, losses, events), runs and iterations, checkpoints
# ####################################################################################################


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
    init: str = "random"          # random, k-means++, or the path of a file of centroids
    restarts: int = 1
    plot_points: int = 0          # how many input points the master samples for --plot
    tol: float = 0.0
    mapper_addrs: list = None
    reducer_addrs: list = None
    rpc_timeout: float = RPC_TIMEOUT
    heartbeat: float = HEARTBEAT  # a worker holding a task that answers no ping for this long is lost
    tls: TlsFiles = None
    max_attempts: int = None      # None: attempt_budget decides
    combine: bool = False
    token: str = ""
    input_root: str = None        # for spawned mappers; default: the input file's folder
    fail_prob: float = 0.0
    fail_seed: int = None
    crashes: list = field(default_factory=list)   # (role, index, phase, iteration) for spawned workers
    slow_starts: list = field(default_factory=list)   # (role, index, seconds) a spawned worker waits before it listens
    start_timeout: float = START_TIMEOUT   # longest wait for a spawned worker that is alive to listen
    ui: tuple = None              # (host, port) of the live job page, or None
    ui_drills: bool = False       # the page may kill, hang or slow spawned workers
    report: str = None            # where the page is written at the end, as one file
    resume: bool = False          # continue after the last complete iteration of the data dir's checkpoint
    listen: tuple = None          # (host, port) of the registration service workers join, or None
    spawn: tuple = ("mapper", "reducer")   # roles this master spawns when no addresses are given
    min_workers: dict = field(default_factory=lambda: {"mapper": 1, "reducer": 1})   # joined+given+spawned to start
    join_timeout: float = JOIN_TIMEOUT   # longest wait for min_workers


@dataclass
class IterationStats:
    """What one iteration did, for the console, dump.txt and the summary."""

    iteration: int
    shift: float
    moved: int
    sse: float            # of the centroids this iteration started from (what Map measured)
    counts: list          # points per cluster
    seconds: float
    phases: dict          # wall seconds of map, reduce (with collect and re-execution), "compile" (accounting)
    events: dict          # failures, workers lost, respawns, re-executions during the iteration


@dataclass
class AttemptEntry:
    """One attempt as the timeline and the summary show it (times in seconds since the job started)."""

    run: int
    worker: str           # role and index ("mapper 1"): the worker's lane
    address: str
    pid: int
    stage: str            # Sample, Map, Reduce (its fetches, then GetResult) or Weigh
    task: int             # the map task, partition, or split sampled or weighed
    iteration: int        # an iteration, or SAMPLE_PASS, SEEDING_PASS (k-means++ or ||), FINAL_PASS (final SSE)
    attempt: int
    backup: bool
    rerun: bool           # a map task run again because its output could not be fetched
    start: float
    collect: float = None   # a Reduce attempt: when it asked for the result (GetResult)
    ending: tuple = None    # (end, outcome, reason), set in one step by the thread that ran it
    won: bool = False       # its result is the one the master used


class CentroidHistory:
    """Named places in a run's `history` (the centroids before the first and after every iteration)."""

    @property
    def initial(self):
        """The centroids the run started from."""
        return self.history[0]

    @property
    def centroids(self):
        """The latest centroids: where the run ended, or where its next iteration starts."""
        return self.history[-1]

    @property
    def previous(self):
        """The centroids before the last iteration (mappers count the points moved since); None at first."""
        return self.history[-2] if len(self.history) > 1 else None


@dataclass
class RunResult(CentroidHistory):
    """One complete K-means run (one of --restarts)."""

    seed: int
    iterations: list      # IterationStats
    converged: bool
    sse: float            # of the final centroids
    counts: list          # points nearest to each final centroid
    history: list         # the centroids before the first and after every iteration
    events: dict          # failures and recoveries of the whole run, k-means++ and final SSE included


@dataclass
class Progress(CentroidHistory):
    """A run under way: all its next iteration and the reports need (what a checkpoint keeps)."""

    number: int           # which of --restarts, from 1
    seed: int
    history: list         # the centroids before the first and after every iteration so far
    iterations: list = field(default_factory=list)   # IterationStats
    converged: bool = False
    events: dict = field(default_factory=dict)


def restored(kind, saved):
    """A Progress or RunResult read back from a checkpoint: JSON lists back to point tuples."""
    return kind(**{**saved, "history": [[tuple(point) for point in centroids] for centroids in saved["history"]],
                   "iterations": [IterationStats(**stats) for stats in saved["iterations"]]})


@dataclass
class JobResult:
    """A finished job: the best run, every run, and what the plot needs."""

    best: RunResult
    runs: list
    startup_seconds: float
    dim: int
    points: int
    plot_sample: list
    timeline: dict = None   # every attempt, iteration span and lost worker (see Recorder.timeline)
    page: dict = None       # the live page's final data, for --report

    @property
    def centroids(self):
        """The answer: the best run's final centroids."""
        return self.best.centroids


class Recorder:
    """The one place a job's story is written: every attempt and how it ended, when each pass ran,
    every lost worker and the failures and recoveries of the run under way. The console, dump.txt's
    iteration lines, --summary, --timeline and the checkpoint read it; nothing else appends to it.
    Times are seconds since start()."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.origin = None    # clock() when the job started: the timeline's zero
        self.run = 1          # the run under way (the Sample pass counts in run 1)
        self.attempts = []    # AttemptEntry of every attempt, in the order they started
        self.spans = []       # when each pass ran
        self.losses = []      # every worker lost: when, which process, its replacement
        self.events = collections.Counter()   # failures and recoveries of the run under way
        self.lock = threading.Lock()          # workers' threads count and lose too
        # what the live page shows besides: the stage running (and since when), the run under way, the points to plot,
        # a lane per worker process (as it started or joined, and when it left), what an earlier master did, and how
        # the job ended
        self.stage, self.progress, self.plot, self.lanes, self.earlier = None, None, [], [], None
        self.outcome = "running"
        self.seeding = "k-means++"   # what the seeding pass is (--init k-means++ or k-means||), for its labels

    def start(self):
        """The job starts now."""
        self.origin = self.clock()

    def now(self):
        """Seconds since the job started."""
        return self.clock() - self.origin

    def begin_run(self, number, events):
        """Run `number` starts (or resumes) with these failures and recoveries already counted."""
        with self.lock:
            self.run = number
            self.events = collections.Counter(events)

    def counted(self):
        """The failures and recoveries of the run under way so far, as a Counter of its own."""
        with self.lock:
            return collections.Counter(self.events)

    def count(self, event, number=1):
        """A failure or recovery happened: 'failures', 'workers lost', 'respawns', 'backups', ..."""
        with self.lock:
            self.events[event] += number

    def attempt_started(self, attempt, stage):
        """A new attempt of a stage's task; its AttemptEntry."""
        worker = attempt.worker
        entry = AttemptEntry(self.run, worker.lane, worker.address, worker.pid, stage.name,
                             attempt.task, stage.iteration, attempt.number, attempt.backup, stage.rerun,
                             attempt.started - self.origin)
        with self.lock:
            self.attempts.append(entry)
        return entry

    def attempt_ended(self, entry, future):
        """Stamp an attempt's end and outcome, in the thread that ran it, as its call returns: SUCCESS,
        FAILURE (the worker's reason), lost, or stale (the worker had seen a newer job or iteration)."""
        end = self.now()
        error = None if future.cancelled() else future.exception()
        if future.cancelled():
            outcome, reason = "unfinished", "cancelled as the job ended"
        elif isinstance(error, WorkerLeft):
            outcome, reason = "unfinished", str(error)
        elif isinstance(error, WorkerLost):
            outcome, reason = "lost", str(error)
        elif error is not None:
            stale = isinstance(error, TaskFailed) and error.kind == pb.STALE_ATTEMPT
            outcome, reason = "stale" if stale else "FAILURE", str(error)
        elif isinstance(future.result(), MissingOutput):
            outcome, reason = "FAILURE", f"map output missing for tasks {sorted(future.result().tasks)}"
        else:
            outcome, reason = "SUCCESS", ""
        entry.ending = (end, outcome, reason)

    def collected(self, entry):
        """A Reduce attempt asks for its result now (GetResult)."""
        entry.collect = self.now()

    @contextlib.contextmanager
    def span(self, iteration):
        """Note when a pass ran: an iteration, or SAMPLE_PASS, SEEDING_PASS, FINAL_PASS."""
        start = self.now()
        yield
        self.spans.append({"run": self.run, "iteration": iteration, "start": start, "end": self.now(),
                           **self.labelled(iteration)})

    def labelled(self, iteration):
        """{"init": what seeded} for a seeding pass's span or attempt, else nothing."""
        return {"init": self.seeding} if iteration == SEEDING_PASS else {}

    def worker_lost(self, worker, why):
        """A worker is lost now: which process and why. Returns the entry, whose `new_pid` the
        replacement's PID fills in (it stays None for a worker we did not spawn)."""
        loss = {"run": self.run, "worker": worker.lane, "pid": worker.pid, "time": self.now(),
                "reason": why, "new_pid": None}
        with self.lock:
            self.events["workers lost"] += 1
            self.losses.append(loss)
        return loss

    def joined(self, worker):
        """A worker joined the master now: a lane of its own from this moment."""
        with self.lock:
            self.lanes.append({"worker": worker.lane, "address": worker.address, "pid": worker.pid,
                               "joined": round(worker.joined, 6), "left": None})

    def left(self, worker):
        """A joined worker left on purpose now (released): not a loss."""
        with self.lock:
            self.events["workers left"] += 1
            for lane in self.lanes:
                if lane["worker"] == worker.lane:
                    lane["left"] = round(self.now(), 6)

    def timeline(self, workers, earlier, live=False):
        """What the job did when, as JSON-ready lists (the --timeline and the summary's `timeline`):
        a lane per worker process (mappers first; when it joined or left), every attempt, pass and lost
        worker, and what an earlier master did (resumed from its checkpoint: {runs, iterations} done
        there, not recorded here). An attempt
        still running (a copy that lost a backup race) ends with the job, `unfinished`; while the job runs
        (`live`, the job page) it is `running`."""
        now = self.now()
        attempts = []
        for entry in list(self.attempts):
            end, outcome, reason = entry.ending or (now, "running", "") if live else \
                entry.ending or (now, "unfinished", "still running when the job ended")
            if outcome == "SUCCESS" and not entry.won:
                outcome, reason = "ignored", "another copy of the task finished first"
            attempts.append({"run": entry.run, "worker": entry.worker, "address": entry.address,
                             "pid": entry.pid, "stage": entry.stage, "task": entry.task,
                             "iteration": entry.iteration, "attempt": entry.attempt, "backup": entry.backup,
                             "rerun": entry.rerun, "start": round(entry.start, 6),
                             "collect": None if entry.collect is None else round(entry.collect, 6),
                             "end": round(end, 6), "outcome": outcome, "reason": reason,
                             **self.labelled(entry.iteration)})
        spans = [{**span, "start": round(span["start"], 6), "end": round(span["end"], 6)} for span in self.spans]
        losses = [{**loss, "time": round(loss["time"], 6)} for loss in self.losses]
        lanes = sorted(workers, key=lambda lane: (not lane["worker"].startswith("mapper"),
                                                  int(lane["worker"].split()[1])))
        return {"workers": lanes, "attempts": attempts, "iterations": spans, "losses": losses,
                "resumed": earlier, "end": round(now, 6)}


def job_identity(options):
    """What a checkpoint must share with the command that resumes it: whatever decides the answer."""
    init = options.init if options.init in INITS else os.path.abspath(options.init)
    return {"input": os.path.abspath(options.input_path), "M": options.mappers, "R": options.reducers,
            "K": options.clusters, "n": options.iterations, "tol": options.tol, "init": init,
            "restarts": options.restarts, "combiner": options.combine}


class Checkpoint:
    """Data/checkpoint.json: the job's identity, its input's pinned identity, the seed, the runs done and the one
    under way. --resume continues from it, and refuses one of another command or a changed input."""

    def __init__(self, data_dir, identity, pinned, input_name):
        self.data_dir, self.input_name = data_dir, input_name
        self.path = os.path.join(data_dir, CHECKPOINT)
        self.identity, self.pinned = identity, pinned

    def save(self, seed, finished, progress):
        """Write the checkpoint (atomically): the runs done (RunResults) and the one under way (Progress)."""
        state = {"kmr checkpoint": CHECKPOINT_VERSION, "job": self.identity, "input file": self.pinned, "seed": seed,
                 "runs": [dataclasses.asdict(run) for run in finished],
                 "current": None if progress is None else dataclasses.asdict(progress)}
        write_atomic(self.path, json.dumps(state) + "\n")

    def remove(self):
        """Forget an earlier job's checkpoint: this job starts from scratch."""
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)

    def restore(self, seed):
        """(seed, runs done, the run under way or None) to continue from, after checking that the
        checkpoint belongs to this command (and `seed`, if one was given) and input."""
        where = self.path
        try:
            with open(where, encoding="utf-8") as saved_file:
                saved = json.load(saved_file)
            version = saved.get("kmr checkpoint")
        except FileNotFoundError:
            raise InputError(f"--resume: there is no checkpoint in {self.data_dir} (no run of "
                             f"this job got past its start there): run without --resume") from None
        except (OSError, ValueError, AttributeError):
            raise InputError(f"--resume: {where} is not a kmr checkpoint") from None
        if version != CHECKPOINT_VERSION:
            raise InputError(f"--resume: {where} is not a kmr checkpoint" if not isinstance(version, int) else
                             f"--resume: {where} was written by another version of kmr: run without --resume")
        for key, value in self.identity.items():
            if saved["job"].get(key) != value:
                raise InputError(f"--resume: {where} is of another job ({key} {saved['job'].get(key)} "
                                 f"there, {value} here): run without --resume or with the same flags")
        if seed is not None and seed != saved["seed"]:
            raise InputError(f"--resume: {where} is of another job (seed {saved['seed']} there, {seed} here)")
        try:
            change = identity_change(saved["input file"], self.pinned, ("size", "mtime_ns", "digest"))
        except (KeyError, TypeError):
            raise InputError(f"--resume: {where} is not a kmr checkpoint") from None
        if change:
            raise InputError(f"--resume: {self.input_name} changed since {where} was written ({change}): "
                             "run without --resume")
        try:
            current = saved["current"] and restored(Progress, saved["current"])
            return saved["seed"], [restored(RunResult, run) for run in saved["runs"]], current
        except (KeyError, TypeError, ValueError):
            raise InputError(f"--resume: {where} is not a kmr checkpoint") from None


# ####################################################################################################
# Master: prepare -> start workers -> sample -> each run -> the best -> write
# ####################################################################################################


@dataclass(frozen=True)
class Plan:
    """What the master decides before any worker starts, fixed for the whole job."""

    input_path: str         # absolute: what every task request names
    points: int
    dim: int
    ranges: tuple           # [start, end) of each map task
    seeds: tuple            # one per run
    given_init: list        # the centroids of --init FILE, else None
    pinned: dict            # the input's identity (input_identity) when the job started: every task checks it
    checkpoint: Checkpoint


def prepare(options):
    """(the Plan, the runs done, the run under way or None): the input counted (not parsed: the mappers
    check it), the seeds decided, --init and --resume read. Every input error found without reading the
    points is raised here."""
    pinned = input_identity(options.input_path)   # before the count: a later change is found by every task
    checkpoint = Checkpoint(options.data_dir, job_identity(options), pinned, options.input_path)
    seed, done, current = options.seed, [], None
    if options.resume:
        seed, done, current = checkpoint.restore(options.seed)
    if seed is None:
        seed = secrets.randbelow(2**32)
    derive = random.Random(seed)
    seeds = (seed, *(derive.randrange(2**32) for _ in range(1, options.restarts)))
    points, dim = count_points(options.input_path)
    if dim > MAX_DIM or options.clusters * dim * 8 > MAX_MESSAGE_BYTES // 4:
        raise InputError(f"K={options.clusters} centroids of dimension {dim} are too many to send "
                         f"(limits: D <= {MAX_DIM}, K x D x 8 bytes <= {MAX_MESSAGE_BYTES // 4})")
    given_init = None
    if options.init not in INITS:
        given_init = read_centroids(options.init, options.clusters, dim)
    plan = Plan(os.path.abspath(options.input_path), points, dim, tuple(split_ranges(points, options.mappers)),
                seeds, given_init, pinned, checkpoint)
    return plan, done, current


def merge_samples(replies, options):
    """The Sample pass's replies (in split order) merged: per run its K distinct initial points, and the
    points to plot in input order. The input's first bad line, or a K above its distinct points, is an
    InputError."""
    bad = [reply.input_error for reply in replies if reply.input_error]
    if bad:
        raise InputError(bad[0])   # the first split's first bad line: the file's first
    draws = [[point for _, _, point in merge_draws([draw_triples(reply.draws[number]) for reply in replies],
                                                     options.clusters)] for number in range(options.restarts)]
    if len(draws[0]) < options.clusters:
        raise InputError(f"K={options.clusters} is larger than the number of distinct points "
                         f"({len(draws[0])}) in {options.input_path}")
    plotted = merge_draws([draw_triples(reply.plot) for reply in replies], options.plot_points, distinct=False)
    return draws, [point for _, _, point in sorted(plotted, key=lambda drawn: drawn[1])]


def account_for_points(iteration, plan, clusters, reducers, map_replies, results):
    """Check that the reducers together counted every input point exactly once, against what each
    map task mapped and sent to each partition, and gather their means: (means by cluster, cluster
    sizes). A JobError names every discrepancy."""
    problems = []
    for task, (start, end) in enumerate(plan.ranges, 1):
        if map_replies[task].points != end - start:
            problems.append(f"map task {task} mapped {map_replies[task].points} of {end - start} points")
    means, sizes, counted = {}, [0] * clusters, 0
    task_order = sorted(map_replies)
    for partition, result in sorted(results.items()):
        for task, received in zip(task_order, result.points_from_task):
            sent = map_replies[task].partition_points[partition - 1]
            if received != sent:
                problems.append(f"reducer {partition} got {received} of {sent} points of map task {task}")
        for cluster in result.clusters:
            if not 0 <= cluster.key < clusters or cluster.key in means or \
                    partition_of(cluster.key, reducers) != partition - 1:
                problems.append(f"cluster {cluster.key} reported by reducer {partition}")
                continue
            means[cluster.key] = tuple(cluster.mean)
            sizes[cluster.key] = cluster.count
            counted += cluster.count
    if counted != plan.points:
        problems.append(f"reducers counted {counted} points, the input has {plan.points}")
    if problems:
        raise JobError(f"iteration {iteration}: points lost or counted twice: {'; '.join(problems)}")
    log.log(DETAIL, "iteration %d: all %d points accounted for exactly once (%d map tasks x %d partitions)",
            iteration, plan.points, len(map_replies), len(results))
    return means, sizes


def announce(options, plan, job_base, max_attempts):
    """The job's parameters, its attempt budget and its map task ranges, on the console."""
    log.info("job %s: %s, M=%d R=%d K=%d n=%d tol=%g init=%s seed=%d restarts=%d", job_base, options.input_path,
             options.mappers, options.reducers, options.clusters, options.iterations, options.tol, options.init,
             plan.seeds[0], options.restarts)
    if options.fail_prob or options.max_attempts:
        log.info("up to %d tries per task%s", max_attempts, "" if options.max_attempts else
                 f" (--fail-prob {options.fail_prob:g}: {task_runs(options)} task runs at most, "
                 f"chance of failing by bad luck < {DRILL_RISK:g})")
    log.info("%d points of dimension %d; map task ranges %s", plan.points, plan.dim, list(plan.ranges))


def kmeans_plus_plus(first, clusters, weigh, rng):
    """k-means++ without moving points: each round every mapper reports its split's D^2 mass and a
    candidate drawn in proportion to D^2 within it (`weigh(chosen)` -> {task: WeighReply}); picking a
    split in proportion to the masses and taking its candidate is an exact D^2 draw over all points."""
    chosen = [first]
    while len(chosen) < clusters:
        log.log(DETAIL, "=== k-means++ round %d: weigh every split ===", len(chosen) + 1)
        replies = weigh(chosen)
        masses = [(task, math.fsum(reply.mass_terms)) for task, reply in replies.items()]
        if not any(mass for _, mass in masses):
            raise JobError("k-means++: every point is at squared distance 0 from the chosen centroids "
                           "(coordinates too close to tell apart); use --init random")
        task = masses[weighted_index([mass for _, mass in masses], rng.random())][0]
        chosen.append(tuple(replies[task].candidate))
        log.info("k-means++ round %d: centroid from split %d: %s", len(chosen), task, format_point(chosen[-1]))
    return chosen


def kmeans_parallel(first, clusters, weigh, rng):
    """k-means|| (Bahmani et al., VLDB 2012) in PARALLEL_ROUNDS + 1 Weigh passes instead of K - 1: each
    round every mapper brings its points' D^2 up to date with the new candidates and picks each point
    with probability min(1, l D^2 / mass), by a priority of the point's index, so any M picks the same
    (`weigh(candidates, round seed, l, count, exact tasks)` -> {task: WeighReply}). The mass is
    whole_mass's, but the splits' mass_bounds decide every pick not within their width of the edge;
    only such a pick, or a split without bounds, makes the master ask for the mass by block. A last
    pass weighs every candidate by the points nearest to it, and the master reclusters the weighted
    candidates."""
    oversample = -(-clusters // OVERSAMPLE_DIVISOR)
    candidates = [first]
    log.info("k-means||: oversampling factor l = %d (K/%d), %d rounds", oversample, OVERSAMPLE_DIVISOR,
             PARALLEL_ROUNDS)
    for number in range(1, PARALLEL_ROUNDS + 1):
        log.log(DETAIL, "=== k-means|| round %d: weigh every split ===", number)
        seed = rng.randrange(2**63)
        replies = weigh(candidates, seed, oversample, False)
        offered = [(priority, index, point, weight) for reply in replies.values()
                   for (priority, index, point), weight in zip(draw_triples(reply.picked), reply.picked_weights)]
        bounds = mass_between([reply.mass_bounds for reply in replies.values()])
        if bounds is None or any(priority * bounds[0] < oversample * weight <= priority * bounds[1]
                                 for priority, _, _, weight in offered):   # a pick the bounds do not decide
            missing = [task for task, reply in replies.items() if not reply.block_masses]
            if missing:
                log.log(DETAIL, "=== k-means|| round %d: the mass by block, for picks in doubt ===", number)
                replies.update(weigh(candidates, seed, oversample, False, missing))
            mass = whole_mass((part.block, part.terms) for reply in replies.values() for part in reply.block_masses)
            bounds = (mass, mass)
        low, high = bounds
        picked = sorted((index, point) for priority, index, point, weight in offered
                        if priority * high < oversample * weight)
        known = set(candidates)
        new = list(dict.fromkeys(point for _, point in picked if point not in known))
        candidates += new
        log.info("k-means|| round %d: %d new candidates, %d in all (D^2 mass %.8g)", number, len(new),
                 len(candidates), (low + high) / 2)
        if not high:
            break
    log.log(DETAIL, "=== k-means||: weigh every candidate ===")
    replies = weigh(candidates, 0, oversample, True)
    weights = [sum(counts) for counts in zip(*(reply.counts for reply in replies.values()))]
    return recluster(candidates, weights, clusters, rng)


class Master:
    """Owns the workers and runs the job, one named stage at a time. The Plan is made when the master
    is, so every stage works from the start; what happens is written in the job record."""

    def __init__(self, options):
        self.options = options
        self.recorder = Recorder()
        self.recorder.start()
        if options.init == "k-means||":
            self.recorder.seeding = options.init
        self.plan, self.runs, self.resumed_run = prepare(options)   # runs done, and one under way: --resume
        self.job_id = f"{os.getpid()}-{secrets.token_hex(4)}"
        # workers this master spawns always require a token: a fresh one per run unless --token is set
        self.workers = Workers(options, options.token or secrets.token_hex(16),
                               os.path.join(options.data_dir, "dump.txt"), self.recorder, self.job_id)
        self.scheduler = TaskScheduler(self.workers, self.recorder,
                                       options.max_attempts or attempt_budget(options.fail_prob, task_runs(options)))

    def run(self):
        """The job: start the workers, sample, each run, the best; returns a JobResult."""
        announce(self.options, self.plan, self.job_id, self.scheduler.max_attempts)
        startup = self.start_workers()
        samples, plot_sample = self.sample()
        self.recorder.plot = plot_sample
        sampling_events = dict(self.recorder.counted())   # failures of the Sample pass count in run 1
        earlier = self.recorder.earlier = self.resume_or_start_clean()
        for number, (seed, sample) in enumerate(zip(self.plan.seeds, samples), 1):
            if number > len(self.runs):
                resumed = self.resumed_run
                progress = resumed if resumed and resumed.number == number else None
                self.runs.append(self.run_once(number, seed, sample, progress, sampling_events))
        best = min(self.runs, key=lambda run: run.sse)   # the first of equals
        if self.options.restarts > 1:
            log.info("best: run %d (seed %d), SSE %.10g", self.runs.index(best) + 1, best.seed, best.sse)
        self.write_centroids(best.centroids)
        return JobResult(best, self.runs, startup, self.plan.dim, self.plan.points, plot_sample,
                         self.recorder.timeline(self.recorder.lanes, earlier))

    def start_workers(self):
        """Spawn, connect or await every worker (a lane each, before those that joined); the seconds it took."""
        started = time.perf_counter()
        self.workers.start()
        startup = time.perf_counter() - started
        log.info("workers ready in %.3f s", startup)
        self.recorder.lanes[:0] = [{"worker": w.lane, "address": w.address, "pid": w.pid, "joined": None, "left": None}
                                   for w in self.workers.every() if w.joined is None]
        return startup

    def sample(self):
        """The first read of every split (each mapper parses and checks its own, in parallel) and
        each run's K distinct initial points drawn uniformly over the input's lines: per seed, the
        K distinct points of lowest random priority. Returns (draws per seed, points to plot)."""
        options, plan = self.options, self.plan
        log.log(DETAIL, "=== read and check the input: one Sample per split ===")

        def send(attempt):
            start, end = plan.ranges[attempt.task - 1]
            request = pb.SampleRequest(job=self.job_id, task=attempt.task, attempt=attempt.number,
                                       input_path=plan.input_path, start=start, end=end,
                                       input=identity_message(plan.pinned), dim=plan.dim, clusters=options.clusters,
                                       seeds=plan.seeds, plot_points=options.plot_points, keep_text=not options.combine)
            return self.workers.call(attempt, "Sample", request, f"task {attempt.task}")

        with self.recorder.span(SAMPLE_PASS):
            done = self.scheduler.run(Stage("mapper", "Sample", SAMPLE_PASS), range(1, options.mappers + 1), {}, send)
        return merge_samples([reply for _, (_, reply) in sorted(done.items())], options)

    def resume_or_start_clean(self):
        """Show the console's held lines (the input is checked); then either say where --resume goes
        on, or remove an earlier job's files, which would pass for this one's. Returns what an earlier
        master did, for the timeline (None when starting clean)."""
        release_console()
        if not self.options.resume:
            for stale in ("Mappers", "Reducers"):
                shutil.rmtree(os.path.join(self.options.data_dir, stale), ignore_errors=True)
            self.plan.checkpoint.remove()
            return None
        current = self.resumed_run
        log.info("resumed from %s: %d of %d runs done%s", self.plan.checkpoint.path, len(self.runs),
                 self.options.restarts, f"; run {current.number} continues after iteration "
                 f"{len(current.iterations)}" if current else "")
        return {"runs": len(self.runs), "iterations": len(current.iterations) if current else 0}

    def run_once(self, number, seed, sample, progress, sampling_events):
        """One complete K-means run from the initial centroids of this seed, or from where a
        checkpoint left it (`progress`); a checkpoint is written after every iteration."""
        options, rng = self.options, random.Random(seed)
        if progress is None:
            self.recorder.begin_run(number, sampling_events if number == 1 else {})
            if self.plan.given_init is not None:
                initial = self.plan.given_init
            elif options.init == "k-means++":
                with self.recorder.span(SEEDING_PASS):
                    initial = kmeans_plus_plus(sample[0], options.clusters, lambda chosen: self.weigh(chosen, rng), rng)
            elif options.init == "k-means||":
                with self.recorder.span(SEEDING_PASS):
                    initial = topped_up(kmeans_parallel(sample[0], options.clusters, self.oversample_pass, rng), sample,
                                        options.clusters)
            else:
                initial = sample
            progress = Progress(number, seed, [initial], events=dict(self.recorder.counted()))
            self.plan.checkpoint.save(self.plan.seeds[0], self.runs, progress)
        else:
            self.recorder.begin_run(number, progress.events)
        self.recorder.progress = progress
        log.info("initial centroids (%s, seed %d): %s", options.init, seed,
                 "  ".join(map(format_point, progress.initial)))
        if progress.iterations:
            log.info("resuming run %d after iteration %d: centroids %s", number, len(progress.iterations),
                     "  ".join(map(format_point, progress.centroids)))
        while not progress.converged and len(progress.iterations) < options.iterations:
            self.step(progress)
        sse, sizes = self.final_clusters(progress, rng)
        run = RunResult(seed, progress.iterations, progress.converged, sse, sizes, progress.history,
                        dict(self.recorder.counted()))
        self.plan.checkpoint.save(self.plan.seeds[0], self.runs + [run], None)
        if options.restarts > 1:
            log.info("run %d of %d: seed %d, %d iterations, SSE %.10g", number, options.restarts, seed,
                     len(run.iterations), run.sse)
        return run

    def step(self, progress):
        """One iteration of a run, then its centroids.txt, checkpoint and console lines."""
        iteration = len(progress.iterations) + 1
        started = time.perf_counter()
        before = self.recorder.counted()
        log.log(DETAIL, "=== iteration %d ===", iteration)
        with self.recorder.span(iteration):
            new, moved, sse, sizes, phases = self.iterate(iteration, progress.centroids, progress.previous)
        shift = largest_shift(progress.centroids, new)
        progress.history.append(new)
        self.write_centroids(new)
        seconds = time.perf_counter() - started
        phases["compile"] += seconds - sum(phases.values())   # writing centroids.txt is accounting too
        stats = IterationStats(iteration, shift, moved, sse, sizes, seconds, phases,
                               dict(self.recorder.counted() - before))
        progress.iterations.append(stats)
        progress.converged = shift <= self.options.tol
        progress.events = dict(self.recorder.counted())
        self.plan.checkpoint.save(self.plan.seeds[0], self.runs, progress)
        log.log(DETAIL, "iteration %d: centroids %s", iteration, "  ".join(map(format_point, new)))
        log.info("iteration %3d   shift %-11.6g moved %-9d SSE %-17.10g %7.3f s%s", iteration, shift, moved, sse,
                 seconds, "".join(f"   {what} {count}" for what, count in sorted(stats.events.items())))
        if progress.converged:
            log.info("converged after %d iterations (largest shift %g <= tol %g)", iteration, shift,
                     self.options.tol)

    def iterate(self, iteration, centroids, previous):
        """One MapReduce round: map, shuffle + reduce (map tasks whose output was lost run again),
        then account for every point. Returns (new centroids, moved points, SSE, cluster sizes,
        {phase: wall seconds})."""
        self.workers.revive()
        map_attempts, reduce_attempts = {}, {}
        started = time.perf_counter()
        map_results = self.map_stage(iteration, range(1, self.options.mappers + 1), centroids, previous, map_attempts)
        mapped = time.perf_counter()
        results, pending = {}, list(range(1, self.options.reducers + 1))
        self.workers.hold_outputs(worker for worker, _ in map_results.values())
        while pending:
            finished, lost = self.reduce_stage(iteration, pending, map_results, reduce_attempts)
            results.update(finished)
            pending = [p for p in pending if p not in results]
            if lost:
                for worker in {id(map_results[t][0]): map_results[t][0] for t in lost}.values():
                    if worker.alive and not self.workers.answers(worker, self.options.heartbeat / 4):
                        self.workers.lose(worker, "its map output could not be fetched")
                log.info("iteration %d: re-executing map tasks %s (output lost)", iteration, sorted(lost))
                self.recorder.count("re-executions", len(lost))
                map_results.update(self.map_stage(iteration, sorted(lost), centroids, previous, map_attempts,
                                                  rerun=True))
                self.workers.hold_outputs(worker for worker, _ in map_results.values())
        self.workers.hold_outputs(())   # the reducers have every map output: leaving mappers may go
        reduced = time.perf_counter()
        replies = {task: reply for task, (_, reply) in map_results.items()}
        means, sizes = account_for_points(iteration, self.plan, len(centroids), self.options.reducers, replies,
                                          results)
        moved = sum(reply.moved for reply in replies.values())
        sse = exact_total((reply.sse_terms, bytes_integer(reply.sse_rest)) for reply in replies.values())
        phases = {"map": mapped - started, "reduce": reduced - mapped, "compile": time.perf_counter() - reduced}
        return next_centroids(centroids, means), moved, sse, sizes, phases

    def map_stage(self, iteration, tasks, centroids, previous, attempts, rerun=False):
        """Map: run the given map tasks (again, when `rerun`: their output was lost); {task: (mapper, MapReply)}."""
        plan = self.plan

        def send(attempt):
            start, end = plan.ranges[attempt.task - 1]
            request = pb.MapRequest(job=self.job_id, run=self.recorder.run, iteration=iteration, task=attempt.task,
                                    attempt=attempt.number, input_path=plan.input_path, start=start, end=end,
                                    input=identity_message(plan.pinned), reducers=self.options.reducers,
                                    centroids=flatten(centroids), combine=self.options.combine)
            if previous is not None:
                request.previous.CopyFrom(flatten(previous))
            return self.workers.call(attempt, "Map", request, f"task {attempt.task}")

        return self.scheduler.run(Stage("mapper", "Map", iteration, rerun), tasks, attempts, send)

    def reduce_stage(self, iteration, partitions, map_results, attempts):
        """Reduce + collect: {partition: ResultReply}, and the map tasks whose output was lost."""
        outputs = [pb.MapOutput(task=task, address=worker.address) for task, (worker, _) in sorted(map_results.items())]

        def send(attempt):
            partition = attempt.task
            request = pb.ReduceRequest(job=self.job_id, run=self.recorder.run, iteration=iteration,
                                       partition=partition, attempt=attempt.number, outputs=outputs, dim=self.plan.dim,
                                       clusters=self.options.clusters)
            try:
                self.workers.call(attempt, "Reduce", request, f"partition {partition}")
            except TaskFailed as failed:
                if failed.kind != pb.MISSING_OUTPUT:
                    raise
                return MissingOutput(set(failed.reply.missing_tasks))
            self.recorder.collected(attempt.entry)
            return self.workers.call(attempt, "GetResult",
                                     pb.ResultRequest(job=self.job_id, run=self.recorder.run, iteration=iteration,
                                                      partition=partition),
                                     f"partition {partition}")

        done = self.scheduler.run(Stage("reducer", "Reduce", iteration), partitions, attempts, send)
        results = {p: reply for p, (_, reply) in done.items() if not isinstance(reply, MissingOutput)}
        lost = set().union(*(reply.tasks for _, reply in done.values() if isinstance(reply, MissingOutput)))
        return results, lost

    def oversample_pass(self, candidates, seed, oversample, count_clusters, exact=()):
        """A k-means|| pass: every split weighed against the candidates, with the round's seed; or, for the
        `exact` tasks only, their D^2 mass by block."""
        tasks = exact or range(1, self.options.mappers + 1)
        return self.weigh(candidates, None, count_clusters, {task: seed for task in tasks}, oversample, bool(exact))

    def weigh(self, centroids, rng, count_clusters=False, seeds=None, oversample=0, exact_mass=False):
        """Every split weighed against the centroids: {task: WeighReply}, one draw seed per task."""
        plan = self.plan
        seeds = seeds or {task: rng.randrange(2**63) for task in range(1, self.options.mappers + 1)}

        def send(attempt):
            start, end = plan.ranges[attempt.task - 1]
            request = pb.WeighRequest(job=self.job_id, run=self.recorder.run, task=attempt.task,
                                      attempt=attempt.number, input_path=plan.input_path, start=start, end=end,
                                      input=identity_message(plan.pinned), centroids=flatten(centroids),
                                      draw_seed=seeds[attempt.task], count_clusters=count_clusters,
                                      oversample=oversample, exact_mass=exact_mass)
            return self.workers.call(attempt, "Weigh", request, f"task {attempt.task}")

        stage = Stage("mapper", "Weigh", FINAL_PASS if count_clusters and not oversample else SEEDING_PASS)
        return {task: reply for task, (_, reply) in sorted(self.scheduler.run(stage, list(seeds), {}, send).items())}

    def final_clusters(self, progress, rng):
        """The SSE and cluster sizes of a run's final centroids: what the last Map measured if they did
        not move, else one counting Weigh pass."""
        if progress.iterations and progress.iterations[-1].shift == 0.0:
            return progress.iterations[-1].sse, progress.iterations[-1].counts
        log.log(DETAIL, "=== final SSE and cluster sizes: weigh every split ===")
        with self.recorder.span(FINAL_PASS):
            replies = self.weigh(progress.centroids, rng, count_clusters=True).values()
        sizes = [sum(counts) for counts in zip(*(reply.counts for reply in replies))]
        return exact_total((reply.mass_terms, bytes_integer(reply.mass_rest)) for reply in replies), sizes

    def write_centroids(self, centroids):
        """centroids.txt: the last complete iteration while running, the best run's at the end."""
        write_atomic(os.path.join(self.options.data_dir, "centroids.txt"), format_centroids(centroids))


def run_job(options):
    """Run one master job with its own workers (and its live page, with --ui); they are stopped however
    the job ends. With --report the result carries the page's final data."""
    master = Master(options)
    page = JobPage.serve(master, options.ui, options.ui_drills) if options.ui else None
    try:
        result = master.run()
        master.recorder.outcome = "finished"
        if options.report:
            result.page = job_snapshot(master)
        return result
    except BaseException as error:
        master.recorder.outcome = f"failed: {error or type(error).__name__}"
        if options.report:   # the page of a failed job is the one worth attaching to a bug report
            with contextlib.suppress(OSError):
                write_atomic(options.report, page_html(job_snapshot(master)))
        raise
    finally:
        master.workers.stop()
        if page is not None:
            page.close()


# ####################################################################################################
# Reports: the summary (JSON), the plot and the timeline (SVG), built from a JobResult
# ####################################################################################################


def summary(result, options):
    """Everything a run decided and measured, as one JSON-ready dict (fields in the README)."""
    best = result.best
    totals = collections.Counter()
    for run in result.runs:
        totals.update(run.events)
    identity = job_identity(options)
    return {
        "parameters": {"input": identity.pop("input"), "points": result.points, "dim": result.dim, **identity,
                       "init": options.init, "seed": result.runs[0].seed, "mappers": options.mapper_addrs or
                       ("spawned" if "mapper" in options.spawn else "joined"),
                       "reducers": options.reducer_addrs or ("spawned" if "reducer" in options.spawn else "joined")},
        "startup_seconds": result.startup_seconds,
        "runs": [{"seed": run.seed, "iterations": len(run.iterations), "converged": run.converged,
                  "sse": run.sse} for run in result.runs],
        "best_run": result.runs.index(best) + 1,
        "seed": best.seed,
        "initial_centroids": [list(c) for c in best.initial],
        "iterations": [{"iteration": s.iteration, "shift": s.shift, "moved": s.moved, "sse": s.sse,
                        "counts": s.counts, "seconds": s.seconds, "phases": s.phases, "events": s.events}
                       for s in best.iterations],
        "failures": dict(totals),
        "timeline": result.timeline,
        "converged": best.converged,
        "final_sse": best.sse,
        "final_counts": best.counts,
        "final_centroids": [list(c) for c in best.centroids],
    }


def nice_ticks(low, high, count=6):
    """About `count` round tick values covering [low, high]."""
    span = (high - low) or 1.0
    step = 10 ** math.floor(math.log10(span / count))
    step *= next(m for m in (1, 2, 5, 10) if span / (step * m) <= count)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def cluster_colour(key, clusters):
    """A colour per cluster, spread around the hue circle."""
    return f"hsl({round(360 * key / clusters)},70%,45%)"


def plot_svg(result):
    """An SVG of the sample points coloured by final cluster, each centroid's path, axes and a legend."""
    width, height, left, right, top, bottom = PLOT_FRAME
    best, clusters = result.best, len(result.centroids)
    flat = [(p[0], p[1] if len(p) > 1 else 0.0) for p in result.plot_sample]
    paths = [[(c[k][0], c[k][1] if len(c[k]) > 1 else 0.0) for c in best.history] for k in range(clusters)]
    xs = [x for x, _ in flat] + [x for path in paths for x, _ in path]
    ys = [y for _, y in flat] + [y for path in paths for _, y in path]
    x_pad, y_pad = 0.04 * ((max(xs) - min(xs)) or 1.0), 0.04 * ((max(ys) - min(ys)) or 1.0)
    x_ticks = nice_ticks(min(xs) - x_pad, max(xs) + x_pad)
    y_ticks = nice_ticks(min(ys) - y_pad, max(ys) + y_pad) if result.dim > 1 else [-1.0, 0.0, 1.0]
    x_low, x_high = min(xs + x_ticks), max(xs + x_ticks)
    y_low, y_high = min(ys + y_ticks), max(ys + y_ticks)

    def sx(x):
        return left + (x - x_low) / ((x_high - x_low) or 1.0) * (width - left - right)

    def sy(y):
        return height - bottom - (y - y_low) / ((y_high - y_low) or 1.0) * (height - top - bottom)

    title = f"kmr: K={clusters}, {result.points} points, SSE {best.sse:.6g}"
    if result.dim != 2:
        title += f" (dimension {result.dim}: showing coordinate{'s 1 and 2' if result.dim > 2 else ' 1'})"
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text class="title" x="{left}" y="28" font-size="16">{html.escape(title)}</text>',
           *plot_axes(x_ticks, y_ticks, sx, sy, result.dim)]
    for point, (x, y) in zip(result.plot_sample, flat):
        colour = cluster_colour(nearest(point, result.centroids), clusters)
        out.append(f'<circle class="point" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colour}" '
                   f'fill-opacity="0.6"/>')
    for key, path in enumerate(paths):
        colour = cluster_colour(key, clusters)
        points = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in path)
        out.append(f'<polyline class="path" points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>')
        out.append(f'<circle class="start" cx="{sx(path[0][0]):.1f}" cy="{sy(path[0][1]):.1f}" r="5" '
                   f'fill="white" stroke="{colour}" stroke-width="2"/>')
        x, y = path[-1]
        out.append(f'<circle class="centroid" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="7" fill="{colour}" '
                   f'stroke="black" stroke-width="2"/>')
    out += plot_legend(best.counts, len(flat), result.points)
    out.append("</svg>")
    return "\n".join(out) + "\n"


def plot_axes(x_ticks, y_ticks, sx, sy, dim):
    """The plot's axes, their ticks and labels (one axis for one-dimensional points)."""
    width, height, left, right, top, bottom = PLOT_FRAME
    axis_y, axis_x = height - bottom, left
    out = [f'<line class="axis" x1="{left}" y1="{axis_y}" x2="{width - right}" y2="{axis_y}" stroke="black"/>',
           f'<line class="axis" x1="{axis_x}" y1="{top}" x2="{axis_x}" y2="{axis_y}" stroke="black"/>']
    for tick in x_ticks:
        out.append(f'<line x1="{sx(tick):.1f}" y1="{axis_y}" x2="{sx(tick):.1f}" y2="{axis_y + 5}" stroke="black"/>'
                   f'<text class="tick" x="{sx(tick):.1f}" y="{axis_y + 18}" text-anchor="middle">{tick:g}</text>')
    for tick in y_ticks:
        out.append(f'<line x1="{axis_x - 5}" y1="{sy(tick):.1f}" x2="{axis_x}" y2="{sy(tick):.1f}" stroke="black"/>'
                   f'<text class="tick" x="{axis_x - 8}" y="{sy(tick) + 4:.1f}" text-anchor="end">{tick:g}</text>')
    out.append(f'<text x="{(left + width - right) / 2}" y="{height - 20}" text-anchor="middle">coordinate 1</text>')
    if dim > 1:
        out.append(f'<text x="18" y="{(top + height - bottom) / 2}" text-anchor="middle" '
                   f'transform="rotate(-90 18 {(top + height - bottom) / 2})">coordinate 2</text>')
    return out


def plot_legend(counts, shown, points):
    """The plot's legend: each cluster's colour and size, and how many points are drawn."""
    width, _, _, right, top, _ = PLOT_FRAME
    clusters, legend_x = len(counts), width - right + 20
    out = [f'<text x="{legend_x}" y="{top}" font-weight="bold">clusters (points)</text>']
    for key, size in enumerate(counts):
        y = top + 20 + 18 * key
        out.append(f'<rect x="{legend_x}" y="{y - 10}" width="12" height="12" fill="{cluster_colour(key, clusters)}"/>'
                   f'<text class="legend" x="{legend_x + 18}" y="{y}">cluster {key}: {size}</text>')
    notes = ([f"{shown} of {points} points shown", "(a seeded sample)"] if shown < points
             else [f"all {points} points shown"]) + ["lines: centroid paths,", "from the hollow start"]
    for number, note in enumerate(notes):
        out.append(f'<text class="note" x="{legend_x}" y="{top + 40 + 18 * (clusters + number)}">{note}</text>')
    return out


def span_label(span, short=False):
    """What the timeline calls a span: an iteration, the k-means++ or k-means|| rounds or the final SSE pass."""
    if span["iteration"] == SAMPLE_PASS:
        return "input" if short else "input check"
    if span["iteration"] == SEEDING_PASS:
        return span.get("init", "k-means++")
    if span["iteration"] is FINAL_PASS:
        return "SSE" if short else "final SSE"
    return str(span["iteration"]) if short else f"iteration {span['iteration']}"


def troubled(attempt):
    """Whether an attempt is worth seeing in full: anything but a plain SUCCESS."""
    return attempt["outcome"] != "SUCCESS" or attempt["backup"] or attempt["rerun"]


def span_at(spans, time_point):
    """The index of the span running at a time (the last one started by then)."""
    return max(0, bisect.bisect_right([span["start"] for span in spans], time_point) - 1)


def collapsed_groups(spans, attempts, losses, workers):
    """The runs of consecutive spans that collapse into bands, so that a run of any length stays
    readable: none of up to TIMELINE_FULL spans; of more, all but the first and last TIMELINE_EDGE
    and the earliest with something to see (a failure, a loss, a backup, a re-run, a worker joining
    or leaving), TIMELINE_FULL in all, except that runs shorter than BAND_SPANS are drawn in full too."""
    count = len(spans)
    if count <= TIMELINE_FULL:
        return []
    keep = set(range(TIMELINE_EDGE)) | set(range(count - TIMELINE_EDGE, count))
    index = {(span["run"], span["iteration"]): number for number, span in enumerate(spans)}
    trouble = {index[attempt["run"], attempt["iteration"]] for attempt in attempts if troubled(attempt)}
    trouble |= {span_at(spans, loss["time"]) for loss in losses}
    trouble |= {span_at(spans, worker[key]) for worker in workers for key in ("joined", "left")
                if worker.get(key) is not None and worker[key] > spans[0]["start"]}
    keep |= set(sorted(trouble - keep)[:TIMELINE_FULL - len(keep)])
    groups = []
    for number in sorted(set(range(count)) - keep):
        if groups and groups[-1][-1] == number - 1:
            groups[-1].append(number)
        else:
            groups.append([number])
    return [group for group in groups if len(group) >= BAND_SPANS]


class TimeAxis:
    """Seconds since the job started to x pixels, piece by piece: the spans drawn in full share one
    scale, and each run of consecutive collapsed spans becomes a band BAND_WIDTH px wide."""

    def __init__(self, start, end, bands, left, right):
        self.pieces = []   # (t0, t1, x0, x1, the collapsed spans' indices or None)
        collapsed = sum(t1 - t0 for t0, t1, _ in bands)
        self.scale = (right - left - BAND_WIDTH * len(bands)) / max(end - start - collapsed, 1e-9)
        time_point, x = start, left
        for t0, t1, group in bands:
            x = self.add(time_point, t0, x, x + (t0 - time_point) * self.scale)
            x = self.add(t0, t1, x, x + BAND_WIDTH, group)
            time_point = t1
        self.add(time_point, end, x, right)

    def add(self, t0, t1, x0, x1, group=None):
        """Append one piece; returns where it ends."""
        self.pieces.append((t0, t1, x0, x1, group))
        return x1

    def x(self, time_point):
        """Where a moment is drawn."""
        for t0, t1, x0, x1, _ in self.pieces:
            if time_point <= t1:
                break
        time_point = min(max(time_point, t0), t1)
        return x0 if t1 == t0 else x0 + (time_point - t0) / (t1 - t0) * (x1 - x0)

    def ticks(self):
        """Round times about 110 px apart in the full-scale pieces: [(seconds, x)], and the decimals
        their labels need."""
        full = [(t0, t1) for t0, t1, _, _, group in self.pieces if group is None]
        seconds = sum(t1 - t0 for t0, t1 in full)
        values = nice_ticks(0.0, seconds, max(2, int(seconds * self.scale / 110)))
        step = values[1] - values[0] if len(values) > 1 else seconds or 1.0
        ticks = [(k * step, self.x(k * step)) for t0, t1 in full
                 for k in range(math.ceil(t0 / step - 1e-9), math.floor(t1 / step + 1e-9) + 1)]
        return ticks, max(0, -math.floor(math.log10(step) + 1e-9))


def stack(attempts):
    """Each attempt of a lane with its row: the first row free when it starts. A lane has more than
    one row only where its worker really ran two attempts at once."""
    ends, placed = [], []
    for index, attempt in sorted(attempts, key=lambda item: item[1]["start"]):
        row = next((number for number, end in enumerate(ends) if end <= attempt["start"]), len(ends))
        if row == len(ends):
            ends.append(0.0)
        ends[row] = attempt["end"]
        placed.append((row, index, attempt))
    return placed, max(1, len(ends))


def attempt_svg(index, attempt, axis, y, x_limit, raced, runs):
    """One attempt as (its bar, its mark). The bar is in its stage's colour (a Reduce bar ends in its
    GetResult), striped for a backup copy, outlined purple for a re-executed map task, faded when its
    result was not used. The mark, drawn above every bar so that none hides it, sits at its end: a
    red cross for FAILURE, a grey one for stale, a black triangle for lost, a green tick for the copy
    that won a backup race."""
    x0 = axis.x(attempt["start"])
    x1 = max(min(max(axis.x(attempt["end"]), x0 + MIN_BAR), x_limit), x0)
    outcome, middle = attempt["outcome"], y + BAR / 2
    faded = outcome in ("ignored", "unfinished")
    stroke = (f'stroke="{RERUN_COLOUR}" stroke-width="3"' if attempt["rerun"] else
              'stroke="#333" stroke-width="1" stroke-dasharray="3 2"' if faded else
              f'stroke="{FAILURE_COLOUR}" stroke-width="1.5"' if outcome == "FAILURE" else
              'stroke="black" stroke-width="1.5"' if outcome == "lost" else 'stroke="white" stroke-width="0.5"')
    what = "partition" if attempt["stage"] == "Reduce" else "task"
    where = ("run %d, " % attempt["run"] if runs else "") + span_label(attempt)
    title = (f"{attempt['worker']} (PID {attempt['pid']}, {attempt['address']}): {attempt['stage']} {what} "
             f"{attempt['task']}, {where}, attempt {attempt['attempt']}"
             f"{', backup copy' if attempt['backup'] else ''}"
             f"{', re-executed (map output lost)' if attempt['rerun'] else ''}"
             f": {attempt['start']:.3f} to {attempt['end']:.3f} s, {outcome}"
             f"{' (' + attempt['reason'] + ')' if attempt['reason'] else ''}")
    out = [f'<g class="attempt" data-index="{index}" data-run="{attempt["run"]}" data-stage="{attempt["stage"]}" '
           f'data-task="{attempt["task"]}" data-iteration="{json.dumps(attempt["iteration"])}" '
           f'data-attempt="{attempt["attempt"]}" data-outcome="{outcome}"><title>{html.escape(title)}</title>',
           f'<rect class="bar" x="{x0:.1f}" y="{y}" width="{x1 - x0:.1f}" height="{BAR}" '
           f'fill="{STAGE_COLOURS[attempt["stage"]]}" fill-opacity="{0.35 if faded else 1}" {stroke}/>']
    if attempt["collect"] is not None:
        xc = min(max(axis.x(attempt["collect"]), x0), x1)
        out.append(f'<rect class="collect" x="{xc:.1f}" y="{y}" width="{x1 - xc:.1f}" height="{BAR}" '
                   f'fill="{COLLECT_COLOUR}" fill-opacity="{0.35 if faded else 1}"/>')
    if attempt["backup"]:
        out.append(f'<rect class="backup" x="{x0:.1f}" y="{y}" width="{x1 - x0:.1f}" height="{BAR}" '
                   f'fill="url(#stripes)"/>')
    out.append("</g>")
    cross = (f"M{x1 - 6:.1f} {middle - 6} L{x1 + 6:.1f} {middle + 6} "
             f"M{x1 - 6:.1f} {middle + 6} L{x1 + 6:.1f} {middle - 6}")
    halo = f'<path d="{cross}" stroke="white" stroke-width="6" stroke-linecap="round"/>'
    mark = ""
    if outcome == "FAILURE":
        mark = f'{halo}<path class="failure" data-index="{index}" d="{cross}" stroke="{FAILURE_COLOUR}" ' \
               'stroke-width="3" stroke-linecap="round"/>'
    elif outcome == "stale":
        mark = f'{halo}<path class="stale" data-index="{index}" d="{cross}" stroke="#555" stroke-width="2.5" ' \
               'stroke-linecap="round"/>'
    elif outcome == "lost":
        mark = f'<path class="lost" data-index="{index}" d="M{x1 - 7:.1f} {y - 3} L{x1 + 7:.1f} {y - 3} ' \
               f'L{x1:.1f} {middle + 3} Z" fill="black" stroke="white"/>'
    elif outcome == "SUCCESS" and raced:
        mark = f'<path class="won" data-index="{index}" d="M{x1 - 7:.1f} {y - 7} l3.5 5 l8 -9" ' \
               f'stroke="{WON_COLOUR}" stroke-width="3" fill="none" stroke-linecap="round"/>'
    return "".join(out), mark


def lane_svg(number, lane, axis, ticks, right, raced, runs):
    """One worker's lane: its name, address and first PID, its attempts (one row, more only where it
    ran two at once), its losses; returns (the lane, the marks to draw above everything)."""
    worker, placed, lost, y, height = lane
    detail = f"{worker['address']} · PID {worker['pid']}"
    rows = 1 + max((row for row, _, _ in placed), default=0)
    out = [f'<g class="lane" data-worker="{worker["worker"]}" data-rows="{rows}">'
           f'<rect x="10" y="{y}" width="{right - 10}" height="{height}" '
           f'fill="{"#f3f5f8" if number % 2 else "white"}"/>'
           f'<text class="lane-name" x="20" y="{y + 15}" font-weight="bold">{worker["worker"]}</text>'
           f'<text class="lane-detail" x="20" y="{y + 29}" font-size="11" fill="#444">{html.escape(detail)}</text>']
    out.extend(f'<line class="grid" x1="{x:.1f}" y1="{y}" x2="{x:.1f}" y2="{y + height}" stroke="#e4e4e4"/>'
               for _, x in ticks)
    limits, next_start = [], {}   # a bar ends before the next bar of its row starts
    for row, _, attempt in reversed(placed):
        limits.append(next_start.get(row, math.inf))
        next_start[row] = axis.x(attempt["start"])
    marks = []
    for (row, index, attempt), limit in zip(placed, reversed(limits)):
        key = (attempt["run"], attempt["stage"], attempt["iteration"], attempt["task"])
        bar, mark = attempt_svg(index, attempt, axis, y + 11 + ROW * row, limit, key in raced, runs)
        out.append(bar)
        marks.append(mark)
    out.extend(loss_svg(loss, axis, y, height) for loss in lost)
    out.extend(membership_svg(worker, axis, y, height))
    out.append("</g>")
    return "".join(out), marks


def loss_svg(loss, axis, y, height):
    """A lost worker in its lane: a dashed line at the moment, the PID that was lost and its
    replacement's."""
    x = axis.x(loss["time"])
    then = f"new PID {loss['new_pid']}" if loss["new_pid"] else "asked again later"
    title = f"{loss['worker']} lost at {loss['time']:.3f} s ({loss['reason']}): PID {loss['pid']}; {then}"
    return (f'<g class="loss" data-pid="{loss["pid"]}" data-new-pid="{loss["new_pid"] or ""}">'
            f'<title>{html.escape(title)}</title>'
            f'<line x1="{x:.1f}" y1="{y}" x2="{x:.1f}" y2="{y + height}" stroke="{LOSS_COLOUR}" stroke-width="2" '
            f'stroke-dasharray="4 2"/><text class="loss-label" x="{x + 4:.1f}" y="{y + height - 4}" '
            f'fill="{LOSS_COLOUR}" font-size="11">PID {loss["pid"]} lost, {then}</text></g>')


def membership_svg(worker, axis, y, height):
    """When a worker that joined the master mid-job did and when it left, released: a line each, the lane
    faded where the worker was not there (its label on that side)."""
    marks = []
    left_edge, right_edge = axis.pieces[0][2], axis.pieces[-1][3]
    for key, colour, words in (("joined", JOIN_COLOUR, "joined"), ("left", LEFT_COLOUR, "left (released)")):
        when = worker.get(key)
        piece = next((piece for piece in axis.pieces if piece[0] <= when <= piece[1]), None) if when else None
        if piece is None or piece[4] is not None or when <= axis.pieces[0][0]:   # before the job, or collapsed
            continue
        x = axis.x(when)
        absent, label = ((left_edge, x - left_edge), f'x="{x - 4:.1f}" text-anchor="end"') if key == "joined" else \
            ((x, right_edge - x), f'x="{x + 4:.1f}"')
        marks.append(f'<g class="{key}"><title>{html.escape(worker["worker"])} {words} at {when:.3f} s</title>'
                     f'<rect x="{absent[0]:.1f}" y="{y}" width="{absent[1]:.1f}" height="{height}" fill="white" '
                     f'fill-opacity="0.75"/>'
                     f'<line x1="{x:.1f}" y1="{y}" x2="{x:.1f}" y2="{y + height}" stroke="{colour}" stroke-width="2"/>'
                     f'<text {label} y="{y + 12}" fill="{colour}" font-size="11">{words}</text></g>')
    return marks


def band_svg(group, spans, inside, losses, piece, top, bottom, runs):
    """Consecutive collapsed spans as one hatched band that says what they held (`inside`: their attempts)."""
    _, _, x0, x1, _ = piece
    first, last = spans[group[0]], spans[group[-1]]
    failures = sum(attempt["outcome"] == "FAILURE" for attempt in inside)
    lost = sum(group[0] <= span_at(spans, loss["time"]) <= group[-1] for loss in losses)
    if not runs and first["iteration"] and last["iteration"]:
        names = [f"iterations {first['iteration']}–{last['iteration']}"]
    else:
        names = [("run %d: " % first["run"] if runs else "") + span_label(first) + " to",
                 ("run %d: " % last["run"] if runs else "") + span_label(last)]
    lines = names + [f"{last['end'] - first['start']:.3f} s", f"{len(inside)} attempts",
                     f"{failures} FAILURE"] + ([f"{lost} workers lost"] if lost else []) + ["(collapsed)"]
    out = [f'<g class="band" data-spans="{len(group)}" data-attempts="{len(inside)}" data-failures="{failures}" '
           f'data-lost="{lost}"><title>{html.escape(", ".join(lines[:-1]))}</title>'
           f'<rect x="{x0:.1f}" y="{top}" width="{x1 - x0:.1f}" height="{bottom - top}" fill="url(#hatch)" '
           f'stroke="#999"/>']
    for number, line in enumerate(lines):
        colour = FAILURE_COLOUR if line.endswith("FAILURE") and failures else "#222"
        out.append(f'<text class="band-label" x="{(x0 + x1) / 2:.1f}" y="{top + 18 + 15 * number}" '
                   f'text-anchor="middle" font-size="11" fill="{colour}">{html.escape(line)}</text>')
    out.append("</g>")
    return "".join(out)


def timeline_legend(y):
    """The legend: stage colours and marks, in two rows."""
    middle = y + BAR / 2
    items = [
        (f'<rect x="0" y="{y}" width="20" height="{BAR}" fill="{STAGE_COLOURS["Sample"]}"/>',
         "Sample (read, check, draw)"),
        (f'<rect x="0" y="{y}" width="20" height="{BAR}" fill="{STAGE_COLOURS["Map"]}"/>', "Map"),
        (f'<rect x="0" y="{y}" width="20" height="{BAR}" fill="{STAGE_COLOURS["Reduce"]}"/>',
         "Reduce (with its fetches)"),
        (f'<rect x="0" y="{y}" width="20" height="{BAR}" fill="{COLLECT_COLOUR}"/>', "GetResult (collection)"),
        (f'<rect x="0" y="{y}" width="20" height="{BAR}" fill="{STAGE_COLOURS["Weigh"]}"/>',
         "Weigh (k-means++, final SSE)"),
        (f'<path d="M5 {middle - 5} L15 {middle + 5} M5 {middle + 5} L15 {middle - 5}" stroke="{FAILURE_COLOUR}" '
         f'stroke-width="3" stroke-linecap="round"/>', "FAILURE reply"),
        (f'<path d="M5 {middle - 5} L15 {middle + 5} M5 {middle + 5} L15 {middle - 5}" stroke="#666" '
         f'stroke-width="2" stroke-linecap="round"/>', "stale (newer work seen)"),
        (f'<path d="M4 {y} L16 {y} L10 {middle + 4} Z" fill="black"/>', "worker lost during the attempt"),
        (f'<line x1="10" y1="{y - 2}" x2="10" y2="{y + BAR + 2}" stroke="{LOSS_COLOUR}" stroke-width="2" '
         f'stroke-dasharray="4 2"/>', "worker lost: its new PID"),
        (f'<rect x="0" y="{y}" width="20" height="{BAR}" fill="{STAGE_COLOURS["Map"]}"/>'
         f'<rect x="0" y="{y}" width="20" height="{BAR}" fill="url(#stripes)"/>', "backup copy"),
        (f'<path d="M4 {middle} l3 4 l7 -8" stroke="{WON_COLOUR}" stroke-width="2.5" fill="none"/>',
         "the copy that won"),
        (f'<rect x="0" y="{y}" width="20" height="{BAR}" fill="{STAGE_COLOURS["Map"]}" fill-opacity="0.35" '
         f'stroke="#333" stroke-dasharray="3 2"/>', "ignored (lost the race)"),
        (f'<rect x="1.5" y="{y}" width="17" height="{BAR}" fill="{STAGE_COLOURS["Map"]}" stroke="{RERUN_COLOUR}" '
         f'stroke-width="3"/>', "map task re-executed"),
        (f'<line x1="10" y1="{y - 2}" x2="10" y2="{y + BAR + 2}" stroke="#555"/>', "iteration starts"),
        (f'<rect x="0" y="{y}" width="20" height="{BAR}" fill="url(#hatch)" stroke="#999"/>',
         "iterations collapsed"),
        (f'<line x1="10" y1="{y - 2}" x2="10" y2="{y + BAR + 2}" stroke="{JOIN_COLOUR}" stroke-width="2"/>',
         "a worker joined (--listen)"),
        (f'<line x1="10" y1="{y - 2}" x2="10" y2="{y + BAR + 2}" stroke="{LEFT_COLOUR}" stroke-width="2"/>',
         "it left, released"),
    ]
    out = []
    for number, (glyph, text) in enumerate(items):
        x, dy = 20 + 220 * (number % 7), 26 * (number // 7)
        out.append(f'<g class="legend" transform="translate({x} {dy})">{glyph}'
                   f'<text x="28" y="{y + 12}">{html.escape(text)}</text></g>')
    return out


def counted(count, singular, plural=None):
    """'1 worker', '2 workers'."""
    return f"{count} {singular if count == 1 else plural or singular + 's'}"


def timeline_words(result, spans, groups):
    """The timeline's title and notes: what the job was and did, how to read the axis, what was
    collapsed, and what an earlier master ran (resumed)."""
    data, runs = result.timeline, len(result.runs)
    attempts, workers = data["attempts"], data["workers"]
    roles = collections.Counter(worker["worker"].split()[0] for worker in workers)
    title = (f"kmr timeline: {result.points} points, {counted(roles['mapper'], 'mapper')}, "
             f"{counted(roles['reducer'], 'reducer')}, {counted(sum(1 for s in spans if s['iteration']), 'iteration')}"
             f"{' in %d runs' % runs if runs > 1 else ''}; {counted(len(attempts), 'attempt')}: "
             f"{sum(a['outcome'] == 'FAILURE' for a in attempts)} FAILURE, "
             f"{counted(len(data['losses']), 'worker')} lost, "
             f"{membership_words(workers, spans)}"
             f"{counted(sum(a['backup'] for a in attempts), 'backup copy', 'backup copies')}, "
             f"{counted(len({(a['run'], a['iteration'], a['task']) for a in attempts if a['rerun']}), 'map task')} "
             "re-executed")
    before = f" (before {spans[0]['start']:.2f} s: counting the input's lines and the workers' start-up)" if spans else ""
    notes = [f"x: seconds since the master started the job{before}; a lane per worker; hover over a bar "
             "for its details"]
    if groups:
        hidden = sum(map(len, groups))
        notes.append(f"{hidden} of {len(spans)} spans collapsed into hatched bands; in full: the first and last "
                     f"{TIMELINE_EDGE}, the earliest with failures, losses, backups, re-runs, joins or leaves, and "
                     f"gaps of fewer than {BAND_SPANS}")
    if data["resumed"]:
        earlier = data["resumed"]
        done = ([f"run{'s 1–%d' % earlier['runs'] if earlier['runs'] > 1 else ' 1'}"] if earlier["runs"] else []) + \
               ([f"iteration{'s 1–%d' % earlier['iterations'] if earlier['iterations'] > 1 else ' 1'}"
                 + (f" of run {earlier['runs'] + 1}" if runs > 1 else "")] if earlier["iterations"] else [])
        notes.append("resumed from a checkpoint: " + (" and ".join(done) or "the initial centroids") +
                     " ran in an earlier master, whose attempts are not shown")
    return title, notes


def membership_words(workers, spans):
    """'1 joined mid-job, 1 left, ' when workers joined the master after the job began or left it; else ''."""
    start = spans[0]["start"] if spans else 0.0
    joined = sum(1 for worker in workers if worker.get("joined") is not None and worker["joined"] > start)
    left = sum(1 for worker in workers if worker.get("left") is not None)
    return f"{joined} joined mid-job, {left} left, " if joined or left else ""


def boundaries_svg(spans, full, axis, top, bottom, right, runs):
    """A line where each span drawn in full starts, labelled with its iteration number (on a second
    level when the first is taken), and where the last before a band or the end ends; with
    restarts, a bold line and the run's number where each run starts."""
    out, label_ends = [], [-math.inf, -math.inf]   # where the labels on each level end
    for number, span in enumerate(spans):
        if number not in full:
            continue
        x, which = axis.x(span["start"]), f'data-run="{span["run"]}" data-iteration="{json.dumps(span["iteration"])}"'
        new_run = runs and (number == 0 or spans[number - 1]["run"] != span["run"])
        out.append(f'<line class="boundary" {which} data-edge="start" x1="{x:.1f}" y1="{top - 30}" x2="{x:.1f}" '
                   f'y2="{bottom}" stroke="{"black" if new_run else "#555"}" stroke-width="{2 if new_run else 1}"/>')
        if new_run:
            out.append(f'<text class="run" x="{x + 3:.1f}" y="{top - 36}" font-weight="bold">run {span["run"]}</text>')
        following = axis.x(spans[number + 1]["start"]) if number + 1 < len(spans) else right
        label = span_label(span)
        if following - x < 6.5 * len(label) + 8:   # about 6.5 px per character at 12 px
            label = span_label(span, short=True)
        level = 0 if x + 3 > label_ends[0] + 4 else 1 if x + 3 > label_ends[1] + 4 else \
            min((0, 1), key=label_ends.__getitem__)
        label_ends[level] = x + 3 + 6.5 * len(label)
        out.append(f'<text class="iteration" {which} x="{x + 3:.1f}" y="{top - 8 - 14 * level}">'
                   f'{html.escape(label)}</text>')
        if number + 1 == len(spans) or number + 1 not in full:
            x = axis.x(span["end"])
            out.append(f'<line class="boundary" {which} data-edge="end" x1="{x:.1f}" y1="{top - 30}" x2="{x:.1f}" '
                       f'y2="{bottom}" stroke="#555"/>')
    return out


def axis_svg(axis, ticks, decimals, y, left, right):
    """The time axis under the lanes: a line per full-scale piece, ticks with their values, a title."""
    out = [f'<line class="axis" x1="{x0:.1f}" y1="{y}" x2="{x1:.1f}" y2="{y}" stroke="black"/>'
           for _, _, x0, x1, group in axis.pieces if group is None and x1 > x0]
    out += [f'<line x1="{x:.1f}" y1="{y}" x2="{x:.1f}" y2="{y + 5}" stroke="black"/>'
            f'<text class="tick" x="{x:.1f}" y="{y + 18}" text-anchor="middle">{value:.{decimals}f}</text>'
            for value, x in ticks]
    out.append(f'<text x="{(left + right) / 2}" y="{y + 38}" text-anchor="middle">seconds since the master '
               f'started the job</text>')
    return out


def timeline_svg(result):
    """An SVG of the job in time: a lane per worker (a respawned worker's new process in the same
    lane), a bar per attempt coloured by stage, marks where something went wrong, iteration
    boundaries, a time axis and a legend (built from result.timeline, see Recorder.timeline)."""
    data = result.timeline
    spans = sorted(data["iterations"], key=lambda span: span["start"])
    attempts, losses = data["attempts"], data["losses"]
    runs = len(result.runs) > 1
    groups = collapsed_groups(spans, attempts, losses, data["workers"])
    full = set(range(len(spans))) - {number for group in groups for number in group}
    index = {(span["run"], span["iteration"]): number for number, span in enumerate(spans)}
    title, notes = timeline_words(result, spans, groups)
    left, right, top = LANE_LABEL, TIMELINE_WIDTH - 30, 50 + 17 * len(notes) + 36 + (18 if runs else 0)
    start = spans[0]["start"] if spans else 0.0
    end = max([span["end"] for span in spans] + [attempt["end"] for attempt in attempts] + [start + 1e-3])
    axis = TimeAxis(start, end, [(spans[g[0]]["start"], spans[g[-1]]["end"], g) for g in groups], left, right)
    ticks, decimals = axis.ticks()
    raced = {(a["run"], a["stage"], a["iteration"], a["task"]) for a in attempts if a["backup"]}

    lanes, marks, y = [], [], top
    for number, worker in enumerate(data["workers"]):
        mine = [(number, attempt) for number, attempt in enumerate(attempts)
                if attempt["worker"] == worker["worker"] and index[attempt["run"], attempt["iteration"]] in full]
        lost = [loss for loss in losses if loss["worker"] == worker["worker"] and span_at(spans, loss["time"]) in full]
        placed, rows = stack(mine)
        height = max(34, ROW * rows + 4) + (14 if lost else 0)   # room for two lines of label, and the loss's
        drawn, lane_marks = lane_svg(number, (worker, placed, lost, y, height), axis, ticks, right, raced, runs)
        lanes.append(drawn)
        marks += lane_marks
        y += height
    bottom = y
    height = bottom + 150
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{TIMELINE_WIDTH}" height="{height}" '
           f'viewBox="0 0 {TIMELINE_WIDTH} {height}" font-family="sans-serif" font-size="12">',
           '<defs><pattern id="stripes" width="6" height="6" patternUnits="userSpaceOnUse" '
           'patternTransform="rotate(45)"><rect width="3" height="6" fill="black" fill-opacity="0.45"/></pattern>'
           '<pattern id="hatch" width="8" height="8" patternUnits="userSpaceOnUse" patternTransform="rotate(45)">'
           '<rect width="8" height="8" fill="#f7f7f7"/><rect width="1.5" height="8" fill="#d0d0d0"/></pattern></defs>',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text class="title" x="20" y="28" font-size="16">{html.escape(title)}</text>']
    out += [f'<text class="note" x="20" y="{50 + 17 * number}" fill="#333">{html.escape(note)}</text>'
            for number, note in enumerate(notes)]
    out += lanes
    out += boundaries_svg(spans, full, axis, top, bottom, right, runs)
    for group in groups:
        piece = next(piece for piece in axis.pieces if piece[4] is group)
        inside = [attempt for attempt in attempts if index[attempt["run"], attempt["iteration"]] in group]
        out.append(band_svg(group, spans, inside, losses, piece, top - 30, bottom, runs))
    out += [mark for mark in marks if mark]
    out += axis_svg(axis, ticks, decimals, bottom + 6, left, right)
    out += timeline_legend(bottom + 68)
    out.append("</svg>")
    return "\n".join(out) + "\n"


# ####################################################################################################
# Job page: the job live in a browser (--ui), and the same page as a file (--report)
# ####################################################################################################


def job_snapshot(master, drills=False):
    """What the job page shows, as JSON-ready data (fields in the README): read from the recorder and the
    workers as they are now, never waited for, so the job never waits on the page."""
    options, plan, recorder = master.options, master.plan, master.recorder
    progress, stage = recorder.progress, recorder.stage
    return {
        "job": {"id": master.job_id, "input": plan.input_path, "points": plan.points, "dim": plan.dim,
                "M": options.mappers, "R": options.reducers, "K": options.clusters, "n": options.iterations,
                "tol": options.tol, "seed": plan.seeds[0], "init": options.init, "restarts": options.restarts,
                "mode": "combiner" if options.combine else "plain"},
        "state": recorder.outcome,
        "elapsed": round(recorder.now(), 3),
        "run": recorder.run,
        "stage": None if stage is None or recorder.outcome != "running" else
        {"name": stage[0].name, "role": stage[0].role, "iteration": stage[0].iteration, "since": round(stage[1], 6)},
        "iterations": [] if progress is None else [
            {"iteration": s.iteration, "shift": s.shift, "moved": s.moved, "sse": s.sse, "seconds": round(s.seconds, 4)}
            for s in list(progress.iterations)],
        "centroids": [] if progress is None else [[list(c[:2]) for c in step] for step in list(progress.history)],
        "plot": [list(point[:2]) for point in recorder.plot],
        "workers": worker_rows(master.workers, recorder),
        "timeline": recorder.timeline(recorder.lanes, recorder.earlier, live=recorder.outcome == "running"),
        "dump": dump_tail(os.path.join(options.data_dir, "dump.txt")),
        "drills": drills,
    }


def worker_rows(workers, recorder):
    """One row per worker for the page: where it is, what it does now and for how long, what it did (the
    process answering now: a replacement starts from nothing)."""
    now, rows, attempts = recorder.now(), [], collections.defaultdict(list)
    for entry in list(recorder.attempts):   # one pass over the attempts, however many workers
        attempts[entry.worker, entry.pid].append(entry)
    for worker in workers.every():
        name = worker.lane
        mine = attempts[name, worker.pid]
        running = [entry for entry in mine if entry.ending is None]
        if worker.left:
            state = "left (released)"
        elif not worker.alive:
            state = "respawning" if worker.process is not None else "lost"
        elif running:
            state = f"running {running[-1].stage} task {running[-1].task} for {now - running[-1].start:.1f} s" + \
                    (", then leaving" if worker.leaving else "")
        elif worker.leaving:
            state = "leaving: released once the reducers have its map outputs"
        elif worker.arrived_in is not None and worker.arrived_in is recorder.stage:
            state = "joined: tasks from the next stage on"
        else:
            state = "idle"
        rows.append({"worker": name, "role": worker.role, "index": worker.index, "address": worker.address,
                     "pid": worker.pid, "spawned": worker.process is not None, "state": state,
                     "joined": None if worker.joined is None else round(worker.joined, 3),
                     "done": sum(1 for entry in mine if entry.ending and entry.ending[1] == "SUCCESS"),
                     "failures": sum(1 for entry in mine if entry.ending and entry.ending[1] == "FAILURE"),
                     "ping_ms": None if worker.round_trip is None else round(1000 * worker.round_trip, 2)})
    return rows


def dump_tail(path, lines=PAGE_DUMP_LINES):
    """The last lines of dump.txt (its last 32 KiB at most: reading it costs the job nothing)."""
    try:
        with open(path, "rb") as dump:
            dump.seek(max(0, os.fstat(dump.fileno()).st_size - 32768))
            return dump.read().decode("utf-8", "replace").splitlines()[-lines:]
    except OSError:
        return []


def drill(master, name, action):
    """A fault from the page (--ui-drills), on a worker this master spawned: kill it (SIGKILL), hang it
    (SIGSTOP for DRILL_SECONDS) or slow it (a straggler for DRILL_SECONDS). Logged like any fault."""
    worker = next((w for w in master.workers.every() if w.lane == name), None)
    if worker is None or worker.process is None or action not in ("kill", "hang", "slow"):
        raise ValueError(f"no drill {action!r} for {name!r}: only kill, hang or slow a worker this master spawned")
    process = worker.process
    if not worker.alive or not process.is_alive():
        raise ValueError(f"{name} is not running now (lost, or starting)")
    log.info("drill from the page: %s %s (PID %d)", action, name, process.pid)
    if action == "kill":
        signal_ours(process, signal.SIGKILL)
    elif action == "hang":
        signal_ours(process, signal.SIGSTOP)
        threading.Timer(DRILL_SECONDS, signal_ours, (process, signal.SIGCONT)).start()
    else:
        threading.Thread(target=straggle, args=(process, DRILL_SECONDS), name="drill", daemon=True).start()
    return f"{action} {name} (PID {process.pid})"


def signal_ours(process, signum):
    """Signal a process this master spawned, by PID, if it is still ours and alive."""
    if process.is_alive():
        os.kill(process.pid, signum)


def straggle(process, seconds):
    """Slow a worker about 9x for a while, as a busy host would: stopped 0.4 s, running 0.05 s."""
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline and process.is_alive():
            signal_ours(process, signal.SIGSTOP)
            time.sleep(0.4)
            signal_ours(process, signal.SIGCONT)
            time.sleep(0.05)
    finally:
        signal_ours(process, signal.SIGCONT)


def ui_address(text):
    """'[HOST:]PORT' as (host, port); the host defaults to 127.0.0.1 (IPv4: the page's server is)."""
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) <= 65535 or ":" in host or "[" in host:
        raise argparse.ArgumentTypeError(f"{text!r} is not [HOST:]PORT with an IPv4 address or a name")
    return host or "127.0.0.1", int(port)


def page_html(data=None):
    """The job page: it polls /api/job once a second, or shows `data` (a report) with no server."""
    embedded = "null" if data is None else json.dumps(data).replace("<", "\\u003c")
    return PAGE.replace("__DATA__", embedded)


class JobPage:
    """The job's live page (--ui): GET / the page, GET /api/job its data, POST /api/drill the drills
    (--ui-drills). Its own threads serve it from the recorder as it is: the job never waits on it, a browser
    that goes away costs nothing, and the data is built at most twice a second however many browsers
    ask. On 127.0.0.1 only requests naming this host are served (no DNS rebinding); elsewhere every request
    needs the page's own token. It is served by http.server's ThreadingHTTPServer, joined to it when a
    page starts (see `serve`)."""

    daemon_threads = True
    request_queue_size = 16

    def __init__(self, address, master, drills, token, requests):
        super().__init__(address, requests)
        self.master, self.drills, self.token = master, drills, token
        self.hosts = {f"{name}:{self.server_port}" for name in ("127.0.0.1", "localhost")}
        self.slots = threading.BoundedSemaphore(PAGE_CONNECTIONS)   # connections served at once
        self.cache, self.cache_lock = (-1.0, b""), threading.Lock()
        self.plot = None   # the plot's JSON, once it is drawn: most of the data, and it never changes

    @classmethod
    def serve(cls, master, where, drills):
        """Start the page at `where` ((host, port)) and say where it is on the console (only there: the
        token of a page off 127.0.0.1 stays out of dump.txt)."""
        import http.server   # here, not at the top: 10 ms of every process's start, and only --ui needs it
        served = type(cls.__name__, (cls, http.server.ThreadingHTTPServer), {})
        requests = type(PageRequests.__name__, (PageRequests, http.server.BaseHTTPRequestHandler), {})
        host, port = where
        token = None if host in ("127.0.0.1", "localhost") else secrets.token_urlsafe(16)
        try:
            page = served((host, port), master, drills, token, requests)
        except OSError as error:
            raise InputError(f"--ui {host}:{port}: cannot listen: {error.strerror}") from None
        # a short poll: closing the page at the end of the job waits for it
        threading.Thread(target=page.serve_forever, kwargs={"poll_interval": 0.05}, name="job-page",
                         daemon=True).start()
        where = f"http://{host}:{page.server_port}/"
        log.debug("job page at %s%s", where, "" if token is None else " (its token is on the console)")
        print(f"job page: {where}" + ("" if token is None else f"?token={token} (not on 127.0.0.1: the token is "
                                      "required)"), file=sys.stderr, flush=True)
        return page

    def process_request(self, request, client_address):
        """Serve a connection on a thread of its own, if fewer than PAGE_CONNECTIONS are being served."""
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        """Serve one connection, then give its slot back."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request, client_address):
        """A client that went away (or sent junk) is the client's affair: a line in dump.txt, no traceback."""
        log.debug("job page: %s from %s", sys.exc_info()[1], client_address[0])

    def snapshot(self):
        """/api/job's body: built at most twice a second, whoever asks, the plot encoded once."""
        with self.cache_lock:
            built, body = self.cache
            if time.monotonic() - built > 0.5:
                data = job_snapshot(self.master, self.drills)
                plot = data.pop("plot")
                if self.plot is None and plot:
                    self.plot = json.dumps(plot)
                body = (json.dumps(data)[:-1] + ', "plot": ' + (self.plot or "[]") + "}").encode()
                self.cache = (time.monotonic(), body)
            return body

    def close(self):
        """Stop serving: the job is over."""
        self.shutdown()
        self.server_close()


class PageRequests:
    """One request to the job page; anything else gets a clean HTTP error. Served with http.server's
    BaseHTTPRequestHandler, joined to it when a page starts (see JobPage.serve)."""

    server_version = "kmr"
    timeout = PAGE_TIMEOUT   # a connection that sends nothing, or reads nothing, is dropped

    def do_GET(self):
        """The page, or its data."""
        path = urllib.parse.urlsplit(self.path).path
        if not self.allowed():
            return
        if path == "/":
            self.answer(200, "text/html; charset=utf-8", page_html().encode())
        elif path == "/api/job":
            self.answer(200, "application/json", self.server.snapshot())
        else:
            self.answer(404, "text/plain", b"not found\n")

    def do_POST(self):
        """A drill: {"worker": "mapper 1", "action": "kill" | "hang" | "slow"} as application/json (which a
        page elsewhere cannot send without asking first), only with --ui-drills."""
        if not self.allowed():
            return
        if urllib.parse.urlsplit(self.path).path != "/api/drill" or not self.server.drills:
            self.answer(404, "text/plain", b"not found (drills need --ui-drills)\n")
            return
        length = self.headers.get("Content-Length", "")
        if self.headers.get_content_type() != "application/json" or not length.isdigit() or \
                not 0 < int(length) <= 4096:
            self.answer(400, "text/plain", b"a drill is a small application/json object\n")
            return
        try:
            order = json.loads(self.rfile.read(int(length)))
            done = drill(self.server.master, str(order.get("worker")), str(order.get("action")))
        except (ValueError, AttributeError) as error:
            self.answer(400, "application/json", json.dumps({"error": str(error)}).encode())
            return
        self.answer(200, "application/json", json.dumps({"done": done}).encode())

    def allowed(self):
        """Whether to serve this request: on 127.0.0.1, one that names this host; elsewhere one that carries
        the page's token (in the URL or an X-Kmr-Token header). A 403 if not."""
        token = self.server.token
        if token is None:
            if self.headers.get("Host") in self.server.hosts:
                return True
        else:
            supplied = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).get("token", [""])[0] or \
                self.headers.get("X-Kmr-Token", "")
            if hmac.compare_digest(supplied.encode(), token.encode()):
                return True
        self.answer(403, "text/plain", b"not for this page: wrong host, or the page's token is missing\n")
        return False

    def answer(self, code, kind, body):
        """Send one whole response."""
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_request(self, code="-", size="-"):
        """Refused requests go to dump.txt (without their query: it may hold the token); served ones do not."""
        if str(code)[0] in "45":
            log.debug("job page: %s %s %s", self.command, urllib.parse.urlsplit(self.path).path, code)

    def log_message(self, format, *args):
        """Errors the server itself reports go to dump.txt, not the console."""
        log.debug("job page: " + format, *args)

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>kmr job</title>
<style>
body { font: 13px/1.4 sans-serif; margin: 16px 24px; color: #222; }
h1 { font-size: 19px; margin: 0 0 8px; } h2 { font-size: 15px; margin: 18px 0 6px; }
table { border-collapse: collapse; } td, th { padding: 2px 10px 2px 0; text-align: left; border-bottom: 1px solid #e4e4e4; }
#job td { padding-right: 22px; } .muted { color: #777; }
.bar { display: inline-block; width: 320px; height: 10px; background: #eee; vertical-align: middle; }
.bar > div { height: 10px; background: #4c78a8; }
tr.lost td, .failed { color: #b00020; } tr.running td.state { color: #1a7f37; } tr.left td { color: #888; }
.grid { display: flex; flex-wrap: wrap; gap: 28px; }
pre { background: #f6f6f6; padding: 6px 8px; max-height: 260px; overflow: auto; font-size: 11px; margin: 0; }
button { font-size: 11px; margin-right: 4px; }
</style></head><body>
<h1>kmr job <span id="job-id"></span> <span id="state" class="muted"></span></h1>
<table id="job"><tr><td>input <b id="job-input"></b></td><td>N <b id="job-points"></b></td><td>D <b id="job-dim"></b></td>
<td>M <b id="job-M"></b></td><td>R <b id="job-R"></b></td><td>K <b id="job-K"></b></td><td>n <b id="job-n"></b></td>
<td>seed <b id="job-seed"></b></td><td>init <b id="job-init"></b></td><td>mode <b id="job-mode"></b></td></tr></table>
<p>run <b id="run"></b> &middot; iteration <b id="iteration-count">0</b> of <b id="iteration-limit"></b>
<span class="bar"><div id="progress" style="width:0"></div></span> &middot; <span id="stage"></span>
&middot; <span id="elapsed"></span> s</p>
<p id="stage-tasks" class="muted"></p><p id="resumed" class="muted"></p>
<h2>Workers</h2>
<table id="workers"><thead><tr><th>worker</th><th>address</th><th>PID</th><th>state</th><th>done</th>
<th>FAILURE</th><th>ping</th><th id="drill-head"></th></tr></thead><tbody></tbody></table>
<h2>Timeline</h2><div id="timeline"></div>
<div class="grid"><div><h2>Iterations: SSE and largest shift (log)</h2><div id="chart"></div></div>
<div><h2>Clusters (coordinates 1 and 2)</h2><div id="clusters"></div></div></div>
<h2>dump.txt</h2><pre id="dump"></pre>
<script>
"use strict";
const EMBEDDED = __DATA__;
const TOKEN = new URLSearchParams(location.search).get("token");
const COLOURS = {Sample: "#9d755d", Map: "#4c78a8", Reduce: "#f58518", Weigh: "#54a24b"};
const esc = text => String(text).replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"})[c]);
const set = (id, text) => { document.getElementById(id).textContent = text; };
const api = path => path + (TOKEN ? "?token=" + encodeURIComponent(TOKEN) : "");

function render(d) {
  for (const key of ["input", "points", "dim", "M", "R", "K", "n", "seed", "init", "mode"]) set("job-" + key, d.job[key]);
  set("job-id", d.job.id); set("state", d.state); set("run", d.run + " of " + d.job.restarts);
  set("iteration-count", d.iterations.length); set("iteration-limit", d.job.n); set("elapsed", d.elapsed.toFixed(1));
  const share = d.state === "running" ? d.iterations.length / Math.max(1, d.job.n) : 1;
  document.getElementById("progress").style.width = (100 * share) + "%";
  set("stage", d.stage ? d.stage.name + " " + passName(d.stage.iteration, d.job.init) : d.state);
  const earlier = d.timeline.resumed;
  set("resumed", earlier ? "resumed from a checkpoint: " + earlier.runs + " run(s) and " + earlier.iterations +
      " iteration(s) of the run under way ran in an earlier master, not shown here" : "");
  stageTasks(d); workers(d); timeline(d); chart(d); clusters(d);
  const dump = document.getElementById("dump");
  dump.textContent = d.dump.join("\\n");
  dump.scrollTop = dump.scrollHeight;   // the newest lines in view
}

function passName(iteration, init) {
  return iteration === -1 ? "(input check)" : iteration === 0 ? "(" + init + ")" : iteration === null ? "(final SSE)"
    : "iteration " + iteration;
}

function stageTasks(d) {
  if (!d.stage) { set("stage-tasks", ""); return; }
  const here = d.timeline.attempts.filter(a => a.stage === d.stage.name && a.start >= d.stage.since);
  const done = new Set(here.filter(a => a.outcome === "SUCCESS").map(a => a.task)).size;
  const count = outcome => here.filter(a => a.outcome === outcome).length;
  const of = d.stage.role === "mapper" ? d.job.M : d.job.R;
  set("stage-tasks", d.stage.name + " tasks of " + of + ": " + done + " done, " + count("running") +
      " attempts running, " + count("FAILURE") + " FAILURE");
}

function workers(d) {
  document.getElementById("drill-head").textContent = d.drills ? "drills" : "";
  const body = document.querySelector("#workers tbody");
  body.innerHTML = d.workers.map(w => {
    const kind = w.state.startsWith("running") ? "running" :
      (w.state === "lost" || w.state === "respawning") ? "lost" : w.state.startsWith("left") ? "left" : "";
    const buttons = d.drills && w.spawned ? ["kill", "hang", "slow"].map(action =>
      `<button data-action="${action}">${action}</button>`).join("") : "";
    return `<tr class="${kind}" data-worker="${esc(w.worker)}"><td>${esc(w.worker)}</td><td>${esc(w.address)}</td>` +
      `<td>${w.pid ?? ""}</td><td class="state">${esc(w.state)}</td><td class="done">${w.done}</td>` +
      `<td class="failures">${w.failures}</td><td>${w.ping_ms === null ? "" : w.ping_ms + " ms"}</td><td>${buttons}</td></tr>`;
  }).join("");
  body.querySelectorAll("button").forEach(button => button.addEventListener("click", () =>
    drill(button.closest("tr").dataset.worker, button.dataset.action)));
}

function drill(worker, action) {
  fetch(api("api/drill"), {method: "POST", headers: {"Content-Type": "application/json"},
                           body: JSON.stringify({worker: worker, action: action})});
}

function timeline(d) {
  const lanes = d.workers.map(w => w.worker), width = 1100, left = 90, row = 18;
  const first = Math.min(d.timeline.end, ...d.timeline.attempts.map(a => a.start));   // from the first task on
  const end = Math.max(d.timeline.end - first, 0.001), x = t => left + (width - left - 10) * (t - first) / end;
  const y = name => 20 + row * Math.max(0, lanes.indexOf(name));
  const out = [`<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${30 + row * lanes.length}" font-size="11">`];
  lanes.forEach(name => out.push(`<text x="0" y="${y(name) + 11}">${esc(name)}</text>`));
  for (const span of d.timeline.iterations) {
    out.push(`<line class="boundary" x1="${x(span.start)}" x2="${x(span.start)}" y1="12" y2="${24 + row * lanes.length}" stroke="#ccc"/>`);
    if (span.iteration > 0) out.push(`<text x="${x(span.start) + 2}" y="10" fill="#999">${span.iteration}</text>`);
  }
  for (const a of d.timeline.attempts) {
    const x0 = x(a.start), x1 = Math.max(x0 + 2, x(a.end)), top = y(a.worker) + 2;
    out.push(`<rect class="attempt ${a.outcome}" x="${x0}" y="${top}" width="${x1 - x0}" height="12" ` +
             `fill="${COLOURS[a.stage] || "#888"}" fill-opacity="${a.outcome === "ignored" ? 0.35 : 0.9}"` +
             `${a.backup ? ' stroke="#222" stroke-dasharray="2,1"' : ""}${a.rerun ? ' stroke="#7b3294"' : ""}>` +
             `<title>${esc(a.worker + ": " + a.stage + " task " + a.task + " attempt " + a.attempt + ", " + a.outcome + " " + a.reason)}</title></rect>`);
    if (a.outcome === "FAILURE") out.push(`<text class="failure" data-worker="${esc(a.worker)}" x="${x1 - 4}" ` +
                                          `y="${top + 10}" fill="#d62728" font-weight="bold">✕</text>`);
  }
  for (const loss of d.timeline.losses) {
    out.push(`<text class="loss" data-worker="${esc(loss.worker)}" x="${x(loss.time) - 4}" y="${y(loss.worker) + 11}" ` +
             `fill="#b00020" font-weight="bold">⚡</text>`);
  }
  out.push("</svg>");
  document.getElementById("timeline").innerHTML = out.join("");
}

function chart(d) {
  const its = d.iterations, w = 420, h = 200, pad = 36;
  if (!its.length) { document.getElementById("chart").innerHTML = '<p class="muted">no iteration yet</p>'; return; }
  const x = i => pad + (w - pad - 10) * (its.length > 1 ? i / (its.length - 1) : 0.5);
  const line = (key, colour) => {   // each series on its own log scale: SSE and shift differ by many decades
    const logs = its.map(s => Math.log10(Math.max(s[key], 1e-300))), lo = Math.min(...logs), hi = Math.max(...logs);
    const y = v => h - pad - (h - 2 * pad - 40) * (v - lo) / ((hi - lo) || 1);
    return `<polyline class="${key}" fill="none" stroke="${colour}" stroke-width="2" points="` +
      logs.map((v, i) => x(i).toFixed(1) + "," + y(v).toFixed(1)).join(" ") + '"/>';
  };
  document.getElementById("chart").innerHTML = `<svg xmlns="http://www.w3.org/2000/svg" width="${w}" height="${h}" font-size="11">` +
    `<line x1="${pad}" y1="${h - pad}" x2="${w - 10}" y2="${h - pad}" stroke="#000"/><line x1="${pad}" y1="10" x2="${pad}" y2="${h - pad}" stroke="#000"/>` +
    line("sse", "#4c78a8") + line("shift", "#f58518") +
    `<text x="${pad + 6}" y="20" fill="#4c78a8">SSE ${its[its.length - 1].sse.toPrecision(6)}</text>` +
    `<text x="${pad + 6}" y="34" fill="#f58518">shift ${its[its.length - 1].shift.toPrecision(4)}</text>` +
    `<text x="${pad + 6}" y="48" fill="#555">moved ${its[its.length - 1].moved}</text>` +
    `<text x="${w / 2}" y="${h - 12}" text-anchor="middle">iteration 1 to ${its.length}</text></svg>`;
}

function clusters(d) {
  const steps = d.centroids, points = d.plot, w = 420, h = 320, pad = 20;
  if (!steps.length) { document.getElementById("clusters").innerHTML = '<p class="muted">no centroids yet</p>'; return; }
  const all = points.concat(...steps), xs = all.map(p => p[0]), ys = all.map(p => p.length > 1 ? p[1] : 0);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const sx = v => pad + (w - 2 * pad) * (v - x0) / ((x1 - x0) || 1), sy = v => h - pad - (h - 2 * pad) * (v - y0) / ((y1 - y0) || 1);
  const last = steps[steps.length - 1], hue = k => Math.round(360 * k / last.length);
  const nearest = p => last.reduce((best, c, k) => { const dd = (p[0] - c[0]) ** 2 + ((p[1] || 0) - (c[1] || 0)) ** 2;
    return dd < best[0] ? [dd, k] : best; }, [Infinity, 0])[1];
  const out = [`<svg xmlns="http://www.w3.org/2000/svg" width="${w}" height="${h}">`];
  for (const p of points) out.push(`<circle cx="${sx(p[0]).toFixed(1)}" cy="${sy(p[1] || 0).toFixed(1)}" r="2" fill="hsl(${hue(nearest(p))},70%,45%)" fill-opacity="0.5"/>`);
  last.forEach((_, k) => {
    const path = steps.map(step => sx(step[k][0]).toFixed(1) + "," + sy(step[k][1] || 0).toFixed(1)).join(" ");
    out.push(`<polyline class="path" points="${path}" fill="none" stroke="hsl(${hue(k)},70%,35%)" stroke-width="2"/>`);
    out.push(`<circle class="centroid" cx="${sx(last[k][0]).toFixed(1)}" cy="${sy(last[k][1] || 0).toFixed(1)}" r="6" fill="hsl(${hue(k)},70%,45%)" stroke="#000"/>`);
  });
  out.push("</svg>");
  document.getElementById("clusters").innerHTML = out.join("");
}

if (EMBEDDED) {
  render(EMBEDDED);
} else {
  const tick = () => fetch(api("api/job"), {cache: "no-store"}).then(r => r.json()).then(d => {
    render(d); if (d.state === "running") setTimeout(tick, 1000);
  }).catch(() => set("state", "(the job has ended: its page is closed)"));
  tick();
}
</script></body></html>
"""


# ####################################################################################################
# Command line
# ####################################################################################################


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line and exit code 2."""

    def error(self, message):
        raise InputError(message)


def addresses(text):
    """'host:port,host:port' as a list."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    for item in items:
        host, _, port = item.rpartition(":")
        if not host or port_number(port) is None:
            raise argparse.ArgumentTypeError(f"{item!r} is not host:port")
    if not items:
        raise argparse.ArgumentTypeError("no address given")
    return items


def one_address(text):
    """'host:port', one."""
    items = addresses(text)
    if len(items) != 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not one host:port")
    return items[0]


def advertise_spec(text):
    """'host', 'host:port', '[v6]' or '[v6]:port' as (host, port or None)."""
    host, port = text, None
    if text.startswith("[") and "]:" in text or not text.startswith("[") and text.count(":") == 1:
        host, _, port = text.rpartition(":")
        port = port_number(port)
        if port is None:
            raise argparse.ArgumentTypeError(f"{text!r} is not HOST[:PORT]")
    if not host or ":" in host and not host.startswith("["):
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST[:PORT] ([...] around an IPv6 address)")
    return host, port


EXAMPLES = """examples:
  python kmr.py --role master -M 3 -R 2 -K 2 -n 20            the bundled sample, 5 spawned workers
  python kmr.py --role master -K 5 --input pts.txt --init k-means++ --restarts 30 --plot run.svg
  python kmr.py --role master -K 8 --input big.txt --combiner --summary run.json -q
  python kmr.py --role mapper --port 6001                     a standalone worker (also: reducer)
  python kmr.py --role master --mapper-addrs h1:6001,h2:6001 --reducer-addrs h3:6101 --token T
  python kmr.py --role master --listen 0.0.0.0:7077 --min-mappers 2 --token T   workers join it ...
  python kmr.py --role mapper --host 0.0.0.0 --port 6001 --join h0:7077 --token T   ... like this (Ctrl-C leaves)
  python kmr.py --role master --fail-prob 0.5                 the failure drill: half of all tasks fail
  python kmr.py --role master --fail-prob 0.3 --timeline t.svg   the drill in time, a lane per worker
  python kmr.py --role master --crash mapper:1:after-map:2    mapper 1 dies after its Map of iteration 2
"""


def parse_args(argv=None):
    """The command line of every role."""
    parser = ArgumentParser(prog="kmr.py", description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    parser.add_argument("--role", choices=["master", "mapper", "reducer"], required=True)
    parser.add_argument("--data-dir", default="Data", help="where a run writes everything (default Data)")
    parser.add_argument("--rpc-timeout", type=float, default=RPC_TIMEOUT,
                        help="deadline of every task RPC, seconds (default 300; heartbeats find a lost "
                             "worker long before)")
    parser.add_argument("--heartbeat", type=float, default=HEARTBEAT, metavar="S",
                        help="a worker holding a task (for reducers: a mapper they fetch from) that answers "
                             "no ping for S seconds is lost (default 2)")
    master = parser.add_argument_group("master")
    master.add_argument("-M", type=int, default=3, help="map tasks (default 3)")
    master.add_argument("-R", type=int, default=2, help="reduce tasks = partitions (default 2)")
    master.add_argument("-K", type=int, default=2, help="clusters (default 2)")
    master.add_argument("-n", type=int, default=20, help="iterations at most (default 20)")
    master.add_argument("--input", default="points.txt", help="points, one 'x,y,...' per line")
    master.add_argument("--seed", type=int, help="seed of the initial draw (default: random, logged)")
    master.add_argument("--init", default="random", metavar="random|k-means++|'k-means||'|FILE",
                        help="initial centroids: K distinct input points at random (default), "
                             "k-means++ (distributed, K - 1 passes), 'k-means||' (quoted for the shell; 6 passes), "
                             "or a file of K centroids")
    master.add_argument("--restarts", type=int, default=1,
                        help="complete runs from different seeds; the lowest final SSE wins (default 1)")
    master.add_argument("--plot", metavar="FILE.svg", help="draw the clusters and centroid paths as SVG")
    master.add_argument("--summary", metavar="FILE.json", help="write parameters and per-iteration numbers")
    master.add_argument("--timeline", metavar="FILE.svg",
                        help="draw every task attempt in time, a lane per worker, as SVG")
    master.add_argument("--ui", type=ui_address, metavar="[HOST:]PORT",
                        help="serve the job's live page while it runs (port 0: any free port; default host "
                             "127.0.0.1, on any other the job's token is required); the URL is printed")
    master.add_argument("--ui-drills", action="store_true",
                        help="the live page may kill, hang or slow workers this master spawned (classroom drills)")
    master.add_argument("--report", metavar="FILE.html",
                        help="write the job page at the end, as one self-contained file")
    display = master.add_mutually_exclusive_group()
    display.add_argument("-q", "--quiet", action="store_true", help="print only the result (and errors)")
    display.add_argument("--compact", action="store_true",
                         help="one line per iteration instead of every call and reply (for big jobs)")
    display.add_argument("-v", "--verbose", action="store_true",
                         help="also pings, spawns and every other line of dump.txt on the console")
    master.add_argument("--tol", type=float, default=0.0,
                        help="stop when no centroid moved more than this (default 0: a fixed point)")
    master.add_argument("--mapper-addrs", type=addresses, help="running mappers host:port,... (no spawning)")
    master.add_argument("--reducer-addrs", type=addresses, help="running reducers host:port,...")
    master.add_argument("--listen", type=ui_address, metavar="[HOST:]PORT",
                        help="let workers join (--join) at this address (default host 127.0.0.1; the token is "
                             "required); no worker is spawned unless --spawn says so")
    master.add_argument("--spawn", choices=["mappers", "reducers", "both"],
                        help="with --listen: spawn M mappers, R reducers or both besides those that join")
    master.add_argument("--min-mappers", type=int, default=1, metavar="N",
                        help="with --listen: start once N mappers are here, joined or not (default 1)")
    master.add_argument("--min-reducers", type=int, default=1, metavar="N",
                        help="with --listen: start once N reducers are here (default 1)")
    master.add_argument("--combiner", action="store_true",
                        help="mappers pre-sum each cluster (exactly) so partitions carry sums, not points")
    master.add_argument("--resume", action="store_true",
                        help="continue a job (the same command) after the last iteration it completed, "
                             "from the checkpoint in the data dir (after the master was killed, say)")
    master.add_argument("--max-attempts", type=int,
                        help="tries per task per iteration (default 4; under --fail-prob P: the fewest A "
                             "with T x P^A < 1e-6, T = M+R per iteration plus M per Weigh pass, times "
                             "restarts, so a drill fails by bad luck with probability below 1e-6)")
    master.add_argument("--crash", type=crash_spec, action="append", default=[], metavar="ROLE:I:PHASE:IT",
                        help="make spawned worker I die by SIGKILL at PHASE (start, map, after-map, reduce, "
                             "after-reduce) of iteration IT (0 for start); repeatable (failure drills)")
    master.add_argument("--slow-start", type=slow_start_spec, action="append", default=[], metavar="ROLE:I:S",
                        help="make spawned worker I wait S seconds before it listens; repeatable (a drill)")
    master.add_argument("--start-timeout", type=float, default=START_TIMEOUT, metavar="S",
                        help="longest wait for a spawned worker that is alive to start listening (default 300; "
                             "one that exits is reported at once)")
    worker = parser.add_argument_group("mapper and reducer")
    worker.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    worker.add_argument("--port", type=int, default=0, help="port to bind (default 0: any free port)")
    worker.add_argument("--input-root", help="mappers read input only below this folder (default: the "
                                             "working directory; for spawned mappers the input's folder)")
    worker.add_argument("--max-jobs", type=int, default=MAX_JOBS,
                        help="jobs (masters) served at once; a further one is refused until one ends (default 8)")
    worker.add_argument("--max-memory", type=float, metavar="GIB",
                        help="refuse a new job while the jobs served hold this much in parsed splits and map "
                             "outputs (default: half the machine's memory)")
    worker.add_argument("--join", type=one_address, metavar="MASTER_HOST:PORT",
                        help="join the master listening there (--listen), asking again until it is up")
    worker.add_argument("--advertise", type=advertise_spec, metavar="HOST[:PORT]",
                        help="with --join: the address the master and reducers reach this worker on, where it "
                             "differs from --host/--port (default: --host, or for 0.0.0.0 the address it joins from)")
    worker.add_argument("--leave-timeout", type=float, default=LEAVE_TIMEOUT, metavar="S",
                        help="with --join: after SIGTERM or Ctrl-C, wait at most S s to be released (default 120; "
                             "a second signal leaves at once)")
    worker.add_argument("--job-expiry", type=float, default=JOB_EXPIRY, metavar="S",
                        help="drop the state of a job whose master has been silent this long (default 60; a "
                             "running master pings its workers every 10 s)")
    shared = parser.add_argument_group("every role")
    shared.add_argument("--token", default=os.environ.get("KMR_TOKEN", ""),
                        help="shared secret every RPC must carry (default $KMR_TOKEN; none: no check)")
    shared.add_argument("--tls-cert", metavar="PEM", help="workers: serve TLS with this certificate "
                        "(the master hands it to the workers it spawns)")
    shared.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    shared.add_argument("--tls-ca", metavar="PEM", help="clients (master, reducers): speak TLS to workers "
                        "and trust only certificates signed by this CA")
    shared.add_argument("--join-timeout", type=float, default=JOIN_TIMEOUT, metavar="S",
                        help="master with --listen: longest wait for --min-mappers/--min-reducers; worker with "
                             "--join: longest wait for a master to take it (default 300)")
    shared.add_argument("--fail-prob", type=float, default=0.0,
                        help="each task a worker gets fails with this probability (failure drills)")
    shared.add_argument("--fail-seed", type=int, help="seed of --fail-prob draws")
    args = parser.parse_args(argv)
    checks = [("-M", args.M, 1, MAX_WORKERS), ("-R", args.R, 1, MAX_WORKERS), ("-K", args.K, 1, MAX_CLUSTERS),
              ("--restarts", args.restarts, 1, MAX_RESTARTS),
              ("-n", args.n, 0, 10**6), ("--port", args.port, 0, 65535),
              ("--max-attempts", 1 if args.max_attempts is None else args.max_attempts, 1, 10**6),
              ("--max-jobs", args.max_jobs, 1, 1000), ("--min-mappers", args.min_mappers, 1, MAX_MEMBERS),
              ("--min-reducers", args.min_reducers, 1, MAX_MEMBERS)]
    for flag, value, low, high in checks:
        if not low <= value <= high:
            raise InputError(f"{flag} must be between {low} and {high}, got {value}")
    if not (math.isfinite(args.tol) and args.tol >= 0):
        raise InputError(f"--tol must be a finite number >= 0, got {args.tol}")
    for flag, value in (("--rpc-timeout", args.rpc_timeout), ("--heartbeat", args.heartbeat),
                        ("--start-timeout", args.start_timeout), ("--job-expiry", args.job_expiry),
                        ("--join-timeout", args.join_timeout), ("--leave-timeout", args.leave_timeout),
                        ("--max-memory", 1.0 if args.max_memory is None else args.max_memory)):
        if not (math.isfinite(value) and value > 0):
            raise InputError(f"{flag} must be > 0, got {value}")
    args.tls = tls_files(args)
    check_joining(args)
    if args.restarts > 1 and args.init not in INITS:
        raise InputError("--restarts needs --init random, k-means++ or k-means|| (every run from a file is the same)")
    if args.ui_drills and args.ui is None:
        raise InputError("--ui-drills needs --ui")
    for flag, path in (("--plot", args.plot), ("--summary", args.summary), ("--timeline", args.timeline),
                       ("--report", args.report)):
        if path and (os.path.isdir(path) or not os.path.isdir(os.path.dirname(os.path.abspath(path)))):
            raise InputError(f"{flag} {path}: not a file in an existing folder")
    if not all(" " <= char <= "~" for char in args.token):
        raise InputError("--token / KMR_TOKEN must be printable ASCII (it travels as gRPC metadata)")
    if not 0 <= args.fail_prob < 1:
        raise InputError(f"--fail-prob must be in [0, 1), got {args.fail_prob}")
    if args.input_root is not None and not os.path.isdir(args.input_root):
        raise InputError(f"--input-root {args.input_root} is not a folder")
    if args.role == "master" and args.input_root is not None and args.mapper_addrs is None and \
            resolve_input(os.path.abspath(args.input), args.input_root) is None:
        raise InputError(f"--input {args.input} is outside --input-root {args.input_root}")
    for flag, role, index in [("--crash", role, index) for role, index, _, _ in args.crash] + \
            [("--slow-start", role, index) for role, index, _ in args.slow_start]:
        if index > (args.M if role == "mapper" else args.R):
            raise InputError(f"{flag} {role}:{index}: there is no {role} {index}")
    return args


SPAWNED = {None: (), "mappers": ("mapper",), "reducers": ("reducer",), "both": ("mapper", "reducer")}   # --spawn


def check_joining(args):
    """The flags of joining (--listen, --join and theirs) make sense together."""
    master_only = [flag for flag, given in (("--listen", args.listen), ("--spawn", args.spawn),
                                            ("--min-mappers", args.min_mappers != 1),
                                            ("--min-reducers", args.min_reducers != 1)) if given]
    if args.role != "master" and master_only:
        raise InputError(f"{master_only[0]} is for the master")
    if args.role == "master" and (args.join or args.advertise):
        raise InputError("--join and --advertise are for mappers and reducers")
    if args.listen is None and master_only:
        raise InputError(f"{master_only[0]} needs --listen")
    if args.advertise and not args.join:
        raise InputError("--advertise needs --join")
    if args.listen:
        if not args.token:
            raise InputError("--listen needs --token (or KMR_TOKEN, the same on every worker): a join needs the token")
        if args.tls is not None and not args.tls.cert:
            raise InputError("--listen with TLS needs --tls-cert/--tls-key: workers join over TLS too")


def advertised(args, port):
    """The address a joining worker registers: --advertise (its port defaulting to the bound one), else
    --host and the bound port; no host for a wildcard --host (the master takes the address it joined from)."""
    if args.advertise:
        host, given = args.advertise
        return f"{host}:{given or port}"
    host = "" if args.host in ("0.0.0.0", "::", "") else f"[{args.host}]" if ":" in args.host else args.host
    return f"{host}:{port}"


def tls_files(args):
    """The TLS material the flags name, read once (None without TLS flags)."""
    paths = {"cert": args.tls_cert, "key": args.tls_key, "ca": args.tls_ca}
    if not any(paths.values()):
        return None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise InputError("--tls-cert and --tls-key go together")
    if args.role == "master" and not args.tls_ca:
        raise InputError("the master needs --tls-ca to verify its workers")
    material = {}
    for name, path in paths.items():
        if path:
            try:
                with open(path, "rb") as pem:
                    material[name] = pem.read()
            except OSError as error:
                raise InputError(f"--tls-{name} {path}: {error.strerror}") from None
            if b"-----BEGIN" not in material[name]:
                raise InputError(f"--tls-{name} {path}: not a PEM file")
    if args.tls_cert:
        try:   # a certificate and a key that do not belong together would fail later, less clearly
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(args.tls_cert, args.tls_key)
        except ssl.SSLError as error:
            raise InputError(f"--tls-cert {args.tls_cert} and --tls-key {args.tls_key} do not go together: "
                             f"{error.reason or error}") from None
    return TlsFiles(**material)


def crash_spec(text):
    """'mapper:2:after-map:3' as ('mapper', 2, 'after-map', 3)."""
    parts = text.split(":")
    if len(parts) != 4 or parts[0] not in ("mapper", "reducer") or parts[2] not in (START_CRASH, *CRASH_PHASES) \
            or not parts[1].isdigit() or not parts[3].isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not ROLE:INDEX:PHASE:ITERATION, PHASE one of "
                                         f"{', '.join((START_CRASH, *CRASH_PHASES))}")
    return parts[0], int(parts[1]), parts[2], int(parts[3])


def slow_start_spec(text):
    """'mapper:2:40' as ('mapper', 2, 40.0)."""
    parts = text.split(":")
    try:
        if len(parts) != 3 or parts[0] not in ("mapper", "reducer") or not parts[1].isdigit():
            raise ValueError
        seconds = float(parts[2])
        if not 0 <= seconds <= 3600:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not ROLE:INDEX:SECONDS (0 to 3600)") from None
    return parts[0], int(parts[1]), seconds


def run_master(args):
    """The master role: run the job and print the final centroids on stdout."""
    log_path = os.path.join(args.data_dir, "dump.txt")
    try:
        if args.resume:   # the interrupted run's log goes on
            os.makedirs(args.data_dir, exist_ok=True)
        else:
            write_atomic(log_path, "")
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):   # the disk, not the command
            raise JobError(f"cannot write {log_path}: {error.strerror}") from None
        raise InputError(f"cannot write to {args.data_dir}: {error.strerror}") from None
    setup_logging("master", log_path, logging.WARNING if args.quiet else logging.INFO if args.compact else
                  logging.DEBUG if args.verbose else DETAIL)
    options = JobOptions(input_path=args.input, mappers=args.M, reducers=args.R, clusters=args.K,
                         iterations=args.n, data_dir=args.data_dir, seed=args.seed, init=args.init,
                         restarts=args.restarts, plot_points=PLOT_POINTS if args.plot or args.ui or args.report else 0,
                         tol=args.tol,
                         mapper_addrs=args.mapper_addrs, reducer_addrs=args.reducer_addrs,
                         rpc_timeout=args.rpc_timeout, heartbeat=args.heartbeat, tls=args.tls,
                         max_attempts=args.max_attempts, token=args.token,
                         input_root=args.input_root, combine=args.combiner, fail_prob=args.fail_prob,
                         fail_seed=args.fail_seed, crashes=args.crash, resume=args.resume,
                         slow_starts=args.slow_start, start_timeout=args.start_timeout, ui=args.ui,
                         ui_drills=args.ui_drills, report=args.report, listen=args.listen,
                         spawn=("mapper", "reducer") if args.listen is None else SPAWNED[args.spawn],
                         min_workers={"mapper": args.min_mappers, "reducer": args.min_reducers},
                         join_timeout=args.join_timeout)
    result = run_job(options)
    reports = [(args.summary, lambda: json.dumps(summary(result, options), indent=2) + "\n"),
               (args.plot, lambda: plot_svg(result)), (args.timeline, lambda: timeline_svg(result)),
               (args.report, lambda: page_html(result.page))]
    for path, render in reports:
        if path:
            try:
                write_atomic(path, render())
            except OSError as error:
                raise JobError(f"cannot write {path}: {error.strerror}") from None
            log.info("wrote %s", path)
    sys.stdout.write(format_centroids(result.centroids))
    return 0


def run_worker(args):
    """The mapper or reducer role, standalone: serve until SIGTERM or Ctrl-C."""
    try:
        setup_logging(args.role, os.path.join(args.data_dir, f"{args.role}-{os.getpid()}.log"),
                      logging.DEBUG if args.verbose else logging.INFO)
    except OSError as error:
        raise InputError(f"cannot write to {args.data_dir}: {error.strerror}") from None
    settings = WorkerSettings.of(args, input_root=args.input_root or os.getcwd(),
                                 max_bytes=None if args.max_memory is None else int(args.max_memory * 2**30))
    server, port, handlers = start_server(args.role, args.host, args.port, settings)
    log.info("%s listening on %s:%d%s", args.role, args.host, port, "" if args.token else " (no token)")
    print(f"{args.host}:{port}", flush=True)
    if args.join is None:
        serve_until_stopped(server, handlers, lambda: False)
        return 0
    return Membership(args.join, args.role, advertised(args, port), settings, args.join_timeout,
                      args.leave_timeout).serve(server, handlers)


def main(argv=None):
    """Run one role; every expected failure ends in one line on stderr and an exit code."""
    def on_sigterm(signum, frame):
        raise Terminated()

    if MISSING:
        return report(MISSING, EXIT_RUNTIME)
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
    except WriteFailed as error:   # the disk filled up, ...: the previous file is still whole
        return report(f"cannot write {error.filename}: {error.strerror}", EXIT_RUNTIME)
    except OSError as error:   # the data dir vanished, ...
        return report(f"{error.filename or 'I/O'}: {error.strerror}", EXIT_RUNTIME)


def report(error, code):
    """One error line on stderr (and in dump.txt when logging is on); returns the exit code."""
    message = f"kmr: error: {error}"
    release_console(show=code != EXIT_USAGE)   # bad input: its one line, nothing before it
    if log.handlers:
        for handler in log.handlers:
            if isinstance(handler, logging.FileHandler):
                handler.emit(logging.makeLogRecord({"msg": message, "levelno": logging.ERROR}))
    print(message, file=sys.stderr)
    return code


if __name__ == "__main__":
    status = main()
    logging.shutdown()
    with contextlib.suppress(OSError):   # a reader that went away: there is no one left to tell
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(status)   # workers stopped, files written, logs flushed: skip tearing down gRPC and the interpreter (~35 ms)
