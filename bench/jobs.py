"""Running a bench's independent jobs over the cores, and the machine they ran on."""
from __future__ import annotations

import multiprocessing
import os
import platform
import time
from typing import Any, Callable, Sequence

import psutil


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


def machine_facts() -> dict[str, Any]:
    """The machine a bench ran on, for its JSON and its last line."""
    return {"cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version()}
