"""Placements, links, deployments and the pipeline parameters that travel in V2 requests."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from services.contracts.errors import BadParameter, ConfigError
from services.contracts.pipeline import HopTiming, PipelineRequest, hops_from_parameters
from services.contracts.specs import (
    DeploymentSpec,
    LinkSpec,
    Placement,
    link_between,
    load_deployment,
    placements_for,
)


@pytest.mark.parametrize(
    ("text", "tiers", "name"),
    [
        ("M", ("mobile",), "M"),
        ("e-c", ("edge", "cloud"), "E-C"),
        ("M-E-C", ("mobile", "edge", "cloud"), "M-E-C"),
        ("M-C", ("mobile", "cloud"), "M-C"),
    ],
)
def test_placement_parses(text: str, tiers: tuple[str, ...], name: str) -> None:
    placement = Placement.parse(text)
    assert placement.tiers == tiers
    assert placement.name == name == str(placement)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "tier letters"),
        ("X", "tier letters"),
        ("E-M", "mobile → edge"),
        ("M-M", "without repeats"),
        ("M--E", "tier letters"),
    ],
)
def test_bad_placements_say_why(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        Placement.parse(text)


def test_stage_tiers() -> None:
    assert Placement.parse("E").stage_tiers(3) == ("edge", "edge", "edge")
    assert Placement.parse("M-C").stage_tiers(2) == ("mobile", "cloud")
    with pytest.raises(ValueError, match="one per stage"):
        Placement.parse("M-C").stage_tiers(3)


def test_placements_for_every_stage_count() -> None:
    assert [p.name for p in placements_for(1)] == ["M", "E", "C"]
    assert [p.name for p in placements_for(2)] == ["M", "E", "C", "M-E", "M-C", "E-C"]
    assert [p.name for p in placements_for(3)] == ["M", "E", "C", "M-E-C"]


def test_links_are_named_mobile_to_cloud() -> None:
    assert link_between("cloud", "edge") == "edge-cloud"
    assert link_between("mobile", "cloud") == "mobile-cloud"
    with pytest.raises(ValueError, match="no link"):
        link_between("edge", "edge")


def test_link_spec_units_and_bounds() -> None:
    spec = LinkSpec(delay_ms=10, jitter_ms=2, loss_pct=0.5, rate_mbit=50)
    assert spec.is_shaped and spec.rtt_ms == 20
    assert not LinkSpec().is_shaped
    for bad in ({"delay_ms": -1}, {"loss_pct": 101}, {"rate_mbit": 0}, {"bandwidth": 3}):
        with pytest.raises(ValidationError):
            LinkSpec.model_validate(bad)


def test_deployment_needs_every_tier(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="missing: cloud"):
        DeploymentSpec.model_validate(
            {
                "models": [{"manifest": "a"}],
                "tiers": {"mobile": {"url": "http://m:1"}, "edge": {"url": "http://e:1"}},
            }
        )
    path = tmp_path / "d.yaml"
    path.write_text("models: [{manifest: a, placements: [E-M]}]\ntiers: {}\n")
    with pytest.raises(ConfigError, match="invalid"):
        load_deployment(path)
    path.write_text("models: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_deployment(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_deployment(tmp_path / "missing.yaml")


def test_pipeline_parameters_are_checked() -> None:
    request = PipelineRequest.from_parameters({"placement": "M-E", "exit_threshold": 0.7, "request_id": "r"})
    assert request == PipelineRequest(placement="M-E", request_id="r", exit_threshold=0.7)
    forwarded = request.forward_parameters(placement="M-E", stage=1, hop=1)
    assert PipelineRequest.from_parameters(forwarded) == PipelineRequest("M-E", "r", 0.7, stage=1, hop=1)
    for bad in (
        {"exit_threshold": 2},
        {"exit_threshold": "high"},
        {"exit_threshold": True},
        {"placement": 3},
        {"tierlab_stage": -1},
        {"tierlab_hop": 1.5},
    ):
        with pytest.raises(BadParameter):
            PipelineRequest.from_parameters(bad)  # type: ignore[arg-type]


def test_hop_timings_round_trip_through_flat_parameters() -> None:
    hops = [
        HopTiming("mobile", 0, 0, 0.1, 2.0, 5.0, 7.5, 100, 50),
        HopTiming("edge", 1, 2, 0.2, 3.0, 0.0, 3.4, 50, 0),
    ]
    params = {"hops": 2, **hops[0].to_parameters(0), **hops[1].to_parameters(1)}
    assert all(isinstance(v, (str, int, float)) for v in params.values())  # V2 parameter values are scalars
    assert hops_from_parameters(params) == hops
    del params["hop1_send_ms"]
    with pytest.raises(BadParameter, match="hop1_send_ms"):
        hops_from_parameters(params)
