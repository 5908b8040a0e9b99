"""TLS between hosts: workers serve with --tls-cert/--tls-key, every client (the master, and
reducers fetching from mappers) verifies them with --tls-ca, using gRPC's own SSL credentials.

Certificates are made per test session with the openssl command (a throwaway CA); openssl's own
s_client checks what a worker presents. A client that does not trust the CA, or speaks plaintext
to a TLS worker (or TLS to a plaintext one), is refused in one line, at once.
"""

import subprocess
import time

import pytest

from conftest import DATA, ROOT, WorkerPool, centroid_lines, make_certificates, run_kmr

SAMPLE_OPTIMUM = centroid_lines((DATA / "case1_expected.txt").read_text())


@pytest.fixture(scope="module")
def certificates(tmp_path_factory):
    """(ca, cert, key) of a CA made here, and another CA's pem that signed nothing of ours."""
    folder = tmp_path_factory.mktemp("tls")
    ca, cert, key = make_certificates(folder / "ours")
    stranger, _, _ = make_certificates(folder / "theirs", name="stranger")
    return ca, cert, key, stranger


@pytest.fixture(scope="module")
def tls_pool(tmp_path_factory, certificates):
    """Two mappers and two reducers serving TLS; the reducers trust the same CA."""
    ca, cert, key, _ = certificates
    root = tmp_path_factory.mktemp("tls_pool")
    pool = WorkerPool(root, 2, 2, "--tls-cert", cert, "--tls-key", key, "--tls-ca", ca,
                      "--input-root", str(tmp_path_factory.getbasetemp()))
    try:
        yield pool
    finally:
        pool.stop()


def master(tmp_path, pool, *tls):
    """The sample through the command line against the pool."""
    (tmp_path / "points.txt").write_text((ROOT / "points.txt").read_text())
    return run_kmr("--role", "master", "-M", 3, "-R", 2, "-K", 2, "--seed", 4, "--compact",
                   "--mapper-addrs", ",".join(pool.mappers), "--reducer-addrs", ",".join(pool.reducers),
                   *tls, cwd=tmp_path, timeout=60)


def test_sample_runs_exactly_over_tls_between_standalone_workers(tmp_path, tls_pool, certificates):
    ca, *_ = certificates
    result = master(tmp_path, tls_pool, "--tls-ca", ca)
    assert result.returncode == 0, result.stderr
    assert centroid_lines(result.stdout) == SAMPLE_OPTIMUM


def test_openssl_verifies_the_certificate_a_mapper_presents(tls_pool, certificates):
    ca, _, _, stranger = certificates
    checks = {}
    for name, trusted in (("ours", ca), ("stranger", stranger)):
        checks[name] = subprocess.run(
            ["openssl", "s_client", "-connect", tls_pool.mappers[0], "-CAfile", str(trusted), "-alpn", "h2",
             "-verify_return_error", "-verify_ip", "127.0.0.1"],
            input="", capture_output=True, text=True, errors="replace", timeout=30).stdout   # h2 frames are binary
    assert "Verify return code: 0 (ok)" in checks["ours"] and "subject=CN = kmr test worker" in checks["ours"]
    assert "Verify return code: 0 (ok)" not in checks["stranger"]


@pytest.mark.parametrize("how, says", [
    ("plaintext", "it closed the connection at once: it probably serves TLS (give --tls-ca)"),
    ("untrusted", "its TLS certificate is not trusted"),
])
def test_master_that_cannot_verify_tls_workers_is_refused_in_one_line_at_once(tmp_path, tls_pool, certificates,
                                                                               how, says):
    _, _, _, stranger = certificates
    started = time.monotonic()
    result = master(tmp_path, tls_pool, *(["--tls-ca", stranger] if how == "untrusted" else []))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("kmr: error:") == 1 and "Traceback" not in result.stderr
    assert says in result.stderr.splitlines()[-1]
    print(f"{how}: refused after {time.monotonic() - started:.2f} s")


def test_tls_master_refuses_plaintext_workers_in_one_line(tmp_path, certificates):
    ca, *_ = certificates
    pool = WorkerPool(tmp_path, 1, 1)
    try:
        result = master(tmp_path, pool, "--tls-ca", ca)
    finally:
        pool.stop()
    assert result.returncode == 1 and result.stderr.count("kmr: error:") == 1
    assert "it does not speak TLS" in result.stderr.splitlines()[-1]


def test_workers_a_master_spawns_serve_tls_with_its_certificate(tmp_path, certificates):
    ca, cert, key, _ = certificates
    (tmp_path / "points.txt").write_text((ROOT / "points.txt").read_text())
    result = run_kmr("--role", "master", "-M", 3, "-R", 2, "-K", 2, "--seed", 4, "-v", "--tls-cert", cert,
                     "--tls-key", key, "--tls-ca", ca, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr
    assert centroid_lines(result.stdout) == SAMPLE_OPTIMUM


@pytest.mark.parametrize("flags, says", [
    (["--tls-cert", "{cert}"], "--tls-cert and --tls-key go together"),
    (["--tls-cert", "{cert}", "--tls-key", "{key}"], "the master needs --tls-ca"),
    (["--tls-ca", "{missing}"], "--tls-ca"),
    (["--tls-ca", "{notpem}"], "not a PEM file"),
    (["--tls-cert", "{cert}", "--tls-key", "{otherkey}", "--tls-ca", "{ca}"], "do not go together"),
])
def test_bad_tls_flags_are_one_line_usage_errors(tmp_path, certificates, flags, says):
    ca, cert, key, _ = certificates
    (tmp_path / "notpem").write_text("hello\n")
    values = {"cert": cert, "key": key, "ca": ca, "missing": tmp_path / "nothing.pem", "notpem": tmp_path / "notpem",
              "otherkey": certificates[3].parent / "worker.key"}
    result = run_kmr("--role", "master", "--input", ROOT / "points.txt",
                     *[flag.format(**values) for flag in flags], cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and says in result.stderr
