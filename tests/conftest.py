"""Shared fixtures. Real recordings live in ../shared/data/real beside the checkout."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"


@pytest.fixture(scope="session", autouse=True)
def shared_cache(tmp_path_factory) -> Path:
    """One cache (ONNX exports, training shards) for the whole run and the nodes it starts: each graph is
    exported once, and the user's ~/.cache is left alone. A $FUSION_ATTN_CACHE already set is kept."""
    if "FUSION_ATTN_CACHE" not in os.environ:
        os.environ["FUSION_ATTN_CACHE"] = str(tmp_path_factory.getbasetemp() / "cache")
    return Path(os.environ["FUSION_ATTN_CACHE"])


def pytest_addoption(parser):
    parser.addoption("--prefetch-graphs", action="store_true",
                     help="export the ONNX graphs much of the run needs in a process beside it (tests/graphs.py)")


@pytest.fixture(scope="session", autouse=True)
def prefetched_graphs(shared_cache, request):
    """With --prefetch-graphs, tests/graphs.py exports into the run's cache beside the tests from the
    start; stopped at the end if still busy (a test never depends on it: it waits for or makes a graph)."""
    if not request.config.getoption("--prefetch-graphs"):
        yield
        return
    shared_cache.mkdir(parents=True, exist_ok=True)
    with open(shared_cache / "prefetch.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("graphs.py"))], stdout=log,
                                stderr=subprocess.STDOUT)
    # niced: on 2 cores its exports would otherwise starve the tests that time a node over DDS
    os.setpriority(os.PRIO_PROCESS, proc.pid, 10)
    yield
    proc.terminate()
    proc.wait()


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The folder of real recordings; skip without it, but fail under CI where it must be present."""
    if not REAL_DATA.is_dir():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"real recordings missing under CI: {REAL_DATA}")
        pytest.skip(f"real recordings not found at {REAL_DATA} (see README: tests with real data)")
    return REAL_DATA


@pytest.fixture(scope="session", autouse=True)
def child_tracebacks():
    """Every process a test starts dumps its Python threads' stacks on a fatal signal (stop_node uses it)."""
    os.environ["PYTHONFAULTHANDLER"] = "1"


def stop_node(proc: subprocess.Popen, log: Path, timeout: float = 30.0) -> int:
    """SIGTERM a node's process and wait for it; -> its exit status. See stop_nodes."""
    return stop_nodes((proc, log), timeout=timeout)[0]


def stop_nodes(*nodes: tuple[subprocess.Popen, Path], timeout: float = 30.0) -> list[int]:
    """SIGTERM each (process, log) at once and wait for them; -> their exit statuses. One still running
    after `timeout` s is aborted, so that its log ends with each thread's stack, and killed; the test then
    fails with those logs, after every process is gone."""
    for proc, _ in nodes:
        proc.terminate()
    end, hung = time.monotonic() + timeout, []
    for proc, log in nodes:
        try:
            proc.wait(timeout=max(end - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            hung.append((proc, log))
    if hung:  # every process is gone by now; then their logs
        pytest.fail("\n\n".join(f"{' '.join(map(str, proc.args[:4]))} still running {timeout:.0f} s after SIGTERM; its "
                                 f"log, with each thread's stack at that moment:\n{log.read_text(errors='replace')[-8000:]}"
                                 for proc, log in hung))
    return [proc.returncode for proc, _ in nodes]


def wait_until(predicate, timeout: float) -> bool:
    """Poll `predicate` every 50 ms for up to `timeout` seconds (DDS tests: wait for traffic)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and not predicate():
        time.sleep(0.05)
    return predicate()


@pytest.fixture(scope="session")
def local_ray():
    """One Ray instance on this machine (loopback only) for every test that needs it; -> the ray module.
    Skipped where Ray (the optional extra fusion_attn[ray]) is not installed; under CI, which installs
    it, that fails."""
    try:
        import ray
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("Ray missing under CI: the set-up installs the extra fusion_attn[ray]")
        pytest.skip("Ray is the optional extra fusion_attn[ray]")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
