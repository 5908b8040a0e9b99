"""Shared test machinery: hypothesis profiles, the kmr command line, a pool of standalone workers.

Every process a test starts is stopped in a `finally`; every master run gets a tag in its
environment so a test can prove that nothing it started (or that the master spawned) is left.
"""

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parent.parent
KMR = ROOT / "kmr.py"
DATA = Path(__file__).resolve().parent / "data"
sys.path.insert(0, str(ROOT))

settings.register_profile("dev", max_examples=15, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.register_profile("ci", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

TAG_VARIABLE = "KMR_TEST_TAG"

# A suite started in the background (`nohup tox &`) inherits SIGINT ignored, and so would every master
# it starts: Python leaves an ignored SIGINT ignored, so the tests that press Ctrl-C on a master could
# not. A handler here is reset to the default in each process the tests start.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def tagged_processes(tag):
    """PIDs of live processes whose environment carries this tag (a run and all it spawned)."""
    found = []
    needle = f"{TAG_VARIABLE}={tag}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def stop_tagged(tag):
    """Kill what a test started and left (only processes carrying its own tag)."""
    for pid in tagged_processes(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kmr_env(tag, extra=None):
    """Environment for a kmr subprocess: the stubs importable, a tag to find its processes by."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), **{TAG_VARIABLE: tag})
    env.update(extra or {})
    return env


def run_kmr(*args, cwd, timeout=120, env=None):
    """Run `python kmr.py ARGS` to completion; returns the CompletedProcess.

    Asserts that the run left no process of its own behind, however it ended.
    """
    tag = uuid.uuid4().hex
    try:
        result = subprocess.run([sys.executable, str(KMR), *map(str, args)], cwd=cwd, timeout=timeout,
                                env=kmr_env(tag, env), capture_output=True, text=True)
        for _ in range(50):   # spawned workers notice the master is gone within 0.2 s
            if not tagged_processes(tag):
                break
            time.sleep(0.1)
        assert tagged_processes(tag) == [], f"kmr left processes behind: {tagged_processes(tag)}"
        return result
    finally:
        stop_tagged(tag)


class StandaloneWorker:
    """A `kmr.py --role mapper|reducer --port 0` process and the address it printed."""

    def __init__(self, role, cwd, *extra, env=None, script=KMR):
        self.tag = uuid.uuid4().hex
        # stderr to a file: a worker logs every call there, and an unread pipe would fill and stall it
        self.stderr = open(Path(cwd) / f"{role}-{self.tag}.err", "w+")
        self.process = subprocess.Popen(
            [sys.executable, str(script), "--role", role, "--port", "0", "--data-dir", str(cwd), *extra],
            cwd=cwd, env=kmr_env(self.tag, env), stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        line = self.process.stdout.readline().strip()
        if not line:
            self.stop()
            raise RuntimeError(f"{role} did not start: {Path(self.stderr.name).read_text()}")
        self.address = line

    def stop(self):
        """SIGTERM, then SIGKILL if it does not leave in time."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()
        self.stderr.close()
        stop_tagged(self.tag)


def other_kmr(folder):
    """A copy of kmr.py with one comment line more, in `folder`: a worker of other code."""
    folder.mkdir(exist_ok=True)
    other = folder / "kmr.py"
    other.write_text(KMR.read_text(encoding="utf-8") + "# another version\n", encoding="utf-8")
    return other


class WorkerPool:
    """Standalone mappers and reducers shared by many examples."""

    def __init__(self, cwd, mappers, reducers, *extra):
        self.workers = []
        try:
            self.mappers = [self.start("mapper", cwd, *extra) for _ in range(mappers)]
            self.reducers = [self.start("reducer", cwd, *extra) for _ in range(reducers)]
        except BaseException:
            self.stop()
            raise

    def start(self, role, cwd, *extra):
        """Start one worker and remember it for stop()."""
        worker = StandaloneWorker(role, cwd, *extra)
        self.workers.append(worker)
        return worker.address

    def stop(self):
        """Stop every worker of the pool."""
        for worker in self.workers:
            worker.stop()


@pytest.fixture(scope="session")
def worker_pool(tmp_path_factory):
    """Five mappers and four reducers, started once per test session, reading below the temp root."""
    root = tmp_path_factory.mktemp("pool")
    # many jobs share it, some (raw requests) never ended by a master: room for them until they expire
    pool = WorkerPool(root, 5, 4, "--input-root", str(tmp_path_factory.getbasetemp()), "--max-jobs", "100")
    pool.root = root
    try:
        yield pool
    finally:
        pool.stop()


def read_points(path):
    """Points of a file, parsed the simple way (independent of kmr's parser)."""
    points = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            points.append(tuple(float(x) for x in line.split(",")))
    return points


def centroid_lines(text):
    """A centroid file's lines as a sorted list (the order of clusters is not part of the answer)."""
    return sorted(line.strip() for line in text.splitlines() if line.strip())


def uniform_points(count, seed, dim=2):
    """A seeded square of uniform points: K-means on it takes many iterations to settle."""
    import random
    rng = random.Random(seed)
    return [tuple(round(rng.uniform(-100, 100), 3) for _ in range(dim)) for _ in range(count)]


def write_points(path, points):
    """Write points one per line, 'x,y' in repr precision."""
    Path(path).write_text("".join(",".join(map(repr, p)) + "\n" for p in points))
    return Path(path)


def line_in(path, pattern):
    """The first match of the regex in the log file's whole lines so far (no half a PID), or None."""
    import re
    if not Path(path).exists():
        return None
    text = Path(path).read_text()
    return re.search(pattern, text[:text.rfind("\n") + 1])


def wait_for_line(path, pattern, timeout=60, process=None):
    """Wait until a line matching the regex appears in a log file; returns the match."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := line_in(path, pattern):
            return found
        if process is not None and process.poll() is not None:
            raise AssertionError(f"process ended (exit {process.returncode}) before {pattern!r} appeared")
        time.sleep(0.02)
    raise AssertionError(f"{pattern!r} did not appear in {path} within {timeout} s")


class MasterProcess:
    """A master run in the background, for tests that act on it while it runs."""

    def __init__(self, *args, cwd):
        self.tag = uuid.uuid4().hex
        self.stdout = open(Path(cwd) / f"master-{self.tag}.out", "w+")   # files, not pipes: a full
        self.stderr = open(Path(cwd) / f"master-{self.tag}.err", "w+")   # pipe would stall the master
        self.process = subprocess.Popen([sys.executable, str(KMR), *map(str, args)], cwd=cwd,
                                        env=kmr_env(self.tag), stdout=self.stdout, stderr=self.stderr)

    def finish(self, timeout=120):
        """Wait for the end; returns (exit code, stdout, stderr) and checks nothing is left."""
        self.process.wait(timeout=timeout)
        stdout, stderr = (Path(f.name).read_text() for f in (self.stdout, self.stderr))
        for _ in range(50):
            if not tagged_processes(self.tag):
                break
            time.sleep(0.1)
        assert tagged_processes(self.tag) == [], f"left behind: {tagged_processes(self.tag)}"
        return self.process.returncode, stdout, stderr

    def stop(self):
        """Kill what is left (only this run's own processes)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.stdout.close()
        self.stderr.close()
        stop_tagged(self.tag)


def make_certificates(folder, addresses=("127.0.0.1",), name="kmr test"):
    """A throwaway CA and one worker certificate it signs, naming the given IP addresses (and
    localhost), made with the openssl command; returns (ca.pem, worker.pem, worker.key)."""
    import shutil
    import subprocess
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is missing (.ci/run installs it)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ca, cert, key = folder / "ca.pem", folder / "worker.pem", folder / "worker.key"
    names = ",".join([f"IP:{address}" for address in addresses] + ["DNS:localhost"])
    (folder / "san.ext").write_text(f"subjectAltName={names}\n")
    steps = [
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", folder / "ca.key", "-out", ca, "-days", "2",
         "-subj", f"/CN={name} CA"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", folder / "worker.csr",
         "-subj", f"/CN={name} worker"],
        ["x509", "-req", "-in", folder / "worker.csr", "-CA", ca, "-CAkey", folder / "ca.key", "-CAcreateserial",
         "-out", cert, "-days", "2", "-extfile", folder / "san.ext"],
    ]
    for step in steps:
        subprocess.run(["openssl", *map(str, step)], check=True, capture_output=True)
    return ca, cert, key


class Throttle:
    """Slows a process about 9x from outside, as a busy host would: SIGSTOP 0.4 s, SIGCONT 0.05 s,
    in a loop until stopped (it never stays stopped long enough to look dead)."""

    def __init__(self, pid):
        self.pid, self.done = pid, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        try:
            while not self.done.is_set():
                os.kill(self.pid, signal.SIGSTOP)
                self.done.wait(0.4)
                os.kill(self.pid, signal.SIGCONT)
                self.done.wait(0.05)
        except ProcessLookupError:   # it was replaced or stopped meanwhile
            pass

    def stop(self):
        """Stop slowing it down and let it run."""
        self.done.set()
        self.thread.join()
        try:
            os.kill(self.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def freeze_at_line(process, path, pattern, timeout=60, burst=0.02):
    """Run a process in bursts of `burst` s until a line matching the regex is in the log file, looking
    only while it is stopped; returns the match with the process left stopped (SIGSTOP), at most one
    burst past the line, however slow the machine (wait_for_line and then SIGSTOP leave it running for
    as long as the test process is not scheduled)."""
    deadline = time.monotonic() + timeout
    while True:
        process.send_signal(signal.SIGSTOP)
        if found := line_in(path, pattern):
            return found
        if process.poll() is not None:
            raise AssertionError(f"process ended (exit {process.returncode}) before {pattern!r} appeared")
        if time.monotonic() > deadline:
            process.send_signal(signal.SIGCONT)
            raise AssertionError(f"{pattern!r} did not appear in {path} within {timeout} s")
        process.send_signal(signal.SIGCONT)
        time.sleep(burst)


class FakeClock:
    """Time that moves only when a test moves it (the scheduler's and the recorder's clock in unit tests)."""

    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now
