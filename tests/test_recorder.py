"""The recorder, the checkpoint and the master's accounting on their own: no processes, no gRPC calls.

The Recorder is the one place attempts, passes, losses and events are written; the timeline, the summary and
the checkpoint read it. Here it is fed by hand with a fake clock and read back. The checkpoint is saved and
restored through a real file, and refuses another job's. account_for_points is the iteration's invariant
check, fed replies that lose or double-count points.
"""

import concurrent.futures
import dataclasses
import json
import types

import pytest

from conftest import FakeClock

import kmr

MAP = kmr.Stage("mapper", "Map", 3)


def recorder():
    clock = FakeClock()
    record = kmr.Recorder(clock)
    record.start()
    return record, clock


def attempt(worker, task, number, started, backup=False):
    return kmr.Attempt(worker, task, number, started, backup)


def ended(value=None, error=None, cancelled=False):
    """A finished future, as the scheduler's call threads leave one."""
    future = concurrent.futures.Future()
    if cancelled:
        future.cancel()
    elif error is not None:
        future.set_exception(error)
    else:
        future.set_result(value)
    return future


def test_every_way_an_attempt_ends_is_recorded_with_its_reason():
    record, clock = recorder()
    mapper = kmr.Worker("mapper", 2, "127.0.0.1:7002", pid=4242)
    cases = [
        (ended("reply"), "SUCCESS", ""),
        (ended(error=kmr.TaskFailed("injected failure", kmr.pb.INJECTED)), "FAILURE", "injected failure"),
        (ended(error=kmr.TaskFailed("UNKNOWN: boom", None)), "FAILURE", "UNKNOWN: boom"),
        (ended(error=kmr.TaskFailed("stale attempt: a newer job or iteration ran", kmr.pb.STALE_ATTEMPT)),
         "stale", "stale attempt: a newer job or iteration ran"),
        (ended(error=kmr.WorkerLost("no heartbeat for 2 s")), "lost", "no heartbeat for 2 s"),
        (ended(kmr.MissingOutput({3, 1})), "FAILURE", "map output missing for tasks [1, 3]"),
        (ended(cancelled=True), "unfinished", "cancelled as the job ended"),
    ]
    for number, (future, _, _) in enumerate(cases, 1):
        entry = record.attempt_started(attempt(mapper, 1, number, clock.now), MAP)
        entry.won = number == 1
        clock.now += 0.5
        record.attempt_ended(entry, future)
    still_running = record.attempt_started(attempt(mapper, 2, 1, clock.now), MAP)
    clock.now += 2.0
    attempts = record.timeline([], None)["attempts"]
    assert [(a["outcome"], a["reason"]) for a in attempts] == \
           [(outcome, reason) for _, outcome, reason in cases] + [("unfinished", "still running when the job ended")]
    assert attempts[0] == {"run": 1, "worker": "mapper 2", "address": "127.0.0.1:7002", "pid": 4242, "stage": "Map",
                           "task": 1, "iteration": 3, "attempt": 1, "backup": False, "rerun": False, "start": 0.0,
                           "collect": None, "end": 0.5, "outcome": "SUCCESS", "reason": ""}
    assert attempts[-1]["end"] == 0.5 * len(cases) + 2.0 and still_running.ending is None


def test_a_successful_copy_that_did_not_win_is_shown_ignored():
    record, clock = recorder()
    worker = kmr.Worker("reducer", 1, "127.0.0.1:7101")
    first = record.attempt_started(attempt(worker, 1, 1, clock.now), kmr.Stage("reducer", "Reduce", 1))
    second = record.attempt_started(attempt(worker, 1, 2, clock.now, backup=True), kmr.Stage("reducer", "Reduce", 1))
    first.won = True
    record.collected(first)
    for entry in (first, second):
        clock.now += 1.0
        record.attempt_ended(entry, ended("result"))
    attempts = record.timeline([], None)["attempts"]
    assert [(a["outcome"], a["backup"], a["collect"]) for a in attempts] == \
           [("SUCCESS", False, 0.0), ("ignored", True, None)]
    assert attempts[1]["reason"] == "another copy of the task finished first"


def test_passes_losses_and_events_belong_to_the_run_under_way():
    record, clock = recorder()
    with record.span(kmr.SAMPLE_PASS):
        clock.now += 1.0
    record.count("failures")
    record.begin_run(2, {"failures": 3})
    with record.span(kmr.SEEDING_PASS):
        clock.now += 0.25
    lost = kmr.Worker("mapper", 1, "127.0.0.1:7001", pid=11)
    record.worker_lost(lost, "no heartbeat for 2 s")["new_pid"] = 12
    with record.span(1):
        clock.now += 2.0
    with record.span(kmr.FINAL_PASS):
        clock.now += 0.5
    timeline = record.timeline([{"worker": "mapper 1"}], {"runs": 1, "iterations": 0})
    assert timeline["iterations"] == [
        {"run": 1, "iteration": -1, "start": 0.0, "end": 1.0},
        {"run": 2, "iteration": 0, "start": 1.0, "end": 1.25, "init": "k-means++"},
        {"run": 2, "iteration": 1, "start": 1.25, "end": 3.25}, {"run": 2, "iteration": None, "start": 3.25, "end": 3.75}]
    assert timeline["losses"] == [{"run": 2, "worker": "mapper 1", "pid": 11, "time": 1.25,
                                   "reason": "no heartbeat for 2 s", "new_pid": 12}]
    assert timeline["resumed"] == {"runs": 1, "iterations": 0} and timeline["end"] == 3.75
    assert record.events == {"failures": 3, "workers lost": 1}   # run 1's own failure is not run 2's


def plan_of(points, ranges):
    return types.SimpleNamespace(points=points, ranges=ranges)


def map_reply(points, partition_points):
    return types.SimpleNamespace(points=points, partition_points=partition_points)


def result(clusters, points_from_task):
    return types.SimpleNamespace(clusters=[types.SimpleNamespace(key=k, count=c, mean=m) for k, c, m in clusters],
                                 points_from_task=points_from_task)


def test_accounting_passes_when_every_point_is_counted_once():
    plan = plan_of(7, [(0, 4), (4, 7)])
    maps = {1: map_reply(4, [3, 1]), 2: map_reply(3, [1, 2])}
    results = {1: result([(0, 2, (0.5,)), (2, 2, (9.0,))], [3, 1]), 2: result([(1, 3, (4.0,))], [1, 2])}
    means, sizes = kmr.account_for_points(1, plan, 3, 2, maps, results)
    assert means == {0: (0.5,), 2: (9.0,), 1: (4.0,)} and sizes == [2, 3, 2]


@pytest.mark.parametrize("maps, results, problem", [
    ({1: map_reply(3, [2, 1]), 2: map_reply(3, [1, 2])}, None, "map task 1 mapped 3 of 4 points"),
    (None, {1: result([(0, 2, (0.5,)), (2, 2, (9.0,))], [2, 1]), 2: result([(1, 3, (4.0,))], [1, 2])},
     "reducer 1 got 2 of 3 points of map task 1"),
    (None, {1: result([(0, 2, (0.5,)), (2, 2, (9.0,))], [3, 1]), 2: result([(1, 3, (4.0,)), (0, 1, (1.0,))], [1, 2])},
     "cluster 0 reported by reducer 2"),
    (None, {1: result([(0, 2, (0.5,)), (2, 3, (9.0,))], [3, 1]), 2: result([(1, 3, (4.0,))], [1, 2])},
     "reducers counted 8 points, the input has 7"),
])
def test_accounting_names_every_point_lost_or_counted_twice(maps, results, problem):
    plan = plan_of(7, [(0, 4), (4, 7)])
    maps = maps or {1: map_reply(4, [3, 1]), 2: map_reply(3, [1, 2])}
    results = results or {1: result([(0, 2, (0.5,)), (2, 2, (9.0,))], [3, 1]), 2: result([(1, 3, (4.0,))], [1, 2])}
    with pytest.raises(kmr.JobError, match=r"^iteration 4: points lost or counted twice: .*" + problem):
        kmr.account_for_points(4, plan, 3, 2, maps, results)


def options_for(tmp_path, **given):
    (tmp_path / "points.txt").write_text("1,2\n3,4\n5,6\n")
    fields = {"input_path": str(tmp_path / "points.txt"), "mappers": 2, "reducers": 2, "clusters": 2,
              "iterations": 5, "data_dir": str(tmp_path / "Data"), "seed": 9}
    return kmr.JobOptions(**{**fields, **given})


def test_prepare_counts_the_input_and_fixes_the_plan(tmp_path):
    plan, done, current = kmr.prepare(options_for(tmp_path, restarts=3))
    assert done == [] and current is None
    assert (plan.points, plan.dim, plan.ranges, plan.input_path) == (3, 2, ((0, 2), (2, 3)), str(tmp_path / "points.txt"))
    assert plan.seeds[0] == 9 and len(set(plan.seeds)) == 3 and plan.seeds == kmr.prepare(options_for(tmp_path, restarts=3))[0].seeds
    assert plan.given_init is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.points = 4


def test_checkpoint_round_trip_and_refusals(tmp_path):
    options = options_for(tmp_path)
    plan, _, _ = kmr.prepare(options)
    history = [[(1.0, 2.0), (5.0, 6.0)], [(2.0, 3.0), (5.0, 6.0)]]
    stats = kmr.IterationStats(1, 1.4142135623730951, 1, 10.0, [2, 1], 0.01, {"map": 0.005}, {"failures": 1})
    done = kmr.RunResult(9, [stats], False, 8.0, [2, 1], history, {"failures": 1})
    under_way = kmr.Progress(2, 17, [history[0]], [], False, {"respawns": 1})
    plan.checkpoint.save(9, [done], under_way)
    saved = json.loads((tmp_path / "Data" / kmr.CHECKPOINT).read_text())
    assert saved["job"]["K"] == 2 and saved["seed"] == 9 and "initial" not in saved["current"]   # derived: not kept
    seed, runs, current = plan.checkpoint.restore(None)
    assert (seed, runs, current) == (9, [done], under_way)
    assert runs[0].initial == history[0] and runs[0].centroids == history[1] and current.previous is None
    with pytest.raises(kmr.InputError, match=r"is of another job \(seed 9 there, 10 here\)"):
        plan.checkpoint.restore(10)
    other = kmr.Checkpoint(options.data_dir, {**kmr.job_identity(options), "K": 3}, plan.checkpoint.pinned, "points.txt")
    with pytest.raises(kmr.InputError, match=r"is of another job \(K 2 there, 3 here\)"):
        other.restore(None)
    (tmp_path / "points.txt").write_text("1,2\n3,4\n5,6\n7,8\n")
    changed = kmr.Checkpoint(options.data_dir, kmr.job_identity(options), kmr.input_identity(options.input_path),
                             "points.txt")
    with pytest.raises(kmr.InputError, match="points.txt changed since"):
        changed.restore(None)
    plan.checkpoint.remove()
    with pytest.raises(kmr.InputError, match="there is no checkpoint"):
        plan.checkpoint.restore(None)
    (tmp_path / "Data" / kmr.CHECKPOINT).write_text(json.dumps({**saved, "kmr checkpoint": 1}))
    with pytest.raises(kmr.InputError, match="was written by another version of kmr"):
        plan.checkpoint.restore(None)
    (tmp_path / "Data" / kmr.CHECKPOINT).write_text(json.dumps({**saved, "runs": [{"seed": 9}]}))
    with pytest.raises(kmr.InputError, match="is not a kmr checkpoint"):
        plan.checkpoint.restore(None)
