"""Samplers and pressure levels: hysteresis, the budget sampler, NVML tested by its absence."""
from __future__ import annotations

import importlib.util

import pytest

from proxy.engine.memory import (BudgetSampler, MemoryPressure, MemorySample, NvmlSampler,
                                 PressureGauge, PsutilSampler)

GB = 1_000_000_000


def sample(used_percent: float, total_gb: float = 100.0) -> MemorySample:
    total = int(total_gb * GB)
    return MemorySample(total, int(total * (1 - used_percent / 100)))


@pytest.mark.parametrize("used,level", [(30, "low"), (60, "normal"), (85, "high"),
                                        (95, "critical")])
def test_levels_from_usage(used, level):
    gauge = PressureGauge(max_usage_percent=80, min_free_bytes=4 * GB)
    assert gauge.update(sample(used)).value == level


def test_free_memory_floor_raises_the_level_on_its_own():
    gauge = PressureGauge(max_usage_percent=80, min_free_bytes=6 * GB)
    assert gauge.update(sample(75, total_gb=10)) is MemoryPressure.CRITICAL   # 2.5 GB < 6 / 2
    gauge = PressureGauge(max_usage_percent=80, min_free_bytes=8 * GB)
    assert gauge.update(sample(70, total_gb=20)) is MemoryPressure.HIGH       # 6 GB free < 8


def test_hysteresis_keeps_a_level_near_its_boundary():
    gauge = PressureGauge(max_usage_percent=80, min_free_bytes=0, hysteresis_percent=3)
    assert gauge.update(sample(81)) is MemoryPressure.HIGH
    assert gauge.update(sample(79)) is MemoryPressure.HIGH      # within the margin: holds
    assert gauge.update(sample(76.5)) is MemoryPressure.NORMAL  # clearly below: steps down
    assert gauge.update(sample(80.5)) is MemoryPressure.HIGH    # rising is immediate


def test_budget_sampler_charges_footprints():
    charged = [6 * GB]
    s = BudgetSampler(16 * GB, lambda: charged[0]).sample()
    assert (s.total_bytes, s.available_bytes) == (16 * GB, 10 * GB)
    charged[0] = 20 * GB
    assert BudgetSampler(16 * GB, lambda: charged[0]).sample().available_bytes == 0


@pytest.mark.skipif(importlib.util.find_spec("pynvml") is not None,
                    reason="nvidia-ml-py is installed here")
def test_nvml_is_optional_and_absent_here():
    assert NvmlSampler.create() is None
    s = PsutilSampler(gpu=NvmlSampler.create()).sample()
    assert s.total_bytes > 0 and s.gpus == ()
