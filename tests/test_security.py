"""kmr keeps strangers out: loopback-only workers, a shared token, an input root, checked requests.

Workers are real `kmr.py --role mapper|reducer` processes (conftest.StandaloneWorker / WorkerPool),
always stopped in a `finally`; master runs go through conftest.run_kmr / MasterProcess, which prove
that nothing is left running.  Direct RPCs use the generated stubs on an insecure loopback channel,
every call with a deadline, and assert on the gRPC status code.  Only 127.0.0.1 and OS-assigned
ports are used (the one exception only *connects* to another local address of this machine, to
prove a worker cannot be reached there).
"""

import functools
import ipaddress
import math
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

import kmeans_pb2 as pb
import kmeans_pb2_grpc as pb_grpc
import kmr
from conftest import (DATA, MasterProcess, StandaloneWorker, WorkerPool, centroid_lines, other_kmr, read_points,
                      run_kmr, wait_for_line, write_points)

TOKEN = "s3cret"
RPC = 10            # deadline of every direct call, seconds
MASTER_RPC = 20     # --rpc-timeout of master runs; a refused run must end well before it
CASE1, CASE1_INIT = DATA / "case1_points.txt", DATA / "case1_init.txt"
POINTS = [(float(i), float(i % 3)) for i in range(10)]    # 10 points of dimension 2


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------


@contextmanager
def stub(address, role="mapper"):
    """A Mapper or Reducer stub on its own channel, closed afterwards."""
    channel = grpc.insecure_channel(address)
    try:
        yield (pb_grpc.MapperStub if role == "mapper" else pb_grpc.ReducerStub)(channel)
    finally:
        channel.close()


def auth(token):
    """Call metadata carrying a token (None: no metadata at all)."""
    return () if token is None else ((kmr.TOKEN_KEY, token),)


def invoke(address, role, method, request, token=None):
    """One RPC with a deadline; a streaming GetPartition is read to the end (a list of chunks)."""
    with stub(address, role) as service:
        answer = getattr(service, method)(request, timeout=RPC, metadata=auth(token))
        return list(answer) if method == "GetPartition" else answer


def refusal(address, role, method, request, token=None):
    """The status code a call is refused with (fails the test if the call is served)."""
    with pytest.raises(grpc.RpcError) as refused:
        invoke(address, role, method, request, token)
    return refused.value.code()


def centroids(*rows):
    """A pb.Centroids of the given rows."""
    return pb.Centroids(dim=len(rows[0]), values=[x for row in rows for x in row])


def map_request(input_path, **changes):
    """A valid map task over all of POINTS (a fresh job each time) with some fields changed."""
    fields = dict(job=f"test-{uuid.uuid4().hex[:8]}", run=1, iteration=1, task=1, attempt=1,
                  input_path=str(input_path), start=0, end=len(POINTS), reducers=2, input=points_identity(),
                  centroids=centroids((0.0, 0.0), (9.0, 2.0)))
    fields.update(changes)
    return pb.MapRequest(**fields)


@functools.cache
def points_identity():
    """The pinned identity of a file of POINTS: every copy of it (each test folder has one) matches it."""
    with tempfile.TemporaryDirectory() as folder:
        write_points(Path(folder) / "points.txt", POINTS)
        return kmr.identity_message(kmr.input_identity(Path(folder) / "points.txt"))


def reduce_request(**changes):
    """A well-formed reduce task (its mapper address does not exist: only checks are reached)."""
    fields = dict(job="test-reduce", iteration=1, partition=1, attempt=1, dim=2, clusters=2,
                  outputs=[pb.MapOutput(task=1, address="127.0.0.1:1")])
    fields.update(changes)
    return pb.ReduceRequest(**fields)


def partition_request(job="test-none", iteration=1, task=1, partition=1):
    return pb.PartitionRequest(job=job, run=1, iteration=iteration, task=task, partition=partition)


def assert_one_error_line(result, code=1):
    """Exit code, exactly one 'kmr: error:' line (the last line of stderr), no traceback; the line."""
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("kmr: error:")]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert result.returncode == code, result.stderr
    return errors[0]


def reference_lines(points_path, init_path, iterations=100):
    """The answer of the sequential reference, as sorted centroid lines."""
    expected, _ = kmr.kmeans_reference(read_points(points_path), read_points(init_path), iterations)
    return centroid_lines(kmr.format_centroids(expected))


def listening_addresses(port):
    """Local addresses of the TCP sockets in LISTEN state on `port` (from /proc/net/tcp and tcp6)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].split(":")
            if fields[3] != "0A" or int(port_hex, 16) != port:   # 0A: TCP_LISTEN
                continue
            raw = bytes.fromhex(address)   # 32-bit words in host (little-endian) order
            found.append(ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))))
    return found


def is_loopback(address):
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def other_local_address():
    """A non-loopback IPv4 address of this machine, or None (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.123", 9))
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if ipaddress.ip_address(address).is_loopback else address


def connects(host, port):
    """Whether a TCP connection to host:port is accepted."""
    try:
        with socket.create_connection((host, port), timeout=3):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------
# shared workers: token-guarded ones, and ones confined to an input root
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def no_ambient_token():
    """Workers and masters here get a token only where a test says so, not from the caller's $KMR_TOKEN."""
    saved = os.environ.pop("KMR_TOKEN", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["KMR_TOKEN"] = saved


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """Two mappers and a reducer started with --token s3cret; their input root is their folder."""
    folder = tmp_path_factory.mktemp("guarded")
    write_points(folder / "points.txt", POINTS)
    shutil.copy(CASE1, folder / "case1_points.txt")
    pool = WorkerPool(folder, 2, 1, "--token", TOKEN)
    pool.folder = folder
    try:
        yield pool
    finally:
        pool.stop()


@pytest.fixture(scope="module")
def rooted(tmp_path_factory):
    """Two mappers and a reducer with --input-root BASE/root, and files inside and outside that root.

    BASE/root/points.txt        inside
    BASE/outside.txt            outside, next to the root
    BASE/root2/points.txt       outside, in a folder whose name starts like the root's
    BASE/root/link.txt          a symlink inside the root to BASE/outside.txt
    BASE/root/linked_dir        a symlink inside the root to BASE/root2
    """
    base = tmp_path_factory.mktemp("rooted")
    root, work = base / "root", base / "work"
    for folder in (root, work, base / "root2"):
        folder.mkdir()
    write_points(root / "points.txt", POINTS)
    write_points(base / "outside.txt", POINTS)
    write_points(base / "root2" / "points.txt", POINTS)
    (root / "link.txt").symlink_to(base / "outside.txt")
    (root / "linked_dir").symlink_to(base / "root2", target_is_directory=True)
    pool = WorkerPool(work, 2, 1, "--input-root", str(root))
    try:
        yield SimpleNamespace(pool=pool, base=base, root=root, work=work, mapper=pool.mappers[0])
    finally:
        pool.stop()


# ---------------------------------------------------------------------------------------------------
# 1. workers listen on loopback only
# ---------------------------------------------------------------------------------------------------


def test_standalone_workers_print_a_loopback_address_by_default(tmp_path):
    """Without --host a worker must announce 127.0.0.1, the only address it should be reachable on."""
    pool = WorkerPool(tmp_path, 1, 1)
    try:
        addresses = pool.mappers + pool.reducers
    finally:
        pool.stop()
    assert all(re.fullmatch(r"127\.0\.0\.1:\d+", address) for address in addresses), addresses


def test_standalone_workers_do_not_listen_on_other_addresses(tmp_path):
    """An unauthenticated worker on 0.0.0.0 would serve the whole network: it must bind loopback only."""
    pool = WorkerPool(tmp_path, 1, 1)
    other = other_local_address()
    try:
        for address in pool.mappers + pool.reducers:
            port = int(address.rsplit(":", 1)[1])
            bound = listening_addresses(port)
            assert bound, f"nothing listens on port {port}"
            assert all(is_loopback(a) for a in bound), f"port {port} listens on {bound}"
            assert connects("127.0.0.1", port)
            if other is not None:   # this machine has another address: the worker must not answer there
                assert not connects(other, port), f"worker at {address} is reachable on {other}"
    finally:
        pool.stop()


# ---------------------------------------------------------------------------------------------------
# 2. the shared token
# ---------------------------------------------------------------------------------------------------

GUARDED_CALLS = {
    "mapper-Ping": ("mapper", "Ping", lambda: pb.PingRequest()),
    "mapper-Map": ("mapper", "Map", lambda: map_request("points.txt")),
    "mapper-GetPartition": ("mapper", "GetPartition", lambda: partition_request()),
    "reducer-Ping": ("reducer", "Ping", lambda: pb.PingRequest()),
    "reducer-Reduce": ("reducer", "Reduce", lambda: reduce_request()),
    "reducer-GetResult": ("reducer", "GetResult",
                          lambda: pb.ResultRequest(job="test-none", iteration=1, partition=1)),
}


def guarded_address(pool, role):
    return pool.mappers[0] if role == "mapper" else pool.reducers[0]


@pytest.mark.parametrize("token", [None, "", "wrong", "s3cre", "s3cret2", "S3CRET"],
                         ids=["no-metadata", "empty", "wrong", "prefix", "longer", "other-case"])
@pytest.mark.parametrize("call", list(GUARDED_CALLS))
def test_worker_with_token_refuses_calls_without_the_right_token(guarded, call, token):
    """Every RPC of both services must be refused (UNAUTHENTICATED) unless it carries the exact token."""
    role, method, request = GUARDED_CALLS[call]
    code = refusal(guarded_address(guarded, role), role, method, request(), token)
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_worker_with_token_serves_calls_with_the_right_token(guarded):
    """The token must let the master (and reducers) in: Ping, Map and GetPartition all work."""
    mapper, reducer = guarded.mappers[0], guarded.reducers[0]
    assert invoke(mapper, "mapper", "Ping", pb.PingRequest(), TOKEN).role == "mapper"
    assert invoke(reducer, "reducer", "Ping", pb.PingRequest(), TOKEN).role == "reducer"
    request = map_request("points.txt")
    response = invoke(mapper, "mapper", "Map", request, TOKEN)
    assert response.status.success and response.reply.points == len(POINTS)
    chunks = invoke(mapper, "mapper", "GetPartition", partition_request(request.job), TOKEN)
    records = [r for chunk in chunks for r in kmr.decode_chunk(chunk, request.centroids.dim)]
    assert sum(count for _, count, _ in records) == response.reply.partition_points[0]


def test_refused_map_call_does_no_work(guarded):
    """A call without the token is stopped before the servicer: no map output appears for its job."""
    request = map_request("points.txt", task=7)
    assert refusal(guarded.mappers[0], "mapper", "Map", request, "wrong") == \
        grpc.StatusCode.UNAUTHENTICATED
    assert refusal(guarded.mappers[0], "mapper", "GetPartition", partition_request(request.job, task=7),
                   TOKEN) == grpc.StatusCode.NOT_FOUND
    assert not (guarded.folder / "Mappers" / "M7").exists()


def test_worker_takes_its_token_from_KMR_TOKEN(tmp_path):
    """The token can stay off the command line (visible in ps): $KMR_TOKEN works like --token."""
    write_points(tmp_path / "points.txt", POINTS)
    worker = StandaloneWorker("mapper", tmp_path, env={"KMR_TOKEN": TOKEN})
    try:
        for token in (None, "wrong"):
            assert refusal(worker.address, "mapper", "Ping", pb.PingRequest(), token) == \
                grpc.StatusCode.UNAUTHENTICATED
        assert invoke(worker.address, "mapper", "Ping", pb.PingRequest(), TOKEN).role == "mapper"
        response = invoke(worker.address, "mapper", "Map", map_request("points.txt"), TOKEN)
        assert response.status.success
    finally:
        worker.stop()


def master_on(pool, tmp_path, *extra, env=None):
    """A master run of case 1 (K=2, from its init file) on a pool's standalone workers."""
    return run_kmr("--role", "master", "-M", 2, "-R", 1, "-K", 2, "-n", 100,
                   "--input", pool.folder / "case1_points.txt", "--init", CASE1_INIT,
                   "--mapper-addrs", ",".join(pool.mappers), "--reducer-addrs", ",".join(pool.reducers),
                   "--data-dir", tmp_path / "out", "--rpc-timeout", MASTER_RPC, *extra,
                   cwd=tmp_path, env=env)


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_master_with_the_right_token_runs_the_job(guarded, tmp_path, how):
    """A master holding the token (--token or $KMR_TOKEN) gets exactly the reference centroids."""
    if how == "flag":
        result = master_on(guarded, tmp_path, "--token", TOKEN)
    else:
        result = master_on(guarded, tmp_path, env={"KMR_TOKEN": TOKEN})
    assert result.returncode == 0, result.stderr
    assert centroid_lines(result.stdout) == reference_lines(CASE1, CASE1_INIT)


@pytest.mark.parametrize("token", [None, "wrong"], ids=["missing", "wrong"])
def test_master_with_a_wrong_or_missing_token_stops_at_once_with_one_line(guarded, tmp_path, token):
    """A refused token is no transient fault: one clear line, exit 1, no retrying until the deadline."""
    extra = () if token is None else ("--token", token)
    started = time.monotonic()
    result = master_on(guarded, tmp_path, *extra, env={"KMR_TOKEN": ""})
    elapsed = time.monotonic() - started
    line = assert_one_error_line(result, 1)
    assert "token" in line.lower(), line
    assert elapsed < MASTER_RPC / 2, f"took {elapsed:.1f} s with --rpc-timeout {MASTER_RPC}"
    assert not (tmp_path / "out" / "centroids.txt").exists()


def test_a_master_refuses_a_worker_that_runs_another_kmr_py_in_one_line(guarded, tmp_path):
    """Splits measured or drawn by two versions would not add up to one job's answer: a master takes only
    workers whose kmr.py is its own (PingReply.code), and says which one is not, before any task."""
    other = StandaloneWorker("mapper", guarded.folder, "--token", TOKEN, script=other_kmr(tmp_path / "other"))
    try:
        result = run_kmr("--role", "master", "-M", 2, "-R", 1, "-K", 2, "-n", 100,
                         "--input", guarded.folder / "case1_points.txt", "--init", CASE1_INIT,
                         "--mapper-addrs", f"{guarded.mappers[0]},{other.address}",
                         "--reducer-addrs", guarded.reducers[0], "--token", TOKEN,
                         "--data-dir", tmp_path / "out", "--rpc-timeout", MASTER_RPC, cwd=tmp_path)
    finally:
        other.stop()
    line = assert_one_error_line(result, 1)
    assert line.startswith(f"kmr: error: {other.address} runs another kmr.py (code ") and \
        line.endswith(f", this master's {kmr.code_digest()}): start the workers from the master's kmr.py"), line
    assert not (tmp_path / "out" / "centroids.txt").exists()


def test_master_with_token_runs_end_to_end_on_workers_it_spawns(tmp_path):
    """The master hands its token to the workers it spawns, so a guarded run needs no extra setup."""
    result = run_kmr("--role", "master", "-M", 3, "-R", 2, "-K", 2, "-n", 100, "--input", CASE1,
                     "--init", CASE1_INIT, "--token", TOKEN, "--data-dir", tmp_path / "out",
                     "--rpc-timeout", MASTER_RPC, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert centroid_lines(result.stdout) == reference_lines(CASE1, CASE1_INIT)


def test_workers_spawned_by_a_master_with_token_refuse_strangers(tmp_path):
    """A spawned worker must enforce the token too (a run succeeding proves only that they agree).

    The master is held in its start-up by a reducer address nobody answers on, while the mapper it
    spawned is already up; the test calls that mapper directly, then stops the master.
    """
    with socket.socket() as silent:   # bound, never listening: connections are refused
        silent.bind(("127.0.0.1", 0))
        master = MasterProcess("--role", "master", "-M", 1, "-R", 1, "-K", 2, "-n", 5, "--input", CASE1,
                               "--init", CASE1_INIT, "--token", TOKEN, "--rpc-timeout", MASTER_RPC,
                               "--reducer-addrs", f"127.0.0.1:{silent.getsockname()[1]}",
                               "--data-dir", tmp_path / "out", cwd=tmp_path)
        try:
            found = wait_for_line(tmp_path / "out" / "dump.txt", r"spawned mapper 1, PID \d+, at (\S+)",
                                  timeout=MASTER_RPC, process=master.process)
            address = found.group(1)
            for token in (None, "wrong"):
                assert refusal(address, "mapper", "Ping", pb.PingRequest(), token) == \
                    grpc.StatusCode.UNAUTHENTICATED
            assert invoke(address, "mapper", "Ping", pb.PingRequest(), TOKEN).role == "mapper"
        finally:
            master.stop()


@pytest.mark.parametrize("token", ["sécret", "tab\there"], ids=["non-ascii", "control-char"])
def test_token_that_cannot_travel_as_grpc_metadata_is_refused_as_bad_usage(tmp_path, token):
    """gRPC metadata values are printable ASCII only: such a token can never be sent, so no worker
    holding it could ever be reached.  It must be refused up front (exit 2, one line naming the
    token), not end in a misleading "no mapper answers ...: INTERNAL" after the workers started.
    """
    result = run_kmr("--role", "master", "-M", 1, "-R", 1, "-K", 2, "--input", CASE1, "--init", CASE1_INIT,
                     "--token", token, "--data-dir", tmp_path / "out", "--rpc-timeout", MASTER_RPC,
                     cwd=tmp_path)
    line = assert_one_error_line(result, 2)
    assert "token" in line.lower(), line


# ---------------------------------------------------------------------------------------------------
# 3. the input root
# ---------------------------------------------------------------------------------------------------


def test_mapper_serves_a_file_inside_its_input_root(rooted):
    """Inside the root, by absolute or relative path (relative to the root), a map task runs."""
    for path in (rooted.root / "points.txt", "points.txt", "./points.txt"):
        response = invoke(rooted.mapper, "mapper", "Map", map_request(path))
        assert response.status.success and response.reply.points == len(POINTS), path


@pytest.mark.parametrize("where", [
    "absolute-outside", "dotdot-in-absolute", "symlink-to-outside", "relative-dotdot",
    "prefix-sibling-folder", "symlinked-folder", "system-file",
])
def test_mapper_refuses_files_outside_its_input_root(rooted, where):
    """A stranger (or a wrong master) must not make a mapper read arbitrary files: PERMISSION_DENIED."""
    path = {
        "absolute-outside": rooted.base / "outside.txt",
        "dotdot-in-absolute": f"{rooted.root}/../outside.txt",
        "symlink-to-outside": rooted.root / "link.txt",
        "relative-dotdot": "../outside.txt",
        "prefix-sibling-folder": rooted.base / "root2" / "points.txt",
        "symlinked-folder": "linked_dir/points.txt",
        "system-file": "/etc/passwd",
    }[where]
    assert refusal(rooted.mapper, "mapper", "Map", map_request(path)) == grpc.StatusCode.PERMISSION_DENIED


def test_mapper_without_input_root_reads_only_below_its_working_directory(tmp_path):
    """The default root is the working directory, not the whole file system."""
    inside, outside = tmp_path / "cwd", tmp_path / "elsewhere"
    inside.mkdir()
    outside.mkdir()
    write_points(inside / "points.txt", POINTS)
    write_points(outside / "points.txt", POINTS)
    worker = StandaloneWorker("mapper", inside)
    try:
        assert invoke(worker.address, "mapper", "Map", map_request("points.txt")).status.success
        assert invoke(worker.address, "mapper", "Map", map_request(inside / "points.txt")).status.success
        for path in (outside / "points.txt", "../elsewhere/points.txt"):
            assert refusal(worker.address, "mapper", "Map", map_request(path)) == \
                grpc.StatusCode.PERMISSION_DENIED
    finally:
        worker.stop()


def test_master_reports_input_outside_the_mappers_root_in_one_line(rooted, tmp_path):
    """Mappers that may not read the input: the run stops at once with one clear line, exit 1."""
    init = write_points(tmp_path / "init.txt", POINTS[:2])
    started = time.monotonic()
    result = run_kmr("--role", "master", "-M", 2, "-R", 1, "-K", 2, "-n", 5,
                     "--input", rooted.base / "outside.txt", "--init", init,
                     "--mapper-addrs", ",".join(rooted.pool.mappers),
                     "--reducer-addrs", ",".join(rooted.pool.reducers),
                     "--data-dir", tmp_path / "out", "--rpc-timeout", MASTER_RPC, cwd=tmp_path)
    line = assert_one_error_line(result, 1)
    assert "outside the input root" in line, line
    assert time.monotonic() - started < MASTER_RPC / 2
    assert not (tmp_path / "out" / "centroids.txt").exists()


def test_mapper_refuses_a_path_with_a_nul_byte_as_a_bad_request(rooted):
    """A path no file system accepts is a bad request, refused like other bad paths, not an
    unhandled exception (UNKNOWN), which the master would take for a task failure worth retrying.
    """
    code = refusal(rooted.mapper, "mapper", "Map", map_request("points.txt\0../../etc/passwd"))
    assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED), code


# ---------------------------------------------------------------------------------------------------
# 4. request validation
# ---------------------------------------------------------------------------------------------------

BAD_MAP_REQUESTS = {
    "inverted-range": dict(start=5, end=2),
    "no-reducers": dict(reducers=0),
    "absurd-reducers": dict(reducers=2**32 - 1),
    "values-not-multiple-of-dim": dict(centroids=pb.Centroids(dim=2, values=[0.0, 0.0, 1.0])),
    "dim-zero": dict(centroids=pb.Centroids(dim=0, values=[0.0, 1.0])),
    "no-centroids": dict(centroids=pb.Centroids()),
    "absurd-dim": dict(centroids=pb.Centroids(dim=kmr.MAX_DIM + 1, values=[0.0] * (kmr.MAX_DIM + 1))),
    "nan-centroid": dict(centroids=centroids((math.nan, 0.0), (9.0, 2.0))),
    "infinite-centroid": dict(centroids=centroids((0.0, math.inf), (9.0, 2.0))),
    "nan-previous": dict(previous=centroids((math.nan, 0.0), (9.0, 2.0))),
    "previous-other-shape": dict(previous=centroids((0.0, 0.0))),
    "task-zero": dict(task=0),
    "iteration-zero": dict(iteration=0),
    "no-job": dict(job=""),
    "dim-mismatch-with-file": dict(centroids=centroids((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))),
}


@pytest.mark.parametrize("bad", list(BAD_MAP_REQUESTS))
def test_mapper_refuses_malformed_map_requests(rooted, bad):
    """A malformed task must be refused with INVALID_ARGUMENT, before it can crash or mislead a mapper."""
    request = map_request("points.txt", **BAD_MAP_REQUESTS[bad])
    assert refusal(rooted.mapper, "mapper", "Map", request) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("start, end", [(0, len(POINTS) + 5), (2**40, 2**40 + 1)], ids=["past-end", "far-past-end"])
def test_range_past_the_end_of_this_hosts_file_answers_failure_so_another_mapper_can_try(rooted, start, end):
    """The master counted the points; a mapper whose copy is shorter answers FAILURE (not a refusal),
    so the master re-assigns the task to a mapper whose copy is whole."""
    response = invoke(rooted.mapper, "mapper", "Map", map_request("points.txt", start=start, end=end), None)
    assert not response.status.success and "fewer than" in response.status.message


BAD_REDUCE_REQUESTS = {
    "dim-zero": dict(dim=0),
    "absurd-dim": dict(dim=kmr.MAX_DIM + 1),
    "clusters-zero": dict(clusters=0),
    "absurd-clusters": dict(clusters=kmr.MAX_CLUSTERS + 1),
    "no-outputs": dict(outputs=[]),
    "too-many-outputs": dict(outputs=[pb.MapOutput(task=i, address="127.0.0.1:1")
                                      for i in range(1, 4 * kmr.MAX_WORKERS + 2)]),
    "partition-zero": dict(partition=0),
    "iteration-zero": dict(iteration=0),
    "no-job": dict(job=""),
}


@pytest.mark.parametrize("bad", list(BAD_REDUCE_REQUESTS))
def test_reducer_refuses_malformed_reduce_requests(rooted, bad):
    """A malformed reduce task is refused with INVALID_ARGUMENT before the reducer contacts anyone."""
    request = reduce_request(**BAD_REDUCE_REQUESTS[bad])
    assert refusal(rooted.pool.reducers[0], "reducer", "Reduce", request) == \
        grpc.StatusCode.INVALID_ARGUMENT


def test_get_partition_serves_only_map_output_that_exists(rooted):
    """Only the exact (job, iteration, task) a mapper ran is served; anything else is NOT_FOUND."""
    request = map_request("points.txt", task=3, reducers=2)
    assert invoke(rooted.mapper, "mapper", "Map", request).status.success
    assert invoke(rooted.mapper, "mapper", "GetPartition", partition_request(request.job, 1, 3, 2))
    for job, iteration, task in [(request.job, 1, 4), (request.job, 2, 3), ("test-other-job", 1, 3),
                                 (request.job, 1, 2**32 - 1)]:
        assert refusal(rooted.mapper, "mapper", "GetPartition",
                       partition_request(job, iteration, task, 1)) == grpc.StatusCode.NOT_FOUND
    for task, partition in [(0, 1), (3, 0), (3, 3)]:   # no task 0, no partition 0, R is 2
        assert refusal(rooted.mapper, "mapper", "GetPartition",
                       partition_request(request.job, 1, task, partition)) == \
            grpc.StatusCode.INVALID_ARGUMENT


# ---------------------------------------------------------------------------------------------------
# 5. bounded messages
# ---------------------------------------------------------------------------------------------------


def test_oversized_request_is_refused_and_the_worker_keeps_serving(rooted):
    """A request over MAX_MESSAGE_BYTES is dropped by gRPC (RESOURCE_EXHAUSTED) before it is parsed
    into memory, and the worker stays up for the next call."""
    huge = pb.Centroids(dim=1, values=[0.0] * (kmr.MAX_MESSAGE_BYTES // 8 + 1))
    request = map_request("points.txt", centroids=huge)
    assert request.ByteSize() > kmr.MAX_MESSAGE_BYTES
    assert refusal(rooted.mapper, "mapper", "Map", request) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert invoke(rooted.mapper, "mapper", "Ping", pb.PingRequest()).role == "mapper"
    assert invoke(rooted.mapper, "mapper", "Map", map_request("points.txt")).status.success


# ---------------------------------------------------------------------------------------------------
# 6. the registration service (--listen): token, loopback, junk refused cleanly and bounded
# ---------------------------------------------------------------------------------------------------

from hypothesis import given, settings as hypothesis_settings, strategies as st   # noqa: E402

CLEAN_REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                  grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS}


@given(st.text(max_size=40), st.text(max_size=400) | st.from_regex(r"\A[\w.:\[\]-]{0,30}:\d{1,6}\Z"),
       st.integers(0, 2**32 - 1), st.text(max_size=300))
def test_any_registration_is_judged_without_an_exception_and_what_passes_is_host_and_port(role, address, pid, host):
    request = pb.JoinRequest(role=role, address=address, pid=pid, host=host)
    given_address, problem = kmr.registration_problem(request, "ipv4:10.1.2.3:4567")
    assert (given_address is None) != (problem is None)
    if problem is None:
        name, _, port = given_address.rpartition(":")
        assert role in ("mapper", "reducer") and 0 < pid < 2**31 and 0 < int(port) < 65536
        assert name and len(name) <= 255 and " " not in name and name.isascii()
        assert kmr.addresses(given_address) == [given_address]   # what the master's own flags accept


@pytest.fixture(scope="module")
def listening(tmp_path_factory):
    """A master with --listen and a token, waiting for two mappers that never come (the job never starts)."""
    folder = tmp_path_factory.mktemp("listening")
    write_points(folder / "points.txt", POINTS)
    master = MasterProcess("--role", "master", "--listen", "0", "--token", TOKEN, "--min-mappers", 2,
                           "--input", folder / "points.txt", "--data-dir", folder / "Data", "--join-timeout", 600,
                           cwd=folder)
    try:
        found = wait_for_line(master.stderr.name, r"waiting for workers to join at 127\.0\.0\.1:(\d+)", process=master.process)
        yield SimpleNamespace(master=master, port=int(found.group(1)), folder=folder)
    finally:
        master.process.terminate()
        code, _, stderr = master.finish(30)
        assert code == kmr.EXIT_TERMINATED and stderr.endswith("kmr: error: terminated\n")


def registry_call(port, method, request, token=TOKEN):
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        return getattr(pb_grpc.RegistryStub(channel), method)(request, timeout=RPC, metadata=auth(token))
    finally:
        channel.close()


def test_the_registration_service_listens_on_loopback_only_by_default(listening):
    found = listening_addresses(listening.port)
    assert found and all(is_loopback(address) for address in found)


@pytest.mark.parametrize("token", [None, "wrong"])
def test_the_registration_service_refuses_a_join_or_a_beat_without_the_token(listening, token):
    for method, request in (("Join", pb.JoinRequest(role="mapper", address="127.0.0.1:1", pid=5)),
                            ("Beat", pb.BeatRequest(member="x"))):
        with pytest.raises(grpc.RpcError) as refused:
            registry_call(listening.port, method, request, token)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


@hypothesis_settings(max_examples=40)
@given(st.one_of(
    st.builds(lambda role, address, pid, host: ("Join", pb.JoinRequest(role=role, address=address, pid=pid, host=host)),
              st.sampled_from(["mapper", "reducer", "", "master"]) | st.text(max_size=10),
              st.sampled_from(["127.0.0.1:1", ":1", "[::1]:1", "localhost:2", "0.0.0.0:3"]) | st.text(max_size=60),
              st.integers(0, 2**32 - 1), st.text(max_size=20)),
    st.builds(lambda member, leaving: ("Beat", pb.BeatRequest(member=member, leaving=leaving)),
              st.text(max_size=40), st.booleans())))
def test_junk_to_the_registration_service_is_refused_cleanly_and_the_master_keeps_waiting(listening, call):
    method, request = call
    with pytest.raises(grpc.RpcError) as refused:
        registry_call(listening.port, method, request)
    assert refused.value.code() in CLEAN_REFUSALS, refused.value
    assert listening.master.process.poll() is None


def test_a_registration_of_a_worker_that_answers_with_another_pid_or_role_is_refused(listening, tmp_path):
    worker = StandaloneWorker("reducer", tmp_path, "--token", TOKEN)
    try:
        pid = worker.process.pid
        for request, words in ((pb.JoinRequest(role="reducer", address=worker.address, pid=pid + 1), "answers as PID"),
                               (pb.JoinRequest(role="mapper", address=worker.address, pid=pid), "is not a mapper")):
            with pytest.raises(grpc.RpcError) as refused:
                registry_call(listening.port, "Join", request)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION and words in refused.value.details()
        reply = registry_call(listening.port, "Join", pb.JoinRequest(role="reducer", address=worker.address, pid=pid))
        assert reply.lane == "reducer 1" and reply.member
        again = registry_call(listening.port, "Join", pb.JoinRequest(role="reducer", address=worker.address, pid=pid))
        assert again.member == reply.member   # the same process joining again: the same lane
        assert not registry_call(listening.port, "Beat", pb.BeatRequest(member=reply.member)).released
        assert registry_call(listening.port, "Beat", pb.BeatRequest(member=reply.member, leaving=True)).released
    finally:
        worker.stop()
    assert listening.master.process.poll() is None
