"""The model-repository documents: start-up sets, load estimates, the status phrase, placement tiers."""

from __future__ import annotations

import pytest

from services.contracts.repository import (
    LOAD_PEAK_FIXED_MIB,
    RepositoryModelSpec,
    estimated_peak_mib,
    loaded_summary,
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


def test_a_status_says_what_is_loaded_and_what_did_not_fit() -> None:
    def entry(name: str, state: str, reason: str = "") -> dict[str, object]:
        spec = RepositoryModelSpec(name=name, state=state, reason=reason, stages_here=(0,), file_mib=1.0)
        return spec.model_dump(mode="json")

    status = {
        "models": {
            "a": entry("a", "READY"),
            "b": entry("b", "UNAVAILABLE", "does not fit: needs ~40 MiB, 3 MiB free of the tier's limit of 1024 MiB"),
            "c": entry("c", "UNAVAILABLE", "not loaded"),
        },
        "memory": {"free_mib": 812.4, "of": "the tier's limit of 1024 MiB"},
    }
    assert (
        loaded_summary(status) == "1 of 3 variants loaded, 1 do not fit; 812 MiB free of the tier's limit of 1024 MiB"
    )


def test_placement_tiers_in_order_each_once() -> None:
    assert placement_tiers("M-E-C") == ["mobile", "edge", "cloud"] and placement_tiers("C") == ["cloud"]
