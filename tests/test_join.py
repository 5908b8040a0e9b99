"""Workers that join the master (--listen / --join): before and after it starts, mid-job, leaving on SIGTERM,
killed, joining again as a new process, and refused (wrong token, TLS mismatch, an address that does not answer, a
flood of junk registrations).

Answers are checked bit for bit against kmr.kmeans_reference from the same initial centroids (an --init file).
Where a test must act at a given point of a job it freezes workers with SIGSTOP (with a long --heartbeat, so
the master waits rather than losing them): nothing then depends on how fast the machine is. The pure parts
(what a registration may say, who is released, who gets a share of the tasks) are tested without processes.
"""

import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from conftest import ROOT, FakeClock, MasterProcess, StandaloneWorker, centroid_lines, make_certificates, \
    other_kmr, read_points, uniform_points, wait_for_line, write_points

import kmr
import kmeans_pb2 as pb
import kmeans_pb2_grpc as pb_grpc

TOKEN = "join-test-token"


def free_port():
    """A port the OS has just handed out on loopback (for workers started before their master)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def joined(role, folder, port, *extra):
    """A standalone worker that joins the master at 127.0.0.1:port (asking again until it is up)."""
    return StandaloneWorker(role, folder, "--join", f"127.0.0.1:{port}", "--token", TOKEN,
                            "--input-root", folder, *map(str, extra))


def two_mappers_and_a_reducer(folder, port, *second_mapper_flags):
    """Three workers joining the master at 127.0.0.1:port (flags for the second mapper)."""
    return [joined("mapper", folder, port), joined("mapper", folder, port, *second_mapper_flags),
            joined("reducer", folder, port)]


def job_files(folder, count, seed, clusters):
    """An input of `count` seeded uniform points and an --init file of its first K distinct points."""
    points = uniform_points(count, seed)
    write_points(folder / "points.txt", points)
    write_points(folder / "init.txt", list(dict.fromkeys(points))[:clusters])
    return folder / "points.txt", folder / "init.txt"


def listening_master(folder, port, points, init, clusters, mappers, reducers, iterations, *extra):
    """A master in the background that workers join at 127.0.0.1:port."""
    return MasterProcess("--role", "master", "--listen", port, "--token", TOKEN, "--input", points, "--init", init,
                         "-K", clusters, "-M", mappers, "-R", reducers, "-n", iterations,
                         "--data-dir", folder / "Data", "--summary", folder / "summary.json", *extra, cwd=folder)


def expected_lines(points, init, iterations):
    """The sequential reference's answer, as sorted centroid lines."""
    final, _ = kmr.kmeans_reference(read_points(points), read_points(init), iterations)
    return centroid_lines(kmr.format_centroids(final))


def finished(master, timeout=180):
    """The master's (exit code, stdout, stderr, summary), the summary parsed."""
    code, stdout, stderr = master.finish(timeout)
    assert code == 0, stderr[-3000:]
    summary = json.loads((Path(master.stdout.name).parent / "summary.json").read_text())
    return stdout, stderr, summary


def stopped(*workers):
    """SIGSTOP these workers (a context: SIGCONT after)."""
    class Frozen:
        def __enter__(self):
            for worker in workers:
                os.kill(worker.process.pid, signal.SIGSTOP)

        def __exit__(self, *failure):
            for worker in workers:
                os.kill(worker.process.pid, signal.SIGCONT)
    return Frozen()


def stop_all(workers):
    for worker in workers:
        if worker.process.poll() is None:
            os.kill(worker.process.pid, signal.SIGCONT)
        worker.stop()


def last_error(worker, timeout=30):
    """A worker that must exit: (exit code, its last stderr line)."""
    code = worker.process.wait(timeout)
    lines = Path(worker.stderr.name).read_text().strip().splitlines()
    return code, lines[-1]


# -- the pure parts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("role, address, pid, host, problem", [
    ("mapper", "10.0.0.7:6001", 42, "h1", None),
    ("reducer", "[fd00::7]:6001", 42, "h1", None),
    ("mapper", "worker-3.lab.example:6001", 42, "", None),
    ("master", "10.0.0.7:6001", 42, "h1", "is not mapper or reducer"),
    ("mapper", "10.0.0.7:6001", 0, "h1", "PID 0 out of range"),
    ("mapper", "10.0.0.7:0", 42, "h1", "is not HOST:PORT"),
    ("mapper", "10.0.0.7:70000", 42, "h1", "is not HOST:PORT"),
    ("mapper", "10.0.0.7", 42, "h1", "is not HOST:PORT"),
    ("mapper", "a b:6001", 42, "h1", "is not a host name"),
    ("mapper", "::1:6001", 42, "h1", "is not a host name"),
    ("mapper", "x" * 254 + ":6001", 42, "h1", "is not a host name"),
    ("mapper", "10.0.0.7:6001", 42, "h\x00", "not printable"),
    ("mapper", "10.0.0.7:6001" + "9" * 400, 42, "h1", "is not HOST:PORT"),
    ("mapper", "10.0.0.7:\u00b2", 42, "h1", "is not HOST:PORT"),
    ("mapper", "127.0.0.1:6001", 42, "h1", "is a loopback address, registered from another host (10.9.9.9)"),
    ("mapper", "[::1]:6001", 42, "h1", "is a loopback address"),
    ("mapper", "localhost:6001", 42, "h1", "is a loopback address"),
])
def test_a_registration_names_a_role_a_reachable_looking_address_and_a_pid(role, address, pid, host, problem):
    request = pb.JoinRequest(role=role, address=address, pid=pid, host=host)
    given, found = kmr.registration_problem(request, "ipv4:10.9.9.9:5555")
    if problem is None:
        assert found is None and given == address
    else:
        assert problem in found and given is None


@pytest.mark.parametrize("address, peer, given", [
    (":6001", "ipv4:10.0.0.3:51234", "10.0.0.3:6001"),
    ("0.0.0.0:6001", "ipv4:10.0.0.3:51234", "10.0.0.3:6001"),
    (":6001", "ipv6:[fd00::3]:51234", "[fd00::3]:6001"),
    (":6001", "ipv6:%5Bfd00::3%5D:51234", "[fd00::3]:6001"),       # as gRPC writes IPv6 peers
    (":6001", "ipv6:%5B::ffff:10.0.0.3%5D:51234", "10.0.0.3:6001"),  # an IPv4 peer of a dual-stack master
    ("127.0.0.1:6001", "ipv4:127.0.0.1:51234", "127.0.0.1:6001"),   # loopback, from this host
    (":6001", "ipv6:%5B::1%5D:51234", "[::1]:6001"),
])
def test_a_registration_without_a_host_takes_the_address_it_came_from(address, peer, given):
    request = pb.JoinRequest(role="mapper", address=address, pid=7, host="h")
    assert kmr.registration_problem(request, peer) == (given, None)


def pool_of(workers_per_role=2, stage=None):
    """A Workers pool with fake joined workers (no processes, no channels)."""
    options = kmr.JobOptions(input_path="x", mappers=6, reducers=1, clusters=2, iterations=1)
    record = kmr.Recorder(FakeClock())
    record.start()
    pool = kmr.Workers(options, "t", None, record, "job")
    for index in range(1, workers_per_role + 1):
        worker = kmr.Worker("mapper", index, f"127.0.0.1:{6000 + index}", pid=100 + index, joined=0.0,
                            member=f"m{index}")
        pool.pool["mapper"].append(worker)
        pool.members[worker.member] = worker
        record.lanes.append({"worker": worker.lane, "address": worker.address, "pid": worker.pid, "joined": 0.0,
                             "left": None})
    return pool, record


class PingStub:
    """A worker's stub that answers every Ping with `reply`."""

    def __init__(self, reply):
        self.reply = reply

    def Ping(self, request, timeout, metadata):
        return self.reply


def test_a_worker_that_answers_again_is_taken_back_only_as_its_role_running_the_masters_kmr_py():
    pool, _ = pool_of(1)
    worker = pool.pool["mapper"][0]
    for reply, taken in ((pb.PingReply(role="mapper", pid=101, code=kmr.code_digest()), True),
                         (pb.PingReply(role="mapper", pid=101, code="0123456789ab"), False),
                         (pb.PingReply(role="mapper", pid=101), False),   # a kmr from before the code was sent
                         (pb.PingReply(role="reducer", pid=101, code=kmr.code_digest()), False)):
        worker.stub = PingStub(reply)
        assert pool.answers(worker, 0.5) is taken, reply


def test_a_leaving_worker_is_released_only_once_no_call_runs_there_and_no_reducer_needs_its_outputs():
    pool, record = pool_of()
    first, second = pool.pool["mapper"]
    first.calls = 1
    pool.hold_outputs([first, second])
    assert pool.beat("m1", leaving=True) is False
    assert first.leaving and pool.live("mapper") == [second]   # no new task for it
    first.calls = 0
    assert pool.beat("m1", leaving=True) is False   # the reducers still fetch its map output
    pool.hold_outputs(())
    assert pool.beat("m1", leaving=True) is True
    assert first.left and not first.alive and record.events["workers left"] == 1
    assert "workers lost" not in record.events   # leaving is not a loss
    assert record.lanes[0]["left"] is not None and record.lanes[1]["left"] is None
    assert pool.beat("m1", leaving=True) is True    # asked again: still released
    assert pool.beat("m2", leaving=False) is False
    with pytest.raises(kmr.JoinRefused) as unknown:
        pool.beat("nobody", leaving=False)
    assert unknown.value.code == "NOT_FOUND"


def test_a_worker_that_joined_during_a_stage_takes_tasks_from_the_next_one_or_at_once_if_none_is_left():
    pool, record = pool_of()
    record.stage = (kmr.Stage("mapper", "Map", 3), 1.0)
    late = kmr.Worker("mapper", 3, "127.0.0.1:6003", pid=103, joined=2.0, member="m3", arrived_in=record.stage)
    pool.pool["mapper"].append(late)
    assert late not in pool.live("mapper") and late in pool.staying("mapper")
    record.stage = (kmr.Stage("reducer", "Reduce", 3), 2.0)
    assert late in pool.live("mapper")
    late.arrived_in = record.stage = (kmr.Stage("mapper", "Map", 4), 3.0)
    for worker in pool.pool["mapper"][:2]:
        worker.alive = False
    assert pool.live("mapper") == []
    assert pool.await_live("mapper") and pool.live("mapper") == [late]   # nobody else: it works now


def test_the_page_rows_say_who_joined_waits_for_the_next_stage_is_leaving_or_left():
    pool, record = pool_of(3)
    first, second, third = pool.pool["mapper"]
    record.stage = (kmr.Stage("mapper", "Map", 2), 1.0)
    third.arrived_in, third.joined = record.stage, 1.5
    second.leaving = True
    first.alive, first.left = False, True
    rows = {row["worker"]: row for row in kmr.worker_rows(pool, record)}
    assert rows["mapper 1"]["state"] == "left (released)"
    assert rows["mapper 2"]["state"] == "leaving: released once the reducers have its map outputs"
    assert rows["mapper 3"]["state"] == "joined: tasks from the next stage on" and rows["mapper 3"]["joined"] == 1.5


class Pool:
    """The scheduler's view of a pool: these workers live, none lost."""

    def __init__(self, workers):
        self.workers = workers

    def live(self, role):
        return [worker for worker in self.workers if worker.alive]


def test_a_new_worker_gets_a_share_from_a_busy_worker_with_two_tasks_more_in_the_stage_than_it():
    old = [kmr.Worker("mapper", index, f"h:{index}") for index in (1, 2)]
    new = kmr.Worker("mapper", 3, "h:3")
    scheduler = kmr.TaskScheduler(Pool(old + [new]), kmr.Recorder(FakeClock()), 4)
    for task in range(1, 7):   # mapper 1 ran tasks 1, 3, 5 last; mapper 2 ran 2, 4, 6
        scheduler.holders["mapper", task] = old[(task - 1) % 2]
    state = kmr.StageRun(kmr.Stage("mapper", "Map", 4), None, {}, [1, 2, 3, 4, 5, 6])

    def give(worker, idle):
        task = scheduler.pick(state, worker, idle)
        if task is not None:
            state.running[object()] = kmr.Attempt(worker, task, 1, 0.0)
        return task

    def finish(task):
        key, attempt = next((key, a) for key, a in state.running.items() if a.task == task)
        del state.running[key]
        state.results[task] = (attempt.worker, None)

    assert give(old[0], old + [new]) == 1    # its own first
    assert give(old[1], [old[1], new]) == 2
    # both busy, three tasks each in this stage, the newcomer none: it takes the last of one of them
    assert give(new, [new]) == 6
    finish(6)
    assert give(new, [new]) == 5             # mapper 1: three, the newcomer one
    finish(5)
    assert give(new, [new]) is None          # two each: waiting for its own worker is as quick
    assert state.pending == [3, 4]
    # a worker busy only finishing a copy that lost a backup race (in no attempt of this stage) may take
    # long: its task is anyone's
    assert scheduler.pick(kmr.StageRun(state.stage, None, {}, [3]), new, [new]) == 3
    # an idle worker's own tasks are never taken from it, and a gone worker's are anyone's
    assert scheduler.pick(state, new, [old[0], new]) is None
    old[1].alive = False
    assert scheduler.pick(state, new, [old[0], new]) == 4


# -- on loopback: joining, leaving, losing, refusing ---------------------------------------------------


def test_workers_join_before_and_after_the_master_and_two_jobs_on_them_are_exact(tmp_path):
    port = free_port()
    sample = tmp_path / "sample"
    sample.mkdir()
    points = sample / "points.txt"
    points.write_text((ROOT / "points.txt").read_text())
    init = write_points(sample / "init.txt", list(dict.fromkeys(read_points(points)))[:2])
    workers = [joined("mapper", tmp_path, port), joined("reducer", tmp_path, port)]
    try:
        master = listening_master(sample, port, points, init, 2, 3, 2, 20, "--min-mappers", 2, "--min-reducers", 2)
        found = wait_for_line(master.stderr.name, r"waiting for workers to join at 127\.0\.0\.1:\d+ .*\n\s+(.*)",
                              process=master.process)
        assert found.group(1) == f"python kmr.py --role mapper|reducer --join 127.0.0.1:{port} " \
                                 f"(with the job's token in $KMR_TOKEN)"
        assert TOKEN not in Path(master.stderr.name).read_text()   # the token's value is never shown
        workers += [joined("mapper", tmp_path, port), joined("reducer", tmp_path, port)]
        stdout, stderr, summary = finished(master)
        assert centroid_lines(stdout) == expected_lines(points, init, 20)
        assert len(re.findall(r"(mapper|reducer) \d \(127\.0\.0\.1:\d+\) joined: PID \d+", stderr)) == 4
        assert {lane["worker"] for lane in summary["timeline"]["workers"]} == \
            {"mapper 1", "mapper 2", "reducer 1", "reducer 2"}

        # the same workers join the next master: 300k points, exact
        big = tmp_path / "big"
        big.mkdir()
        points, init = job_files(big, 300_000, seed=3, clusters=4)
        master = listening_master(big, port, points, init, 4, 4, 2, 3, "--min-mappers", 2, "--min-reducers", 2,
                                  "--compact")
        stdout, stderr, summary = finished(master)
        assert centroid_lines(stdout) == expected_lines(points, init, 3)
        used = {attempt["worker"] for attempt in summary["timeline"]["attempts"]}
        assert used == {"mapper 1", "mapper 2", "reducer 1", "reducer 2"}
        assert all(worker.process.poll() is None for worker in workers)   # they wait for the next master
    finally:
        stop_all(workers)


def test_a_mapper_that_joins_during_an_iteration_gets_map_tasks_only_from_a_later_iteration(tmp_path):
    """Mapper 3 joins once iteration 3 has begun (the other mappers frozen, so it joins mid-iteration; however
    late the freeze lands, the job still has iterations to run: these 60k points settle only at iteration
    100, the job runs 20): its Map tasks all come from iterations after the one it joined during."""
    port = free_port()
    points, init = job_files(tmp_path, 60_000, seed=11, clusters=8)
    workers = two_mappers_and_a_reducer(tmp_path, port)
    try:
        master = listening_master(tmp_path, port, points, init, 8, 6, 2, 20, "--min-mappers", 2, "--heartbeat", 60,
                                  "--timeline", tmp_path / "timeline.svg")
        dump = tmp_path / "Data" / "dump.txt"
        wait_for_line(dump, r"=== iteration 3 ===", process=master.process)
        with stopped(*workers[:2]):   # the iteration cannot end: its map outputs are on these two
            workers.append(joined("mapper", tmp_path, port))
            wait_for_line(dump, r"mapper 3 \(127\.0\.0\.1:\d+\) joined: PID \d+ on .*; tasks from the next stage on",
                          process=master.process)
        stdout, stderr, summary = finished(master)
        assert centroid_lines(stdout) == expected_lines(points, init, 20)
        timeline = summary["timeline"]
        lane = next(lane for lane in timeline["workers"] if lane["worker"] == "mapper 3")
        during = [span["iteration"] for span in timeline["iterations"] if span["start"] <= lane["joined"] <= span["end"]]
        assert during and during[0] >= 3, during
        during = during[0]
        mine = [attempt for attempt in timeline["attempts"] if attempt["worker"] == "mapper 3"]
        maps = [attempt for attempt in mine if attempt["stage"] == "Map"]
        assert maps and all(attempt["iteration"] > during for attempt in maps)
        assert all(attempt["stage"] == "Weigh" and attempt["iteration"] is None for attempt in mine
                   if attempt not in maps)   # and a share of the final SSE's pass
        assert {attempt["outcome"] for attempt in timeline["attempts"]} == {"SUCCESS"}
        last = [attempt for attempt in maps if attempt["iteration"] == 20]
        assert len(last) == 2   # six tasks on three mappers: its share, two
        assert 'class="joined"' in (tmp_path / "timeline.svg").read_text()
    finally:
        stop_all(workers)


def test_a_mapper_sent_sigterm_mid_job_leaves_without_a_failure_and_the_answer_is_exact(tmp_path):
    port = free_port()
    points, init = job_files(tmp_path, 200_000, seed=5, clusters=8)
    workers = two_mappers_and_a_reducer(tmp_path, port)
    try:
        master = listening_master(tmp_path, port, points, init, 8, 4, 2, 15, "--min-mappers", 2,
                                  "--heartbeat", 60, "--timeline", tmp_path / "timeline.svg")
        dump = tmp_path / "Data" / "dump.txt"
        leaver = wait_for_line(dump, rf"(mapper \d) \({re.escape(workers[1].address)}\) joined").group(1)
        wait_for_line(dump, r"=== iteration 2 ===", process=master.process)
        with stopped(workers[0]):   # the map stage cannot end: the leaver's outputs must wait for the reducers
            wait_for_line(dump, rf"=== iteration 2 ===[\s\S]*<- Map .* SUCCESS .* {leaver} \([\s\S]*<- Map .* "
                                rf"SUCCESS .* {leaver} \(", process=master.process)   # its two tasks are done
            workers[1].process.send_signal(signal.SIGTERM)
            wait_for_line(dump, rf"{leaver} \(127\.0\.0\.1:\d+\) asks to leave", process=master.process)
            time.sleep(1)   # beats come every 0.25 s while leaving: not released while its outputs are needed
            assert f"{leaver} (" + workers[1].address + ") left" not in dump.read_text()
        assert workers[1].process.wait(60) == 0
        worker_log = Path(workers[1].stderr.name).read_text()
        assert "released by the master" in worker_log and "kmr: error" not in worker_log
        stdout, stderr, summary = finished(master)
        assert centroid_lines(stdout) == expected_lines(points, init, 15)
        assert re.search(rf"{leaver} \(127\.0\.0\.1:\d+\) left \(released\)", stderr)
        assert summary["failures"] == {"workers left": 1}   # no FAILURE, no loss, no re-execution
        attempts = summary["timeline"]["attempts"]
        assert {attempt["outcome"] for attempt in attempts} == {"SUCCESS"}
        lane = next(lane for lane in summary["timeline"]["workers"] if lane["worker"] == leaver)
        assert lane["left"] is not None
        assert all(attempt["start"] < lane["left"] for attempt in attempts if attempt["worker"] == leaver)
        assert 'class="left"' in (tmp_path / "timeline.svg").read_text()
    finally:
        stop_all(workers)


def test_when_the_only_mapper_leaves_the_master_waits_for_another_to_join(tmp_path):
    port = free_port()
    points, init = job_files(tmp_path, 50_000, seed=12, clusters=8)
    workers = [joined("mapper", tmp_path, port), joined("reducer", tmp_path, port)]
    try:
        # 40 iterations (these 50k points settle only at iteration 77): the leave lands long before the job's end
        master = listening_master(tmp_path, port, points, init, 8, 3, 1, 40)
        dump = tmp_path / "Data" / "dump.txt"
        wait_for_line(dump, r"=== iteration 2 ===", process=master.process)
        workers[0].process.send_signal(signal.SIGTERM)
        wait_for_line(master.stderr.name, r"no live mapper: waiting up to 300 s for one to join at 127\.0\.0\.1:\d+",
                      process=master.process)
        workers.append(joined("mapper", tmp_path, port))
        # the leaver serves the map outputs it made until the newcomer has done the rest and the reducer has them all
        assert workers[0].process.wait(60) == 0
        stdout, stderr, summary = finished(master)
        assert centroid_lines(stdout) == expected_lines(points, init, 40)
        assert summary["failures"] == {"workers left": 1}
        assert {attempt["outcome"] for attempt in summary["timeline"]["attempts"]} == {"SUCCESS"}
    finally:
        stop_all(workers)


def test_a_worker_that_joins_and_leaves_while_spawned_workers_start_costs_the_job_nothing(tmp_path):
    port = free_port()
    points, init = job_files(tmp_path, 5_000, seed=13, clusters=3)
    workers = [joined("reducer", tmp_path, port), joined("reducer", tmp_path, port)]
    try:
        master = listening_master(tmp_path, port, points, init, 3, 2, 2, 4, "--spawn", "mappers",
                                  "--slow-start", "mapper:1:6")
        dump = tmp_path / "Data" / "dump.txt"   # (the console holds its lines until the input is checked)
        lane = wait_for_line(dump, rf"(reducer \d) \({re.escape(workers[1].address)}\) joined",
                             process=master.process).group(1)
        workers[1].process.send_signal(signal.SIGTERM)   # while mapper 1 is still starting
        assert workers[1].process.wait(30) == 0
        assert "spawned mapper 1" not in dump.read_text(), "mapper 1 started before the leave: a slower start"
        stdout, stderr, summary = finished(master)
        assert centroid_lines(stdout) == expected_lines(points, init, 4)
        assert f"{lane} ({workers[1].address}) left (released)" in stderr
        assert {attempt["worker"] for attempt in summary["timeline"]["attempts"]} >= {"mapper 1", "mapper 2"}
        assert lane not in {attempt["worker"] for attempt in summary["timeline"]["attempts"]}
    finally:
        stop_all(workers)


def test_a_killed_joined_mapper_is_recovered_and_a_new_process_at_its_address_is_a_new_lane(tmp_path):
    port, mapper_port = free_port(), free_port()
    points, init = job_files(tmp_path, 100_000, seed=8, clusters=8)
    workers = [joined("mapper", tmp_path, port), joined("mapper", tmp_path, port, "--port", str(mapper_port)),
               joined("reducer", tmp_path, port)]
    try:
        # 32 iterations (these 100k points settle only at iteration 63): the job runs > 1.5 s after the kill
        master = listening_master(tmp_path, port, points, init, 8, 4, 2, 32, "--min-mappers", 2, "--heartbeat", 60)
        dump = tmp_path / "Data" / "dump.txt"
        wait_for_line(dump, r"=== iteration 2 ===", process=master.process)
        with stopped(workers[2]):
            victim = workers[1].process.pid
            workers[1].process.kill()
            workers[1].process.wait()
            workers.append(StandaloneWorker("mapper", tmp_path, "--join", f"127.0.0.1:{port}", "--token", TOKEN,
                                            "--input-root", tmp_path, "--port", str(mapper_port)))
            wait_for_line(dump, r"mapper 3 \(127\.0\.0\.1:%d\) joined" % mapper_port, process=master.process)
        stdout, stderr, summary = finished(master)
        assert centroid_lines(stdout) == expected_lines(points, init, 32)
        assert summary["failures"].get("workers lost", 0) >= 1
        lanes = {lane["pid"]: lane for lane in summary["timeline"]["workers"]}
        killed, fresh = lanes[victim], lanes[workers[3].process.pid]
        assert fresh["worker"] == "mapper 3" and killed["worker"] in ("mapper 1", "mapper 2")
        assert killed["address"] == fresh["address"] == f"127.0.0.1:{mapper_port}"
        assert [loss["worker"] for loss in summary["timeline"]["losses"]] == [killed["worker"]]
    finally:
        stop_all(workers)


@pytest.mark.parametrize("how", ["a second signal", "the leave timeout"])
def test_a_leaver_not_released_goes_on_a_second_signal_or_its_timeout_and_its_map_tasks_run_again(tmp_path, how):
    port = free_port()
    points, init = job_files(tmp_path, 100_000, seed=9, clusters=8)
    workers = two_mappers_and_a_reducer(tmp_path, port, "--leave-timeout", 2)
    try:
        master = listening_master(tmp_path, port, points, init, 8, 4, 2, 6, "--min-mappers", 2, "--heartbeat", 60)
        dump = tmp_path / "Data" / "dump.txt"
        wait_for_line(dump, r"=== iteration 2 ===", process=master.process)
        with stopped(workers[2]):   # the reducer has not fetched iteration 2's map outputs yet
            wait_for_line(dump, r"=== iteration 2 ===[\s\S]*-> Reduce", process=master.process)   # maps done
            workers[1].process.send_signal(signal.SIGTERM)
            wait_for_line(dump, r"mapper \d \(127\.0\.0\.1:\d+\) asks to leave", process=master.process)
            if how == "a second signal":
                workers[1].process.send_signal(signal.SIGTERM)
                assert last_error(workers[1]) == (kmr.EXIT_TERMINATED, "kmr: error: terminated")
            else:
                assert last_error(workers[1]) == (0, re.search(r"\d\d:\d\d:\d\d  left", Path(
                    workers[1].stderr.name).read_text()).group(0))
                assert "not released in 2 s: leaving anyway (the master will find this mapper lost)" in \
                    Path(workers[1].stderr.name).read_text()
        stdout, stderr, summary = finished(master)
        assert centroid_lines(stdout) == expected_lines(points, init, 6)
        assert summary["failures"].get("re-executions", 0) >= 1 and summary["failures"]["workers lost"] == 1
        assert "workers left" not in summary["failures"]
    finally:
        stop_all(workers)


def registry(port):
    """A Registry stub on the master at 127.0.0.1:port."""
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return channel, pb_grpc.RegistryStub(channel)


def test_joined_spawned_and_given_workers_mix_in_one_job(tmp_path):
    port = free_port()
    points, init = job_files(tmp_path, 30_000, seed=6, clusters=4)
    given = StandaloneWorker("mapper", tmp_path, "--token", TOKEN, "--input-root", tmp_path)
    workers = [given]
    try:
        master = listening_master(tmp_path, port, points, init, 4, 4, 2, 5, "--min-mappers", 2, "--spawn", "reducers",
                                  "--mapper-addrs", given.address)
        wait_for_line(master.stderr.name, r"waiting for workers to join", process=master.process)
        # the given mapper cannot join too, under another name: one process, one lane
        twin = pb.JoinRequest(role="mapper", address="localhost:" + given.address.rpartition(":")[2],
                              pid=given.process.pid)
        channel, stub = registry(port)
        with channel, pytest.raises(grpc.RpcError) as refused:
            stub.Join(twin, timeout=30, metadata=((kmr.TOKEN_KEY, TOKEN),))
        assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert refused.value.details() == f"{twin.address} is mapper 1 ({given.address}) of this job already"
        workers.append(joined("mapper", tmp_path, port))
        stdout, stderr, summary = finished(master)
        assert centroid_lines(stdout) == expected_lines(points, init, 5)
        lanes = {lane["worker"]: lane for lane in summary["timeline"]["workers"]}
        assert lanes["mapper 1"]["address"] == given.address and lanes["mapper 1"]["joined"] is None
        assert lanes["mapper 2"]["joined"] is not None and lanes["reducer 1"]["joined"] is None
        assert {attempt["worker"] for attempt in summary["timeline"]["attempts"]} == \
            {"mapper 1", "mapper 2", "reducer 1", "reducer 2"}
        assert summary["parameters"]["mappers"] == [given.address] and summary["parameters"]["reducers"] == "spawned"
    finally:
        stop_all(workers)


def test_refused_joins_are_one_line_on_the_worker_and_change_nothing_in_the_job(tmp_path):
    port = free_port()
    points, init = job_files(tmp_path, 20_000, seed=4, clusters=4)
    good = [joined("mapper", tmp_path, port), joined("reducer", tmp_path, port)]
    bad = []
    try:
        master = listening_master(tmp_path, port, points, init, 4, 2, 1, 5, "--min-mappers", 2)
        dump = tmp_path / "Data" / "dump.txt"
        wait_for_line(dump, r"reducer 1 .* joined", process=master.process)

        bad.append(StandaloneWorker("mapper", tmp_path, "--join", f"127.0.0.1:{port}", "--token", "wrong"))
        assert last_error(bad[-1]) == (1, f"kmr: error: cannot join the master at 127.0.0.1:{port}: it refused the "
                                          f"token: set the same --token / KMR_TOKEN on master and workers")
        ca, _, _ = make_certificates(tmp_path / "tls")
        bad.append(joined("mapper", tmp_path, port, "--tls-ca", ca))
        code, line = last_error(bad[-1])
        assert code == 1 and line.startswith(f"kmr: error: cannot join the master at 127.0.0.1:{port}: it does not "
                                              f"speak TLS: start the master with --tls-cert/--tls-key"), line
        bad.append(joined("mapper", tmp_path, port, "--advertise", "127.0.0.1:1"))
        code, line = last_error(bad[-1])
        assert code == 1 and line == (f"kmr: error: the master at 127.0.0.1:{port} refused this mapper (127.0.0.1:1): "
                                      f"the master cannot use 127.0.0.1:1: no mapper answers at 127.0.0.1:1 (waited "
                                      f"3 s: UNAVAILABLE)"), line
        bad.append(StandaloneWorker("mapper", tmp_path, "--join", f"127.0.0.1:{port}", "--token", TOKEN,
                                    "--input-root", tmp_path, script=other_kmr(tmp_path / "other")))
        code, line = last_error(bad[-1])
        assert code == 1 and line.startswith(f"kmr: error: the master at 127.0.0.1:{port} refused this mapper (") \
            and " runs another kmr.py (code " in line \
            and line.endswith(f", this master's {kmr.code_digest()}): start the workers from the master's kmr.py"), line
        good_mapper = re.search(r"mapper 1 \((127\.0\.0\.1:\d+)\) joined: PID (\d+)", dump.read_text())

        # a flood: 1,000 registrations, junk, duplicates and addresses that do not answer, 32 at a time
        def junk(number):
            kind = number % 5
            request = [pb.JoinRequest(role="master", address="127.0.0.1:9", pid=5),
                       pb.JoinRequest(role="mapper", address="x" * 1000, pid=5),
                       pb.JoinRequest(role="mapper", address=good_mapper.group(1), pid=int(good_mapper.group(2)) + 1),
                       pb.JoinRequest(role="mapper", address="127.0.0.1:1", pid=5),
                       pb.JoinRequest(role="reducer", address=":1", pid=2**31 + 5)][kind]
            try:
                stub.Join(request, timeout=30, metadata=((kmr.TOKEN_KEY, TOKEN),))
            except grpc.RpcError as error:
                return error.code().name
            return "OK"

        channel, stub = registry(port)
        with channel, concurrent.futures.ThreadPoolExecutor(32) as threads:
            codes = list(threads.map(junk, range(1000)))
        assert "OK" not in codes
        assert set(codes) <= {"INVALID_ARGUMENT", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED"}, set(codes)
        assert codes.count("INVALID_ARGUMENT") >= 400 and "FAILED_PRECONDITION" in codes

        good.append(joined("mapper", tmp_path, port))   # the job starts with its real workers only
        stdout, stderr, summary = finished(master)
        assert centroid_lines(stdout) == expected_lines(points, init, 5)
        assert {lane["worker"] for lane in summary["timeline"]["workers"]} == {"mapper 1", "mapper 2", "reducer 1"}
        assert "Traceback" not in dump.read_text()
        # the console shows the wrong token once; the junk goes to dump.txt only
        assert stderr.count("refused /kmr.Registry/Join: missing or wrong token") == 1 and "Join FAILURE" not in stderr
        assert dump.read_text().count("<- Join FAILURE") >= 1000
    finally:
        stop_all(good + bad)


def test_a_master_that_no_one_joins_says_who_did_and_a_worker_with_no_master_gives_up(tmp_path):
    port = free_port()
    points, init = job_files(tmp_path, 1000, seed=2, clusters=2)
    worker = joined("reducer", tmp_path, port)
    try:
        master = listening_master(tmp_path, port, points, init, 2, 2, 1, 3, "--join-timeout", 3)
        code, stdout, stderr = master.finish(60)
        assert code == 1 and stdout == ""
        assert re.search(r"kmr: error: not enough workers joined in 3 s \(see --join-timeout\): 0 of 1 mappers "
                         r"\(none\); 1 of 1 reducers \(reducer 1 \(127\.0\.0\.1:\d+\)\)\n\Z", stderr), stderr
    finally:
        worker.stop()
    lonely = joined("mapper", tmp_path, free_port(), "--join-timeout", 2)
    try:
        code, line = last_error(lonely)
        assert code == 1 and re.fullmatch(r"kmr: error: no master took this mapper at 127\.0\.0\.1:\d+ in 2 s \(last: "
                                          r"UNAVAILABLE.*\): start the master with --listen, or see --join-timeout",
                                          line), line
    finally:
        lonely.stop()


def test_a_master_that_cannot_listen_says_so_in_one_line(tmp_path):
    points, init = job_files(tmp_path, 100, seed=1, clusters=2)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        master = listening_master(tmp_path, port, points, init, 2, 2, 1, 3)
        code, stdout, stderr = master.finish(60)
    assert (code, stdout) == (kmr.EXIT_USAGE, "")
    assert stderr == f"kmr: error: cannot listen on 127.0.0.1:{port}: port in use or address not available\n"


@pytest.mark.parametrize("argv, message", [
    (["--role", "mapper", "--listen", "7000"], "--listen is for the master"),
    (["--role", "master", "--join", "h:7000"], "--join and --advertise are for mappers and reducers"),
    (["--role", "master", "--min-mappers", "2"], "--min-mappers needs --listen"),
    (["--role", "master", "--spawn", "reducers"], "--spawn needs --listen"),
    (["--role", "master", "--listen", "7000", "--token", ""], "--listen needs --token (or KMR_TOKEN"),
    (["--role", "mapper", "--advertise", "h:1"], "--advertise needs --join"),
    (["--role", "mapper", "--join", "h:1", "--advertise", "h:0"], "is not HOST[:PORT]"),
    (["--role", "mapper", "--join", "h:1,g:2"], "is not one host:port"),
    (["--role", "mapper", "--join", "h:\u00b2"], "is not host:port"),
    (["--role", "mapper", "--join", "h:1", "--advertise", "h:\u00b2"], "is not HOST[:PORT]"),
    (["--role", "master", "--listen", "7000", "--min-reducers", "0"], "--min-reducers must be between 1 and 64"),
])
def test_joining_flags_that_do_not_fit_are_one_line(argv, message):
    with pytest.raises(kmr.InputError) as error:
        kmr.parse_args(argv)
    assert message in str(error.value)
