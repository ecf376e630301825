"""The dashboard end to end, as a user sees it: two workers (a wafer and a GPU) under a small
load, `memorywall dashboard` pointed at them (one by URL, one by a fleet's ready file), and
Debian's headless Chromium rendering the page. The rendered DOM must name both devices and
show live values that change while the load runs; a screenshot is saved (its path is
printed). Skipped without Chromium, except under MEMORYWALL_CI=1 (CI installs it), where
its absence fails."""

from __future__ import annotations

import contextlib
import html
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from memorywall.client import Client
from memorywall.fleet.runner import FleetReady
from memorywall.ready import ServerReady, wait_for, write_json

START_TIMEOUT_S = 30.0
CHROMIUM_TIMEOUT_S = 25.0
HARDWARE = ("wse-3", "h100-sxm")
# What every run of Chromium needs: no sandbox (root in a container), nothing fetched or
# synced in the background, a profile of its own.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--disable-dev-shm-usage",
)
VALUE = re.compile(
    r'<span class="(?:num|second)" data-worker="([^"]+)" data-metric="(\w+)">([^<]*)'
)


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("MEMORYWALL_CI") == "1":
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


def start(args: list[str], ready: Path, log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "memorywall", *args, "--ready-file", str(ready)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@contextlib.contextmanager
def load(targets: list[str], users: int = 2) -> Iterator[None]:
    """Closed-loop users on every worker (gRPC, the client library) until the block ends."""
    done = threading.Event()
    errors: list[BaseException] = []

    def user(target: str) -> None:
        try:
            with Client(target) as client:
                while not done.is_set():
                    client.complete(prompt_tokens=64, max_tokens=96)
        except BaseException as e:  # reported after the block: a thread cannot fail a test
            if not done.is_set():
                errors.append(e)

    threads = [
        threading.Thread(target=user, args=(t,), daemon=True) for t in targets for _ in range(users)
    ]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        done.set()
        for t in threads:
            t.join(timeout=15)
    assert not errors, errors


def render(browser: str, url: str, profile: Path, *extra: str) -> str:
    """Chromium's DOM of `url` after the page ran for a few (virtual) seconds."""
    out = subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, url],
        capture_output=True,
        text=True,
        timeout=CHROMIUM_TIMEOUT_S,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def values(dom: str) -> dict[tuple[str, str], str]:
    """Every figure the page shows, by (worker, metric)."""
    return {(w, m): html.unescape(v) for w, m, v in VALUE.findall(dom)}


def number(text: str) -> float | None:
    match = re.match(r"[-0-9.,]+", text)
    return float(match.group().replace(",", "")) if match else None


def test_dashboard_in_headless_chromium(tmp_path):
    browser = chromium()
    procs: list[subprocess.Popen] = []
    try:
        workers = []
        for hw in HARDWARE:
            args = ["serve", "--hardware", hw, "--model", "llama-3.1-8b", "--host", "127.0.0.1"]
            args += ["--port", "0", "--http-port", "0", "--load-format", "dummy", "--grace", "0.5"]
            ready = tmp_path / f"{hw}.json"
            procs.append(start(args, ready, tmp_path / f"{hw}.log"))
            workers.append((ready, procs[-1]))
        served = [
            ServerReady.from_dict(wait_for(r, p, timeout_s=START_TIMEOUT_S)) for r, p in workers
        ]
        # The wafer by URL; the GPU from a fleet's ready file, as `fleet --ready-file` writes it.
        fleet = FleetReady(pid=1, log_dir=str(tmp_path), workers={"gpu": served[1]}, gateway=None)
        write_json(tmp_path / "fleet.json", fleet.as_dict())
        args = ["dashboard", "--port", "0", "--interval", "0.5", "--window", "2"]
        args += ["--worker", str(served[0].http_url), "--fleet", str(tmp_path / "fleet.json")]
        ready = tmp_path / "dashboard.json"
        procs.append(start(args, ready, tmp_path / "dashboard.log"))
        url = wait_for(ready, procs[-1], timeout_s=START_TIMEOUT_S)["url"]
        names = [f"127.0.0.1:{served[0].http_port}", "gpu"]
        with load([str(s.grpc_target) for s in served]):
            time.sleep(2.5)  # a window of scrapes under load
            budget = "--virtual-time-budget=3000"
            first = render(browser, url, tmp_path / "profile-1", budget, "--dump-dom")
            time.sleep(1.5)
            second = render(browser, url, tmp_path / "profile-2", budget, "--dump-dom")
            shot = tmp_path / "dashboard.png"
            render(
                browser,
                url,
                tmp_path / "profile-3",
                budget,
                "--window-size=1280,900",
                "--hide-scrollbars",
                f"--screenshot={shot}",
            )
    finally:
        stop(procs)
    print(f"dashboard screenshot: {shot}")
    assert shot.stat().st_size > 10_000  # a rendered page, not a blank one
    for dom in (first, second):
        for hw in HARDWARE:
            assert f">{hw}" in dom, f"no column names {hw}"
    a, b = values(first), values(second)
    for name in names:
        for metric in ("tokens_per_s", "tokens_per_s_per_user", "itl_mean_s", "power_w"):
            for shown in (a, b):
                value = number(shown[(name, metric)])
                assert value is not None and value > 0, (name, metric, shown[(name, metric)])
        # Live: the figures move between two renders a second and a half apart.
        keys = [(name, m) for m in ("tokens_per_s", "tokens_per_s_per_user", "ttft_p50_s")]
        assert [a[k] for k in keys] != [b[k] for k in keys], (a, b)
