"""The scheduler on its own: fake workers, fake time, no processes.

TaskScheduler takes a pool (live, await_live, lose, submit), a job record, a clock and a wait. Here the pool
runs a script instead of RPCs: each attempt ends after a set number of seconds of fake time with a result, a
FAILURE or a lost worker, and the wait moves the fake clock to the next end. What is asserted is mincemeat's
rule and the MapReduce paper's: a FAILURE is re-assigned, a lost worker gets no more work, a straggler is
backed up, the first copy to finish wins and a duplicate result is ignored, and the attempt budget ends the
job with its reasons.
"""

import concurrent.futures

import pytest

from conftest import FakeClock

import kmr

MAP = kmr.Stage("mapper", "Map", 1)


class ScriptedPool:
    """Workers that run a script: script(worker index, task, attempt number) -> (seconds, outcome, value), the
    outcome "ok" (value: the result), "fail" (value: the reason) or "lost"."""

    def __init__(self, clock, script, workers=2):
        self.clock, self.script = clock, script
        self.workers = [kmr.Worker("mapper", index, f"127.0.0.1:{6000 + index}") for index in range(1, workers + 1)]
        self.ends = []     # (time, future, outcome, value)
        self.lost = []     # (worker index, why)
        self.calls = []    # (worker index, task, attempt number, backup)

    def live(self, role):
        return [worker for worker in self.workers if worker.alive]

    def await_live(self, role):
        return bool(self.live(role))

    def lose(self, worker, why, process=None):
        if worker.alive:
            worker.alive = False
            self.lost.append((worker.index, why))

    def submit(self, call, attempt):
        future = concurrent.futures.Future()
        seconds, outcome, value = call(attempt)
        self.calls.append((attempt.worker.index, attempt.task, attempt.number, attempt.backup))
        self.ends.append((self.clock.now + seconds, future, outcome, value))
        return future

    def wait(self, futures, timeout):
        """The fake wait: the clock moves to the next end (at most `timeout` on), ending what is due."""
        pending = [end for end in self.ends if not end[1].done()]
        self.clock.now = min([self.clock.now + timeout] + [max(self.clock.now, end[0]) for end in pending])
        for when, future, outcome, value in pending:
            if when <= self.clock.now:
                if outcome == "ok":
                    future.set_result(value)
                elif outcome == "fail":
                    future.set_exception(kmr.TaskFailed(value, kmr.pb.INJECTED))
                else:
                    future.set_exception(kmr.WorkerLost("no heartbeat for 2 s"))
        return {future for future in futures if future.done()}


def scheduler_for(script, workers=2, max_attempts=4):
    clock = FakeClock()
    pool = ScriptedPool(clock, script, workers)
    record = kmr.Recorder(clock)
    record.start()
    scheduler = kmr.TaskScheduler(pool, record, max_attempts, wait=pool.wait)
    return scheduler, pool, record


def run(scheduler, tasks, script):
    """One stage: {task: (worker index, result)}."""
    results = scheduler.run(MAP, tasks, {}, lambda attempt: script(attempt.worker.index, attempt.task, attempt.number))
    return {task: (worker.index, result) for task, (worker, result) in results.items()}


def outcomes(record):
    return [(a["worker"], a["task"], a["attempt"], a["outcome"]) for a in record.timeline([], None)["attempts"]]


def test_every_task_runs_once_on_some_worker_when_nothing_goes_wrong():
    def script(worker, task, number):
        return 1.0, "ok", f"split {task}"

    scheduler, pool, record = scheduler_for(script)
    assert run(scheduler, [1, 2, 3, 4], script) == {1: (1, "split 1"), 2: (2, "split 2"), 3: (1, "split 3"),
                                                    4: (2, "split 4")}
    assert all(outcome == "SUCCESS" for *_, outcome in outcomes(record)) and len(pool.calls) == 4


def test_a_failure_is_reassigned_and_counted():
    def script(worker, task, number):
        return (0.2, "fail", "injected failure") if (task, number) == (1, 1) else (1.0, "ok", task)

    scheduler, pool, record = scheduler_for(script)
    assert run(scheduler, [1, 2], script) == {1: (1, 1), 2: (2, 2)}
    assert outcomes(record) == [("mapper 1", 1, 1, "FAILURE"), ("mapper 2", 2, 1, "SUCCESS"),
                                ("mapper 1", 1, 2, "SUCCESS")]
    assert record.events["failures"] == 1 and pool.lost == []   # a FAILURE keeps its worker


def test_a_lost_worker_is_dropped_and_its_task_runs_elsewhere():
    def script(worker, task, number):
        return (0.5, "lost", None) if worker == 2 else (1.0, "ok", task)

    scheduler, pool, record = scheduler_for(script)
    assert run(scheduler, [1, 2, 3], script) == {1: (1, 1), 2: (1, 2), 3: (1, 3)}
    assert pool.lost == [(2, "no heartbeat for 2 s")]
    assert [call for call in pool.calls if call[0] == 2] == [(2, 2, 1, False)]   # nothing after it was lost
    assert ("mapper 2", 2, 1, "lost") in outcomes(record)


def test_a_straggler_gets_a_backup_copy_and_the_first_copy_to_finish_wins():
    def script(worker, task, number):
        if (task, number) == (2, 1):
            return 10.0, "ok", "original"   # on worker 2, ten times slower than the rest
        return 1.0, "ok", "backup" if task == 2 else task

    scheduler, pool, record = scheduler_for(script)
    assert run(scheduler, [1, 2, 3], script) == {1: (1, 1), 2: (1, "backup"), 3: (1, 3)}
    assert (1, 2, 2, True) in pool.calls   # the backup: attempt 2 of task 2, on the idle worker 1
    assert record.events["backups"] == 1 and record.events["backups won"] == 1
    assert id(pool.workers[1]) in scheduler.beaten   # worker 2 lost the race: backed up earlier next time
    # the original still runs; once it ends, its result is ignored (mincemeat's rule)
    assert list(scheduler.leftovers.values())[0].worker.index == 2
    pool.wait(scheduler.leftovers, 60.0)
    assert ("mapper 2", 2, 1, "ignored") in outcomes(record)


def test_the_original_copy_finishing_first_wins_and_the_backup_is_ignored():
    def script(worker, task, number):
        if (task, number) == (2, 1):
            return 3.0, "ok", "original"
        if (task, number) == (2, 2):
            return 5.0, "ok", "backup"   # started at about 2 s: ends after the original
        return 1.0, "ok", task

    scheduler, pool, record = scheduler_for(script)
    assert run(scheduler, [1, 2, 3], script)[2] == (2, "original")
    assert record.events["backups"] == 1 and record.events["backups won"] == 0
    pool.wait(scheduler.leftovers, 60.0)
    assert ("mapper 1", 2, 2, "ignored") in outcomes(record)


def test_a_duplicate_result_of_a_finished_task_is_ignored():
    durations = {(1, 1): 3.0, (2, 1): 1.0, (3, 1): 10.0, (1, 2): 1.0, (3, 2): 1.0}

    def script(worker, task, number):   # task 1's backup starts at 2 s and ends with the original, at 3 s
        return durations[task, number], "ok", f"task {task} copy {number}"

    scheduler, pool, record = scheduler_for(script, workers=3)
    results = run(scheduler, [1, 2, 3], script)
    assert (2, 1, 2, True) in pool.calls and results[1][1] in ("task 1 copy 1", "task 1 copy 2")
    copies = sorted(outcome for worker, task, number, outcome in outcomes(record) if task == 1)
    assert copies == ["SUCCESS", "ignored"]   # the copy settled second changed nothing


def test_the_budget_ends_the_job_naming_why_each_try_failed():
    def script(worker, task, number):
        if task == 1:
            return (0.1, "lost", None) if number == 2 else (0.1, "fail", "injected failure")
        return 1.0, "ok", task

    scheduler, pool, record = scheduler_for(script, workers=3)
    with pytest.raises(kmr.JobError, match=r"^mapper task 1 failed 4 times: 3 x injected failure; "
                                           r"1 x mapper \d \(127.0.0.1:600\d\) lost \(no heartbeat for 2 s\)$"):
        run(scheduler, [1, 2], script)


def test_no_live_worker_left_ends_the_job():
    def script(worker, task, number):
        return 0.1, "lost", None

    scheduler, pool, record = scheduler_for(script)
    with pytest.raises(kmr.JobError, match="no live mapper left for task"):
        run(scheduler, [1, 2], script)
    assert sorted(index for index, _ in pool.lost) == [1, 2]


def test_a_task_goes_back_to_the_worker_that_ran_it_last():
    def script(worker, task, number):
        return 1.0, "ok", worker

    scheduler, pool, record = scheduler_for(script)
    first = run(scheduler, [1, 2, 3, 4], script)
    second = run(scheduler, [4, 3, 2, 1], script)   # any order: each split goes where it is parsed
    assert first == second


def attempt_at(now, started, task, relocated=False):
    """An Attempt that started `started` seconds before `now`."""
    worker = kmr.Worker("mapper", task, f"127.0.0.1:{6000 + task}")
    return kmr.Attempt(worker, task, 1, now - started, relocated=relocated)


def test_backup_rule_waits_for_a_finished_sibling_and_a_long_enough_run():
    scheduler, _, _ = scheduler_for(lambda *_: (1.0, "ok", None))
    now = scheduler.clock()
    straggler = scheduler.straggler
    assert straggler([attempt_at(now, 9.0, 1)], []) is None   # nothing finished: no yardstick
    slow, fresh = attempt_at(now, 2.0, 1), attempt_at(now, 0.2, 2)
    assert straggler([slow, fresh], [0.9, 1.0]) is slow   # 2.0 s >= 2 x median 0.95 s
    assert straggler([attempt_at(now, 2.0, 1)], [1.0, 1.2]) is None   # < 2.2 s
    assert straggler([attempt_at(now, 0.4, 1)], [0.01]) is None   # short tasks: never
    beaten = attempt_at(now, 1.2, 1)
    scheduler.beaten.add(id(beaten.worker))
    assert straggler([beaten], [1.0, 1.2]) is not None   # past the median
    assert straggler([attempt_at(now, 3.0, 1, relocated=True)], [1.0]) is None   # relocated: 4 x median
    assert straggler([attempt_at(now, 4.1, 1, relocated=True)], [1.0]) is not None
    backed_up = [attempt_at(now, 5.0, 1), attempt_at(now, 0.1, 1)]   # two copies already
    assert straggler(backed_up, [1.0]) is None
