"""Many recordings, one job each, in parallel on this machine or on a Ray cluster (`replay --each`).

    recordings = expand_recordings(["runs/bags/", "more/*.mcap", "list.txt"])
    for result in run_jobs(replay_one, [(rec, out / name) for rec, name in ...], jobs=4):
        ...

A job is a picklable top-level function and its arguments; it runs in a spawned process (or a Ray
task, `ray="auto"` or a cluster address) with one thread, so N jobs use N cores. A job that fails is
reported in its JobResult and does not stop the others. Results come back in the order given.
"""

from __future__ import annotations

import glob
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, FusionAttnError

RECORDING_FILES = (".bag", ".mcap", ".db3")
LIST_FILES = (".txt", ".list")


def is_recording(path: Path) -> bool:
    """A ROS 1 bag, an MCAP or sqlite3 file, or a rosbag2 folder (metadata.yaml, or its storage files)."""
    if path.is_file():
        return path.suffix in RECORDING_FILES
    return path.is_dir() and ((path / "metadata.yaml").is_file()
                              or any(p.suffix in (".mcap", ".db3") for p in path.iterdir()))


def expand_recordings(specs: Sequence[str | Path]) -> list[Path]:
    """Each spec -> the recordings it names, in order, each once: a recording (file or rosbag2 folder);
    a folder of recordings (its entries that are recordings, sorted); a glob pattern; a list file
    (.txt, .list: one path per line, relative to the list's folder, # comments)."""
    found: list[Path] = []
    for spec in specs:
        text = str(spec)
        path = Path(text)
        if path.suffix in LIST_FILES and path.is_file():
            lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
            items = [path.parent / line for line in lines if line]
            missing = [str(p) for p in items if not p.exists()]
            if missing:
                raise ConfigError(f"{path}: listed recordings not found: {', '.join(missing)}")
            found += items
        elif glob.has_magic(text):
            matches = sorted(Path(p) for p in glob.glob(text))
            if not matches:
                raise ConfigError(f"{text}: no file or folder matches")
            found += [p for p in matches if is_recording(p)]
        elif is_recording(path):
            found.append(path)
        elif path.is_dir():
            inside = sorted(p for p in path.iterdir() if is_recording(p))
            if not inside:
                raise ConfigError(f"{path} is neither a recording nor a folder that holds any (ROS 1 .bag, .mcap, "
                                  ".db3, or rosbag2 folders)")
            found += inside
        else:
            raise ConfigError(f"{path}: no such recording, folder or list file")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise ConfigError(f"no recordings in {', '.join(map(str, specs))}")
    return unique


def output_names(recordings: Sequence[Path]) -> list[str]:
    """A folder name per recording: its name without the extension, made unique with -2, -3, ..."""
    names, seen = [], {}
    for rec in recordings:
        stem = rec.stem if rec.suffix in RECORDING_FILES else rec.name
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return names


@dataclass
class JobResult:
    args: tuple
    ok: bool
    value: object = None  # the job's return value when ok
    error: str | None = None  # "Type: message" when not
    wall_s: float = 0.0


def _run_one(fn: Callable, args: tuple) -> JobResult:
    """In the job's process: the function, timed; a failure becomes the result, not an exception."""
    start = time.perf_counter()
    try:
        return JobResult(args, True, fn(*args), wall_s=time.perf_counter() - start)
    except FusionAttnError as exc:  # an expected, named problem with this recording
        return JobResult(args, False, error=f"{type(exc).__name__}: {exc}", wall_s=time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 - any other failure is this job's, reported with where it happened
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return JobResult(args, False, error=f"{type(exc).__name__}: {exc} ({where.filename}:{where.lineno})",
                         wall_s=time.perf_counter() - start)


def single_threaded() -> None:
    """One thread for torch, OpenCV and the BLAS libraries in this process: a job's, or an env worker's
    (rl.workers), so N of them use N cores. torch, if not loaded yet, takes OMP_NUM_THREADS when it is:
    a process on ONNX Runtime alone (a replay window) never loads it."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    import cv2

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    cv2.setNumThreads(1)


def run_jobs(fn: Callable, jobs_args: Sequence[tuple], jobs: int = 1, ray: str | None = None,
             first_here: bool = False) -> Iterator[JobResult]:
    """fn(*args) for each args; -> their JobResults in the given order, each as soon as it and all
    before it are done. jobs 1 and no ray: one after the other in this process. ray: "auto" (the
    cluster `ray start` joined this machine to, else a local one) or a cluster address. first_here:
    the first job runs in this process while jobs - 1 processes start and run the others (this process
    has what the job needs loaded already: it does not wait for them to start)."""
    if ray is not None:
        yield from _run_on_ray(fn, jobs_args, ray)
    elif jobs <= 1:
        for args in jobs_args:
            yield _run_one(fn, args)
    else:
        import multiprocessing

        here = 1 if first_here else 0
        with ProcessPoolExecutor(max_workers=jobs - here, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=single_threaded) as pool:
            futures = [pool.submit(_run_one, fn, args) for args in jobs_args[here:]]
            if here:
                yield _run_one(fn, jobs_args[0])
            for future, args in zip(futures, jobs_args[here:]):
                try:
                    yield future.result()
                except Exception as exc:  # noqa: BLE001 - the job's process died (killed, out of memory)
                    yield JobResult(args, False, error=f"its process died: {type(exc).__name__}: {exc}")


def _run_on_ray(fn: Callable, jobs_args: Sequence[tuple], address: str) -> Iterator[JobResult]:
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray: pip install 'fusion_attn[ray]'") from None
    if not ray.is_initialized():  # "auto": the cluster `ray start` made on this machine, else a new local one
        ray.init(address=None if address == "auto" else address, log_to_driver=False)
    task = ray.remote(num_cpus=1, max_retries=0)(_run_one)
    refs = [task.remote(fn, args) for args in jobs_args]
    for ref, args in zip(refs, jobs_args):
        try:
            yield ray.get(ref)
        except ray.exceptions.RayError as exc:  # the task's worker or node died
            yield JobResult(args, False, error=f"its Ray task failed: {type(exc).__name__}: {exc}")
