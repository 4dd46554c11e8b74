"""Running a bench's independent jobs over the cores, and the line that says on what."""
from __future__ import annotations

import multiprocessing
import platform
import time
from typing import Any, Callable, Sequence


def run_all(run_job: Callable[[Any], dict], jobs: Sequence[Any], n_jobs: int
            ) -> tuple[list[dict], float]:
    """Every job's result, in order, and the wall seconds it took (forked workers past one)."""
    started = time.perf_counter()
    if n_jobs > 1:
        with multiprocessing.get_context("fork").Pool(n_jobs) as pool:
            runs = pool.map(run_job, jobs, chunksize=1)
    else:
        runs = [run_job(j) for j in jobs]
    return runs, time.perf_counter() - started


def machine_line(n_runs: int, elapsed_s: float) -> str:
    return (f"{n_runs} runs in {elapsed_s:.0f}s on {multiprocessing.cpu_count()} cores "
            f"({platform.processor() or platform.machine()}, Python {platform.python_version()})")
