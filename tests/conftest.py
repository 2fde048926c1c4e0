"""Shared fixtures. Real recordings live in ../shared/data/real beside the checkout.

`make test` runs the suite on two pytest-xdist workers: each test file runs whole in one worker (its
module fixtures are made once), the longest files first; the workers share one ONNX cache, each talks
DDS on domains of its own (ros_domain), and a test marked `alone` runs while the other worker waits."""

import fcntl
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import pytest

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ... under pytest -n; "" without
ROS_DOMAINS_PER_PROCESS = 8


def ros_domain(slot: int) -> str:
    """ROS_DOMAIN_ID for a test's DDS traffic, slot 0-7 of this test process: two tests in one process use
    different slots, the workers of one run different blocks, and another run on this machine (its
    controller's pid) most likely others. Domains 1-224: Fast DDS's ports allow up to 232."""
    assert 0 <= slot < ROS_DOMAINS_PER_PROCESS
    run = os.getppid() if XDIST_WORKER else os.getpid()
    worker = int(XDIST_WORKER[2:]) if XDIST_WORKER else 0
    return str(1 + (run + worker) % 28 * ROS_DOMAINS_PER_PROCESS + slot)


# the files that take longest (--durations), handed to the workers first so that none of them starts last
LONGEST_FILES = ("test_rl", "test_train", "test_replay", "test_node_dds", "test_export", "test_workers")


def pytest_configure(config):
    config.addinivalue_line("markers", "alone: under pytest -n, no other worker runs a test meanwhile (a node's "
                                       "rate or its draining of a flood, timed on shared cores)")


def pytest_collection_modifyitems(config, items):
    """Under `pytest -n N --dist loadfile --no-loadscope-reorder`, the longest files go first."""
    if XDIST_WORKER:
        rank = {name: i for i, name in enumerate(LONGEST_FILES)}
        items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: a file's own order is kept


def _run_lock() -> Path:
    return Path(tempfile.gettempdir()) / f"fusion_attn-tests-{os.environ['PYTEST_XDIST_TESTRUNUID']}"


def pytest_sessionfinish(session):
    if XDIST_WORKER:  # each worker as it ends: one still running makes them again, alone by then
        for suffix in (".turnstile", ".lock"):
            Path(f"{_run_lock()}{suffix}").unlink(missing_ok=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Under pytest -n: a test marked `alone` (setup to teardown) waits until no other worker runs one, and
    the others wait for it. A readers-writer lock over two files of the run: a test waiting to run alone
    holds the turnstile, so that the others cannot start one after another ahead of it."""
    if not XDIST_WORKER:
        return (yield)
    run = _run_lock()
    alone = item.get_closest_marker("alone") is not None
    with open(f"{run}.turnstile", "a") as turnstile, open(f"{run}.lock", "a") as lock:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        if not alone:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        if alone:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        return (yield)  # closing the files releases the lock


@pytest.fixture(scope="session", autouse=True)
def shared_cache(tmp_path_factory) -> Path:
    """One cache (ONNX exports, training shards) for the whole run and the nodes it starts: each graph is
    exported once, and the user's ~/.cache is left alone. A $FUSION_ATTN_CACHE already set is kept."""
    if "FUSION_ATTN_CACHE" not in os.environ:
        run_temp = tmp_path_factory.getbasetemp()
        if XDIST_WORKER:  # each worker's temp is a folder of the run's: one cache for them all
            run_temp = run_temp.parent
        os.environ["FUSION_ATTN_CACHE"] = str(run_temp / "cache")
    return Path(os.environ["FUSION_ATTN_CACHE"])


def pytest_addoption(parser):
    parser.addoption("--prefetch-graphs", action="store_true",
                     help="export the ONNX graphs much of the run needs in a process beside it (tests/graphs.py)")


@pytest.fixture(scope="session", autouse=True)
def prefetched_graphs(shared_cache, request):
    """With --prefetch-graphs, tests/graphs.py exports into the run's cache beside the tests from the
    start; stopped at the end if still busy (a test never depends on it: it waits for or makes a graph)."""
    if not request.config.getoption("--prefetch-graphs") or XDIST_WORKER not in ("", "gw0"):
        yield  # one prefetch for the run: the other workers wait for a graph it is exporting
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


@pytest.fixture(scope="session", autouse=True)
def cores_shared_by_workers():
    """Each of N workers' torch runs on its share of the cores: N processes each running as many threads as
    there are cores would make every one of them slower than one at a time."""
    if XDIST_WORKER:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


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


class Spinner:
    """Runs an executor's callbacks in a daemon thread until it shuts down. spin_once in a loop, not spin():
    an exception in one turn (a callback's, or rclpy's own while the test's thread makes or destroys
    entities) is kept in `errors` and spinning goes on. Under spin() it would end the thread with no word,
    and every later wait of the module time out: CI, 2026-12-05, six DDS tests in a row after the third."""

    def __init__(self, executor):
        self.executor, self.errors = executor, []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        from rclpy.executors import ExternalShutdownException, ShutdownException

        while self.executor.context.ok():
            try:
                self.executor.spin_once(timeout_sec=0.1)
            except (ExternalShutdownException, ShutdownException):
                return
            except Exception:  # noqa: BLE001 -- kept, reported by report(); the thread goes on
                self.errors = [*self.errors[-9:], traceback.format_exc()]
                time.sleep(0.1)  # an error of every turn does not spin a core

    def report(self) -> str:
        """For a wait that timed out: is the thread alive, what it raised, and where it is now."""
        frame = sys._current_frames().get(self.thread.ident)
        where = "".join(traceback.format_stack(frame)) if frame is not None else "(not running)\n"
        return (f"spinner alive: {self.thread.is_alive()}; {len(self.errors)} errors kept (the last 10)\n" + "".join(self.errors[-3:])
                + "its stack:\n" + where)


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
