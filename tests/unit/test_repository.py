"""The model-repository documents: start-up sets, load estimates, the status phrase, placement tiers."""

from __future__ import annotations

import pytest

from services.contracts.repository import (
    LOAD_PEAK_FIXED_MIB,
    estimated_peak_mib,
    parse_startup_models,
)
from services.contracts.specs import placement_tiers


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("all", "all"), (" NONE ", "none"), ("", "none"), ("a.identity, b.sptq", ("a.identity", "b.sptq"))],
)
def test_startup_models_parse(text: str, parsed: object) -> None:
    assert parse_startup_models(text) == parsed


def test_the_estimated_peak_grows_with_the_files_and_never_falls_under_the_fixed_cost() -> None:
    assert estimated_peak_mib(0) == LOAD_PEAK_FIXED_MIB
    assert estimated_peak_mib(100) == pytest.approx(2.5 * 100 + LOAD_PEAK_FIXED_MIB)


def test_placement_tiers_in_order_each_once() -> None:
    assert placement_tiers("M-E-C") == ["mobile", "edge", "cloud"] and placement_tiers("C") == ["cloud"]
