"""Fit by context, rule by rule (engine/fit.py): the context a model is loaded with unless
fitted, the memory a context takes, when fitting applies, the largest context that fits, and
what a fitted load leaves behind. The end-to-end behaviour is in test_fit.py."""
from __future__ import annotations

import logging
from typing import Any

import pytest

from proxy.configload import load_config
from proxy.engine.core import EngineCore
from proxy.engine.fit import Choice
from proxy.engine.memory import GB, MemorySample
from proxy.errors import ModelTooLarge
from proxy.upstream.base import Capabilities

from .fakes import ScriptedBackend, SettableSampler

pytestmark = pytest.mark.timeout(30)
CAPS = Capabilities(manages_loading=True, reports_memory=False, self_evicts=False,
                    multi_instance=False, native_clients=False)
FIT = "fit/b"
KV = 96_000                 # bytes per token, estimated from its 4 GB file


async def fitter(size_gb: float = 4.0, model: dict[str, Any] | None = None) -> tuple:
    """(fitter, entry) of FIT: configured 5 GB at 32768 tokens, floor 4096, unless `model`."""
    model = model if model is not None else {
        "footprint_gb": 5, "load": {"context_length": 32768},
        "fit": {"min_context_length": 4096}}
    core = EngineCore(load_config({
        "memory": {"min_free_memory_gb": 0, "max_memory_usage_percent": 100},
        "models": {FIT: model}, "storage": {"enabled": False}}),
        ScriptedBackend({FIT: size_gb}, CAPS), sampler=SettableSampler())
    await core.reconcile()
    return core.scheduler.fit, core.registry.entries[FIT]


def free(available_bytes: float, total_bytes: float = 32 * GB) -> MemorySample:
    return MemorySample(int(total_bytes), int(available_bytes))


# -- facts -----------------------------------------------------------------------------------
async def test_without_a_configured_context_it_is_lm_studios_default_at_most_the_models():
    fit, e = await fitter(model={})
    assert fit.configured_context(e) == 4096                 # maximum unknown
    e.max_context_length = 2048
    assert fit.configured_context(e) == 2048
    e.max_context_length = 131072
    assert fit.configured_context(e) == 4096


@pytest.mark.parametrize("size_gb, per_token", [(0, 64 * 1024), (0.1, 16 * 1024),
                                                (4.0, KV), (40.0, 256 * 1024)],
                         ids=["unknown", "small", "by-size", "large"])
async def test_the_kv_cache_per_token_is_estimated_from_the_file_within_bounds(size_gb,
                                                                              per_token):
    fit, e = await fitter(size_gb)
    assert fit.kv_bytes_per_token(e) == per_token


async def test_a_context_never_takes_less_than_the_files_weights():
    fit, e = await fitter()
    assert fit.need_at(e, 30000) == pytest.approx(5 * GB - KV * 2768)
    assert fit.need_at(e, 256) == 4 * GB                       # not 5 GB less 3.1 GB


async def test_a_fitted_load_running_leaves_the_anchor_at_the_configured_footprint():
    fit, e = await fitter()
    e.fit_bytes = 1 * GB                                       # what the fitted load takes
    assert fit.need_at(e, 32768) == 5 * GB


async def test_one_measured_context_is_the_anchor_instead_of_the_configured_footprint():
    fit, e = await fitter()
    e.context_footprints = {8192: (4.5 * GB, 1)}
    assert fit.need_at(e, 8192) == 4.5 * GB


async def test_a_learned_footprint_is_the_line_s_point_at_the_configured_context():
    fit, e = await fitter()
    e.context_footprints = {8192: (5 * GB, 1)}
    e.footprint_bytes = 8 * GB                                 # learned at 32768
    assert fit.need_at(e, 16384) == pytest.approx(6 * GB)


async def test_a_context_measured_at_the_configured_one_wins_over_the_learned_footprint():
    fit, e = await fitter()
    e.context_footprints = {8192: (5 * GB, 1), 32768: (7 * GB, 1)}
    e.footprint_bytes = 9 * GB
    assert fit.need_at(e, 32768) == pytest.approx(7 * GB)


async def test_measurements_that_fall_with_the_context_give_no_negative_slope():
    fit, e = await fitter()
    e.context_footprints = {8192: (6 * GB, 1), 16384: (5 * GB, 1)}
    assert fit.kv_bytes_per_token(e) == 0
    assert fit.need_at(e, 32768) == pytest.approx(5.5 * GB)


# -- when it applies -------------------------------------------------------------------------
async def test_a_floor_at_the_configured_context_is_no_fit():
    fit, e = await fitter(model={"footprint_gb": 5, "load": {"context_length": 32768},
                                 "fit": {"min_context_length": 32768}})
    assert fit.plan(e, free(1 * GB)) is None


async def test_a_model_that_fits_exactly_as_configured_is_loaded_as_configured():
    fit, e = await fitter()
    assert fit.plan(e, free(5 * GB)) is None
    assert isinstance(fit.plan(e, free(5 * GB - 1)), Choice)


async def test_a_floor_that_takes_exactly_the_ceiling_is_not_too_large():
    fit, e = await fitter()
    least = fit.need_at(e, 4096)
    assert isinstance(fit.plan(e, free(1 * GB, total_bytes=least)), Choice)
    refused = fit.plan(e, free(1 * GB, total_bytes=least - 1))
    assert isinstance(refused, ModelTooLarge)
    assert f"(models.{FIT}.fit.min_context_length) and 5.0 GB" in refused.message
    assert f"lower models.{FIT}.fit.min_context_length or change" in refused.message


async def test_a_context_that_fits_now_is_chosen_settled():
    fit, e = await fitter()
    choice = fit.plan(e, free(4.5 * GB))
    assert choice == Choice(fit.largest_fitting(e, 4096, 32768, 4.5 * GB),
                            fit.need_at(e, choice.context_length), settled=True)
    assert 4096 < choice.context_length < 32768


# -- the largest that fits -------------------------------------------------------------------
async def test_the_floor_taking_exactly_the_room_fits():
    fit, e = await fitter()
    room = fit.need_at(e, 24576)                     # above the weights: 4.2 GB
    assert fit.largest_fitting(e, 24576, 32768, room) == 24576
    assert fit.largest_fitting(e, 24576, 32768, room - 1) is None


async def test_the_largest_fitting_context_is_below_the_configured_one_in_steps():
    fit, e = await fitter()
    assert fit.largest_fitting(e, 4096, 32768, 100 * GB) == 32512


async def test_once_room_was_made_for_the_floor_the_context_is_what_is_free_then(caplog):
    caplog.set_level(logging.INFO, logger="proxy.engine")
    fit, e = await fitter()
    floor = Choice(4096, fit.need_at(e, 4096), settled=False)
    fit.settle(e, floor, free(5 * GB))             # the configured context fits after all
    assert e.fit_context_length is None
    fit.settle(e, floor, free(fit.need_at(e, 4096) - 1))   # less came back than planned
    assert e.fit_context_length == 4096 and e.fit_bytes == fit.need_at(e, 4096)
    assert "fit/b is loaded with a context of 4096 instead of 32768" in caplog.text
    fit.unsettle(e)
    assert e.fit_context_length is None and e.fit_bytes is None


# -- what a load leaves ----------------------------------------------------------------------
async def test_the_context_loaded_is_the_servers_word_else_the_option_else_as_it_was():
    fit, e = await fitter()
    fit.loaded(e, {"context_length": 8192}, 9000)
    assert e.context_length == 9000
    fit.loaded(e, {"context_length": 8192}, None)
    assert e.context_length == 8192
    fit.loaded(e, {}, None)
    assert e.context_length == 8192


async def test_a_fitted_load_keeps_the_mean_of_its_contexts_measurements():
    fit, e = await fitter()
    assert not fit.learned(e, 6 * GB) and e.context_footprints == {}   # not fitted
    e.fit_context_length = 8192
    assert fit.learned(e, 5 * GB) and fit.learned(e, 7 * GB)
    assert e.context_footprints == {8192: (6 * GB, 2)} and e.fit_bytes == 7 * GB
