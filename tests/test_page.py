"""The job page (--ui) and its file (--report), read back from what headless Chromium renders.

Chromium is Debian's `chromium` package; .ci/run installs it, so these tests run in CI. A page is loaded with
`chromium --headless --dump-dom` and the rendered DOM is parsed: the job's numbers, one row per worker, the
iteration count, a FAILURE mark for every FAILURE in dump.txt, a loss mark for every lost worker. The drills
are driven through the endpoint the page's buttons call. Answers are checked against a run of the same job
without the page, or against kmr.kmeans_reference.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import MasterProcess, ROOT, centroid_lines, read_points, run_kmr, uniform_points, wait_for_line, \
    write_points

import kmr


class Dom(HTMLParser):
    """What the tests read from a rendered page: text by id, worker rows, marks by class (scripts skipped)."""

    def __init__(self, text):
        super().__init__()
        self.text, self.rows, self.classes, self.marks, self.buttons = {}, [], [], [], 0
        self.open_ids, self.in_script, self.row = [], False, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script":
            self.in_script = True
        self.classes += (attrs.get("class") or "").split()
        if tag == "text" and attrs.get("class") in ("failure", "loss"):
            self.marks.append((attrs["class"], attrs.get("data-worker")))
        self.buttons += tag == "button"
        if "id" in attrs:
            self.text.setdefault(attrs["id"], "")
        self.open_ids.append(attrs.get("id"))
        if tag == "tr" and "data-worker" in attrs:
            self.row = {"worker": attrs["data-worker"], "class": attrs.get("class", ""), "cells": []}
            self.rows.append(self.row)
        if tag == "td" and self.row is not None:
            self.row["cells"].append("")

    def handle_endtag(self, tag):
        if tag == "script":
            self.in_script = False
        if tag == "tr":
            self.row = None
        if self.open_ids:
            self.open_ids.pop()

    def handle_data(self, data):
        if self.in_script:
            return
        for element in self.open_ids:
            if element is not None:
                self.text[element] += data
        if self.row is not None and self.row["cells"]:
            self.row["cells"][-1] += data


def rendered(url):
    """The page's DOM once its script has run (fetches included), as headless Chromium renders it."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.fail("headless Chromium is missing: apt-get install chromium (.ci/run installs it)")
    result = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=4000",
                             "--dump-dom", url], capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-2000:]
    return Dom(result.stdout)


def page_url(stderr_path, process):
    """The URL the master printed for its page."""
    return wait_for_line(stderr_path, r"job page: (http://\S+)", process=process).group(1)


DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # loopback: never through a proxy


def fetch(url, method="GET", body=None, headers=None):
    """(status, body) of one HTTP request; errors are answers too."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with DIRECT.open(request, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def frozen(dump, workers, process):
    """SIGSTOP some of a master's spawned workers ("mapper 2", ..., by the PIDs its dump.txt gives): the master
    then waits on them (with a long --heartbeat), so its page can be read mid-job however fast the machine is."""
    pids = [int(wait_for_line(dump, rf"spawned {worker}, PID (\d+),", process=process).group(1)) for worker in workers]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    return pids


def thaw(pids):
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def test_live_page_of_a_300k_point_job_off_loopback_needs_its_token_and_shows_the_job(tmp_path):
    """A 300k-point job with its page on 127.0.0.2 (not 127.0.0.1: the token is required): Chromium renders
    the job's numbers, a row per worker and the iterations so far while it runs (its mappers held still);
    the API answers 403 without the token, 404 for unknown paths and for the drills (not enabled), a clean
    error for a huge header; the page has no drill buttons; the answer is the same as without the page."""
    points = write_points(tmp_path / "points.txt", uniform_points(300_000, seed=5))
    write_points(tmp_path / "init.txt", read_points(points)[:8])
    job = ["--role", "master", "--input", points, "--init", tmp_path / "init.txt", "-K", 8, "-M", 3, "-R", 2, "-n", 25,
           "--heartbeat", 120]
    master = MasterProcess(*job, "--ui", "127.0.0.2:0", "--data-dir", tmp_path / "ui", cwd=tmp_path)
    held = []
    try:
        url = page_url(master.stderr.name, master.process)
        assert url.startswith("http://127.0.0.2:") and "?token=" in url
        wait_for_line(tmp_path / "ui" / "dump.txt", r"\] === iteration 2 ===", process=master.process)
        held = frozen(tmp_path / "ui" / "dump.txt", ["mapper 1", "mapper 2", "mapper 3"], master.process)
        dom = rendered(url)
        base, token = url.split("?token=")
        data = json.loads(fetch(base + "api/job", headers={"X-Kmr-Token": token})[1])
        refusals = [fetch(base + "api/job")[0], fetch(base + "nothing-here?token=" + token)[0],
                    fetch(base + "api/drill?token=" + token, "POST", b'{"worker": "mapper 1", "action": "kill"}',
                          {"Content-Type": "application/json"})[0],
                    fetch(base + "api/job?token=" + token, headers={"X-Junk": "x" * 70000})[0]]
        thaw(held)
        code, stdout, stderr = master.finish(timeout=300)
    finally:
        thaw(held)
        master.stop()
    assert dom.text["job-points"] == "300000" and dom.text["job-K"] == "8" and dom.text["job-M"] == "3"
    assert dom.text["state"] == "running" and int(dom.text["iteration-count"]) >= 1
    assert [row["worker"] for row in dom.rows] == ["mapper 1", "mapper 2", "mapper 3", "reducer 1", "reducer 2"]
    assert data["job"]["points"] == 300_000 and len(data["workers"]) == 5 and data["state"] == "running"
    assert refusals[:3] == [403, 404, 404] and refusals[3] in (400, 431) and dom.buttons == 0
    assert token not in (tmp_path / "ui" / "dump.txt").read_text()   # the token is on the console only
    plain = run_kmr(*job, "--data-dir", tmp_path / "plain", cwd=tmp_path, timeout=300)
    assert code == 0 and plain.returncode == 0 and stdout == plain.stdout


def test_report_of_a_failure_drill_marks_every_failure_and_every_lost_worker(tmp_path):
    """The sample under --fail-prob 0.3 with a mapper killed after its Map of iteration 2, written as a report
    and opened from disk: the job's numbers, a row per worker, the iterations, a FAILURE mark for each FAILURE
    reply in dump.txt and a loss mark for each worker marked dead."""
    shutil.copy(ROOT / "points.txt", tmp_path / "points.txt")
    result = run_kmr("--role", "master", "-M", 3, "-R", 2, "-K", 2, "--seed", 1, "--fail-prob", 0.3, "--fail-seed", 4,
                     "--crash", "mapper:1:after-map:2", "--report", tmp_path / "report.html", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    dump = (tmp_path / "Data" / "dump.txt").read_text()
    dom = rendered((tmp_path / "report.html").as_uri())
    # FAILURE replies: injected ones, and reducers that could not fetch the killed mapper's output
    failures = re.findall(r"\[master \d+\]   <- \w+ .* FAILURE .*: (?:injected failure|map output missing)", dump)
    lost = dump.count("marked dead")
    assert failures and lost == 1
    assert dom.classes.count("failure") == len(failures)
    assert dom.marks.count(("loss", "mapper 1")) == lost
    assert dom.text["job-points"] == "31" and dom.text["state"] == "finished"
    assert int(dom.text["iteration-count"]) == len(re.findall(r"\] iteration +\d+ +shift", dump))
    rows = {row["worker"]: row for row in dom.rows}
    assert sorted(rows) == ["mapper 1", "mapper 2", "mapper 3", "reducer 1", "reducer 2"]
    assert sum(int(row["cells"][5]) for row in dom.rows) == len(failures)   # the FAILURE column


def test_a_kill_from_the_page_is_a_fault_like_any_other_and_the_answer_stays_exact(tmp_path):
    """With --ui-drills the page's kill (its endpoint, as the button calls it) kills a spawned mapper by PID:
    the job recovers to the fault-free centroids, and the page (read while the reducers are held still) and
    dump.txt show the loss."""
    # 40 iterations of points that settle only at iteration 170: the job is still running well after the kill
    points = write_points(tmp_path / "points.txt", uniform_points(60_000, seed=3))
    init = write_points(tmp_path / "init.txt", read_points(points)[:8])
    master = MasterProcess("--role", "master", "--input", points, "--init", init, "-K", 8, "-M", 3, "-R", 2, "-n", 40,
                           "--heartbeat", 120, "--ui", "0", "--ui-drills", cwd=tmp_path)
    dump, held = tmp_path / "Data" / "dump.txt", []
    try:
        url = page_url(master.stderr.name, master.process)
        wait_for_line(dump, r"\] === iteration 2 ===", process=master.process)
        drill = b'{"worker": "mapper 1", "action": "kill"}'
        cross_site = fetch(url + "api/drill", "POST", drill, {"Content-Type": "text/plain"})[0]
        status, answer = fetch(url + "api/drill", "POST", drill, {"Content-Type": "application/json"})
        refused = fetch(url + "api/drill", "POST", b'{"worker": "mapper 9", "action": "kill"}',
                        {"Content-Type": "application/json"})[0]
        wait_for_line(dump, r"mapper 1 .* marked dead", process=master.process)   # its next task found it gone
        held = frozen(dump, ["reducer 1", "reducer 2"], master.process)   # no iteration ends: the page is read mid-job
        data = json.loads(fetch(url + "api/job")[1])
        dom = rendered(url)
        thaw(held)
        code, stdout, stderr = master.finish(timeout=300)
    finally:
        thaw(held)
        master.stop()
    assert status == 200 and json.loads(answer)["done"].startswith("kill mapper 1 (PID ") and refused == 400
    assert data["timeline"]["losses"] and data["timeline"]["losses"][0]["worker"] == "mapper 1"
    assert dom.marks.count(("loss", "mapper 1")) == 1 and dom.buttons == 3 * 5   # the ⚡ on mapper 1's lane
    assert cross_site == 400   # a page elsewhere cannot send application/json without asking first
    dump = (tmp_path / "Data" / "dump.txt").read_text()
    assert "drill from the page: kill mapper 1 (PID " in dump and "drill from the page" in stderr
    expected, _ = kmr.kmeans_reference(read_points(points), read_points(init), 40)
    assert code == 0 and centroid_lines(stdout) == centroid_lines(kmr.format_centroids(expected))


def test_drills_need_the_page(tmp_path):
    result = run_kmr("--role", "master", "--ui-drills", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr == "kmr: error: --ui-drills needs --ui\n"
