"""kmr across several "hosts": Linux network namespaces joined by a bridge, with faults injected.

Two tests: workers at fixed addresses given to the master (below), and workers that join a master with
--listen, one more joining mid-run, one leaving on SIGTERM and a reducer unplugged (the second test).

What it shows: the standalone roles work as the README's "on other hosts" section says.  Each worker
runs in its own network namespace with its own address (10.250.<n>.0/24, all on a bridge that lives in
a separate "switch" namespace), binds that address with `--host`, and is reached only over that virtual
network - by the master, and by the reducers, which pull their partitions straight from the mappers.
All of them share the filesystem, so the input is at the same absolute path everywhere, as the README
requires.  While the job runs (after iteration 2) the test

  * SIGKILLs mapper 2 (the python process itself: `ip netns exec` execs, so Popen.pid is it), and
  * takes reducer 2's cable out (its port on the bridge goes down: the process lives on, unreachable),

and the master must still finish (exit 0) with exactly the centroids of the sequential reference
`kmr.kmeans_reference` from the same initial centroids, after marking both workers dead and
re-assigning their tasks to the survivors.

Topology (<run> is unique per run, so parallel or leftover runs never clash):

    <run>-sw:      bridge br0; one veth end per host attached to it
    <run>-master   10.250.<n>.1     <run>-m1, m2, m3   10.250.<n>.11-13   <run>-r1, r2   10.250.<n>.21-22

Only namespaces this test creates are touched: nothing is configured in the machine's own namespace,
and every namespace (and with it every veth and the bridge) is deleted in a `finally`.

Needs root and iproute2 (`ip netns add` must work); otherwise it is skipped with the reason.  It takes
~35 s: after the faults every iteration waits ~2 s, because the master's revive() pings each dead
standalone worker at the start of every iteration and the unplugged reducer never answers.  Run:

    sudo -E python -m pytest tests/test_multihost.py -q -p no:cacheprovider -s
"""

import os
import random
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import kmr
from conftest import KMR, kmr_env, make_certificates, read_points, stop_tagged, tagged_processes, wait_for_line

TOKEN = "multihost-" + secrets.token_hex(8)
PORT = 7000
RPC_TIMEOUT = 3
BUDGET = 75            # seconds the master may take at most (the run takes ~25-35 s)
HOSTS = {"master": 1, "m1": 11, "m2": 12, "m3": 13, "r1": 21, "r2": 22}
PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "grpc_proxy", "no_proxy", "no_grpc_proxy")


def ip(*args, check=True):
    """Run one `ip` command (bounded); returns the CompletedProcess."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def netns_unavailable():
    """Why network namespaces cannot be used here, or None when they can."""
    if shutil.which("ip") is None:
        return "iproute2 'ip' is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root (this test runs as uid %d)" % os.geteuid()
    probe = f"kmrprobe-{os.getpid()}-{secrets.token_hex(2)}"
    added = ip("netns", "add", probe, check=False)
    if added.returncode != 0:
        return f"'ip netns add' does not work here: {added.stderr.strip()}"
    ip("netns", "delete", probe, check=False)
    return None


class Network:
    """A bridge in a switch namespace and one namespace per host, each with a veth to the bridge."""

    def __init__(self):
        self.run = f"kmr{os.getpid()}-{secrets.token_hex(2)}"   # namespace names start with this
        self.subnet = 1 + os.getpid() % 254                      # 10.250.<subnet>.0/24
        self.switch = f"{self.run}-sw"
        self.namespaces = []

    def ns(self, host):
        return f"{self.run}-{host}"

    def address(self, host):
        return f"10.250.{self.subnet}.{HOSTS[host]}"

    def port_name(self, host):
        """The bridge-side end of a host's veth (inside the switch namespace)."""
        return f"p-{host}"

    def add_namespace(self, name):
        ip("netns", "add", name)
        self.namespaces.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def build(self):
        self.add_namespace(self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        for host in HOSTS:
            name = self.ns(host)
            self.add_namespace(name)
            ip("-n", name, "link", "add", "eth0", "type", "veth",
               "peer", "name", self.port_name(host), "netns", self.switch)
            ip("-n", self.switch, "link", "set", self.port_name(host), "master", "br0")
            ip("-n", self.switch, "link", "set", self.port_name(host), "up")
            ip("-n", name, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
            ip("-n", name, "link", "set", "eth0", "up")

    def unplug(self, host):
        """Take the host's port on the bridge down: its packets go nowhere, its process lives on."""
        ip("-n", self.switch, "link", "set", self.port_name(host), "down")

    def destroy(self):
        """Delete every namespace this network made (their veths and the bridge go with them)."""
        for name in reversed(self.namespaces):
            ip("netns", "delete", name, check=False)
        left = set(ip("netns", "list", check=False).stdout.split()) & set(self.namespaces)
        self.namespaces = []
        assert not left, f"namespaces left behind: {sorted(left)}"


def host_env(tag):
    """A kmr subprocess environment, without proxy settings (gRPC would send 10.250.* to a proxy)."""
    env = kmr_env(tag)
    for name in PROXY_VARIABLES:
        env.pop(name, None)
        env.pop(name.upper(), None)
    return env


class Host:
    """One kmr process started with `ip netns exec NS python kmr.py ...` (exec: Popen.pid is python)."""

    def __init__(self, network, host, args, log_dir, tag):
        self.name = host
        self.log = open(Path(log_dir) / f"{host}.stderr", "w+")
        self.out = open(Path(log_dir) / f"{host}.stdout", "w+")
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", network.ns(host), sys.executable, str(KMR), *map(str, args)],
            cwd=log_dir, env=host_env(tag), stdout=subprocess.PIPE if host != "master" else self.out,
            stderr=self.log, text=True)

    def printed_address(self, timeout=20):
        """The first stdout line of a standalone worker: the address it listens on."""
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline().strip() if ready else ""
        if not line:
            self.log.seek(0)
            raise AssertionError(f"{self.name} printed no address (exit {self.process.poll()}): "
                                 f"{self.log.read()[-2000:]}")
        return line

    def running_python(self):
        """Whether Popen.pid is the kmr python process itself (not an `ip` parent)."""
        try:
            cmdline = Path(f"/proc/{self.process.pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return str(KMR).encode() in cmdline and cmdline[0] != b"ip"

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            pass
        for stream in (self.process.stdout, self.log, self.out):
            if stream is not None:
                stream.close()


def tear_down(hosts, tag, network):
    """Stop every host's process and anything else carrying the run's tag, then delete the network."""
    for host in hosts.values():
        host.stop()
    stop_tagged(tag)
    try:
        assert tagged_processes(tag) == [], f"processes left behind: {tagged_processes(tag)}"
    finally:
        network.destroy()


def job_files(folder, points, init):
    """The input (in its own folder, every mapper's --input-root) and the --init file; (the folder, the
    input, the init file, the points as kmr reads them)."""
    input_dir = folder / "input"
    input_dir.mkdir()
    input_path = input_dir / "points.txt"
    input_path.write_text(kmr.format_centroids(points))
    init_path = folder / "init.txt"
    init_path.write_text(kmr.format_centroids(init))
    return input_dir, input_path, init_path, read_points(input_path)


def blobs(count, seed):
    """Four seeded Gaussian blobs in 2-D, coordinates rounded to 4 decimals."""
    rng = random.Random(seed)
    centres = [(0.0, 0.0), (20.0, 0.0), (0.0, 20.0), (20.0, 20.0)]
    return [tuple(round(rng.gauss(c, 3.0), 4) for c in centres[i % 4]) for i in range(count)]


def test_job_across_network_namespaces_survives_a_killed_mapper_and_an_unplugged_reducer(tmp_path):
    reason = netns_unavailable()
    if reason:
        print(f"\nskipped: {reason}")
        pytest.skip(reason)

    points = blobs(30_000, seed=7)
    init = [points[0], points[4], points[8], points[12]]   # all from one blob: ~14 iterations to settle
    input_dir, input_path, init_path, points = job_files(tmp_path, points, init)

    tag = uuid.uuid4().hex
    network = Network()
    hosts = {}
    started = time.monotonic()
    try:
        network.build()
        print(f"\nnetwork {network.run}: 10.250.{network.subnet}.0/24 up in "
              f"{time.monotonic() - started:.2f} s")
        workers = ("m1", "m2", "m3", "r1", "r2")
        ca, cert, key = make_certificates(tmp_path / "tls", [network.address(host) for host in workers])
        for host in workers:
            role = "mapper" if host.startswith("m") else "reducer"
            hosts[host] = Host(network, host, [
                "--role", role, "--host", network.address(host), "--port", PORT, "--token", TOKEN,
                "--tls-cert", cert, "--tls-key", key, "--tls-ca", ca,
                "--input-root", input_dir, "--data-dir", tmp_path / host, "--rpc-timeout", RPC_TIMEOUT],
                tmp_path, tag)
        addresses = {host: hosts[host].printed_address() for host in hosts}
        for host, address in addresses.items():
            assert address == f"{network.address(host)}:{PORT}"
            assert hosts[host].running_python(), f"{host}: Popen.pid is not the kmr process"

        out = tmp_path / "out"
        dump = out / "dump.txt"
        hosts["master"] = master = Host(network, "master", [
            "--role", "master", "-M", 6, "-R", 2, "-K", 4, "-n", 40, "--input", input_path,
            "--init", init_path, "--data-dir", out, "--rpc-timeout", RPC_TIMEOUT, "--token", TOKEN, "--tls-ca", ca,
            "--mapper-addrs", ",".join(addresses[h] for h in ("m1", "m2", "m3")),
            "--reducer-addrs", ",".join(addresses[h] for h in ("r1", "r2"))], tmp_path, tag)
        master_started = time.monotonic()

        # the master reaches mapper 2 and it answers with the PID we are about to kill
        victim = hosts["m2"].process.pid
        found = wait_for_line(dump, rf"mapper 2 \({re.escape(addresses['m2'])}\) answers: PID (\d+)",
                              timeout=20, process=master.process)
        assert int(found.group(1)) == victim
        wait_for_line(dump, r"iteration 2: centroids", timeout=30, process=master.process)
        os.kill(victim, signal.SIGKILL)
        network.unplug("r2")
        injected = time.monotonic()
        assert master.process.poll() is None, "the run ended before the faults: make the dataset bigger"
        fault_iteration = max(map(int, re.findall(r"=== iteration (\d+) ===", dump.read_text())))
        print(f"faults injected {injected - master_started:.2f} s into the run, in iteration "
              f"{fault_iteration}: SIGKILL mapper 2 (PID {victim}), reducer 2's port down")

        try:
            code = master.process.wait(BUDGET)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the master did not finish within {BUDGET} s; dump ends: "
                                 f"{dump.read_text()[-3000:]}") from None
        finished = time.monotonic()
        master.out.seek(0)
        master.log.seek(0)
        stdout, stderr = master.out.read(), master.log.read()
        log = dump.read_text()
        print(f"master exit {code} after {finished - master_started:.2f} s "
              f"({finished - injected:.2f} s after the faults)")

        assert code == 0, stderr[-3000:]
        assert hosts["m2"].process.wait(5) == -signal.SIGKILL
        assert hosts["r2"].process.poll() is None   # alive, only unreachable

        expected, iterations = kmr.kmeans_reference(points, init, 40)
        assert iterations > fault_iteration, "the run ended before the faults: make the dataset bigger"
        assert stdout == kmr.format_centroids(expected)
        assert [tuple(map(float, line.split(","))) for line in stdout.splitlines()] == expected
        assert (out / "centroids.txt").read_text() == kmr.format_centroids(expected)
        assert f"converged after {iterations} iterations" in log
        assert f"iteration {iterations}: all 30000 points accounted for exactly once" in log

        assert re.search(rf"mapper 2 \({re.escape(addresses['m2'])}\) marked dead", log)
        # the unplugged reducer: outrun by a backup copy of its task, or found silent by heartbeats
        r2 = re.escape(addresses["r2"])
        assert re.search(rf"reducer 2 \({r2}\) marked dead \(no heartbeat for 2 s\)|"
                         rf"the backup copy \(attempt \d+ on reducer 1 .*\) finished first; attempt \d+ on reducer 2 "
                         rf"\({r2}\) is ignored", log)
        assert re.search(rf"mapper task \d re-assigned: mapper 2 \({re.escape(addresses['m2'])}\) did not "
                         rf"answer|iteration \d+: re-executing map tasks", log)
        # after the faults, only the survivors did the work
        last = log[log.rfind(f"=== iteration {iterations} ==="):]
        succeeded = set(re.findall(r"<- \w+ .* SUCCESS .* ms   (\w+ \d) \(", last))
        assert succeeded == {"mapper 1", "mapper 3", "reducer 1"}, succeeded
        # the reducers fetched partitions straight from the mappers' namespaces
        r1_log = next((tmp_path / "r1").glob("reducer-*.log")).read_text()
        assert re.search(rf"GetPartition\(task \d\) SUCCESS from {re.escape(addresses['m1'])}", r1_log)
        print(f"converged after {iterations} iterations; total {time.monotonic() - started:.2f} s")
    finally:
        tear_down(hosts, tag, network)


def test_workers_in_three_namespaces_join_a_master_in_a_fourth_and_one_joins_one_leaves_one_is_unplugged(tmp_path):
    """The join recipe across hosts, over TLS with a token: mapper m1 and reducers r1, r2 join the master (each in
    its own namespace, each given only the master's address); mapper m2 joins in iteration 2 and takes a share of
    the six map tasks; then m1 gets SIGTERM and leaves (released, not lost), and r2's cable is pulled. The
    centroids are the sequential reference's, bit for bit."""
    reason = netns_unavailable()
    if reason:
        print(f"\nskipped: {reason}")
        pytest.skip(reason)

    rng = random.Random(19)
    points = [(round(rng.uniform(-100, 100), 3), round(rng.uniform(-100, 100), 3)) for _ in range(100_000)]
    init = list(dict.fromkeys(points))[:8]
    input_dir, input_path, init_path, points = job_files(tmp_path, points, init)

    tag = uuid.uuid4().hex
    network = Network()
    hosts = {}
    try:
        network.build()
        ca, cert, key = make_certificates(tmp_path / "tls", [network.address(host) for host in HOSTS])
        tls = ["--token", TOKEN, "--tls-cert", cert, "--tls-key", key, "--tls-ca", ca]
        registry = f"{network.address('master')}:7077"

        def join(host):
            role = "mapper" if host.startswith("m") else "reducer"
            hosts[host] = Host(network, host, [
                "--role", role, "--host", network.address(host), "--port", PORT, "--join", registry, *tls,
                "--input-root", input_dir, "--data-dir", tmp_path / host], tmp_path, tag)
            assert hosts[host].printed_address() == f"{network.address(host)}:{PORT}"

        for host in ("m1", "r1", "r2"):   # before the master: they ask again until it is up
            join(host)
        out = tmp_path / "out"
        dump = out / "dump.txt"
        hosts["master"] = master = Host(network, "master", [
            "--role", "master", "--listen", registry, "--min-reducers", 2, *tls, "-M", 6, "-R", 2, "-K", 8,
            "-n", 30, "--input", input_path, "--init", init_path, "--data-dir", out], tmp_path, tag)
        address = {host: f"{network.address(host)}:{PORT}" for host in HOSTS}

        wait_for_line(dump, r"iteration 2: centroids", timeout=60, process=master.process)
        join("m2")
        wait_for_line(dump, rf"mapper 2 \({re.escape(address['m2'])}\) joined: PID \d+ on .*; tasks from the next "
                            rf"stage on", timeout=30, process=master.process)
        wait_for_line(dump, rf"<- Map .* SUCCESS .* mapper 2 \({re.escape(address['m2'])}\)", timeout=30,
                      process=master.process)
        hosts["m1"].process.send_signal(signal.SIGTERM)
        assert hosts["m1"].process.wait(60) == 0
        wait_for_line(dump, rf"mapper 1 \({re.escape(address['m1'])}\) left \(released\)", timeout=5)
        network.unplug("r2")
        fault_iteration = max(map(int, re.findall(r"=== iteration (\d+) ===", dump.read_text())))
        assert master.process.poll() is None, "the run ended before the faults: make the dataset bigger"
        print(f"\nm2 joined, m1 left and r2 was unplugged by iteration {fault_iteration}")

        try:
            code = master.process.wait(BUDGET)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the master did not finish within {BUDGET} s; dump ends: "
                                 f"{dump.read_text()[-3000:]}") from None
        master.out.seek(0)
        master.log.seek(0)
        stdout, stderr = master.out.read(), master.log.read()
        log = dump.read_text()
        assert code == 0, stderr[-3000:]
        expected, iterations = kmr.kmeans_reference(points, init, 30)
        assert iterations > fault_iteration
        assert stdout == kmr.format_centroids(expected)

        hosts["m1"].log.seek(0)
        m1_log = hosts["m1"].log.read()
        assert "released by the master" in m1_log and "kmr: error" not in m1_log
        assert not re.search(rf"mapper 1 \({re.escape(address['m1'])}\) marked dead", log)   # it left, not lost
        # the reducers' lanes are in the order they joined: find which is which by address
        lane = {host: re.search(rf"(reducer \d) \({re.escape(address[host])}\) joined", log).group(1)
                for host in ("r1", "r2")}
        r2 = re.escape(address["r2"])
        assert re.search(rf"{lane['r2']} \({r2}\) marked dead \(no heartbeat for 2 s\)|"
                         rf"the backup copy \(attempt \d+ on {lane['r1']} .*\) finished first; attempt \d+ on "
                         rf"{lane['r2']} \({r2}\) is ignored", log)
        last = log[log.rfind(f"=== iteration {iterations} ==="):]
        succeeded = set(re.findall(r"<- \w+ .* SUCCESS .* ms   (\w+ \d) \(", last))
        assert succeeded == {"mapper 2", lane["r1"]}, succeeded
        assert re.search(r"waiting for workers to join at [\d.]+:7077 \(TLS\)", stderr)
    finally:
        tear_down(hosts, tag, network)
