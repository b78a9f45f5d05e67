"""Tier, link, placement and deployment specs: the data that says what runs where.

``Placement`` maps a variant's stages to tiers (``M-E-C``: stage 0 on mobile, 1 on edge, 2 on cloud;
``E``: every stage on edge). ``LinkSpec`` is one link's conditions. ``DeploymentSpec`` is the file every
tier of a stack reads: which variants to serve under which placements, where each tier listens, and the
links between them. Specs are data; the things that realise them live in ``services.tier``.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Literal, get_args

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from services.contracts.device import DeviceModelSpec
from services.contracts.errors import ConfigError
from services.contracts.manifest import FrozenSpec, load_yaml_spec

TierName = Literal["mobile", "edge", "cloud"]
TIERS: tuple[TierName, ...] = get_args(TierName)
TIER_LETTERS: dict[str, TierName] = {"M": "mobile", "E": "edge", "C": "cloud"}
LETTER_OF: dict[TierName, str] = {tier: letter for letter, tier in TIER_LETTERS.items()}


def placement_tiers(placement: str) -> list[TierName]:
    """The tiers a placement (``M``, ``E-C``, …) computes on, in order, each once."""
    return list(dict.fromkeys(TIER_LETTERS[letter] for letter in placement.split("-")))


LinkName = Literal["mobile-edge", "edge-cloud", "mobile-cloud"]
LINKS: tuple[LinkName, ...] = get_args(LinkName)


def link_between(a: TierName, b: TierName) -> LinkName:
    """The link joining two different tiers, named in the mobile → edge → cloud order."""
    first, second = sorted((a, b), key=TIERS.index)
    name = f"{first}-{second}"
    if name not in LINKS or a == b:
        raise ValueError(f"there is no link between {a} and {b}")
    return name


class Placement(FrozenSpec):
    """Which tier runs which stage: one tier for all stages, or one tier per stage, mobile → cloud order."""

    tiers: tuple[TierName, ...] = Field(min_length=1)

    @field_validator("tiers")
    @classmethod
    def _left_to_right(cls, tiers: tuple[TierName, ...]) -> tuple[TierName, ...]:
        order = [TIERS.index(t) for t in tiers]
        if any(b <= a for a, b in itertools.pairwise(order)):
            raise ValueError(f"tiers must go mobile → edge → cloud without repeats, got {'-'.join(tiers)}")
        return tiers

    @classmethod
    def parse(cls, text: str) -> Placement:
        """``"M-E-C"`` → Placement(mobile, edge, cloud); raises ValueError naming the problem."""
        letters = [part.strip().upper() for part in text.split("-")]
        unknown = [p for p in letters if p not in TIER_LETTERS]
        if unknown or not text.strip():
            raise ValueError(f"placement {text!r} must be tier letters M, E, C joined by '-' (e.g. M-E-C)")
        try:
            return cls(tiers=tuple(TIER_LETTERS[p] for p in letters))
        except ValidationError as exc:
            raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None

    @property
    def name(self) -> str:
        return "-".join(LETTER_OF[t] for t in self.tiers)

    def stage_tiers(self, stage_count: int) -> tuple[TierName, ...]:
        """The tier of each of ``stage_count`` stages."""
        if len(self.tiers) == 1:
            return self.tiers * stage_count
        if len(self.tiers) == stage_count:
            return self.tiers
        raise ValueError(
            f"placement {self.name} names {len(self.tiers)} tiers but the variant has {stage_count} stages "
            "(give one tier, or one per stage)"
        )

    def __str__(self) -> str:
        return self.name


def placements_for(stage_count: int) -> tuple[Placement, ...]:
    """Every placement a variant of ``stage_count`` stages can run under, single tiers first."""
    single = [Placement(tiers=(t,)) for t in TIERS]
    if stage_count == 1:
        return tuple(single)
    split = [Placement(tiers=combo) for combo in itertools.combinations(TIERS, stage_count)]
    return tuple(single + split)


RTT_TOLERANCE_PCT, RTT_TOLERANCE_MS = 10.0, 1.0
MAX_PINGS = 400


class LinkSpec(FrozenSpec):
    """One link's conditions, applied on the sending side of each end (so RTT = 2 × delay_ms). Values are
    finite and bounded (a minute of delay, 100 Gbit/s) so a typo is refused before any link is touched."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    delay_ms: float = Field(default=0.0, ge=0.0, le=60_000.0, description="one-way delay")
    jitter_ms: float = Field(default=0.0, ge=0.0, le=60_000.0, description="standard deviation of the one-way delay")
    loss_pct: float = Field(default=0.0, ge=0.0, le=100.0, description="packet loss, percent")
    rate_mbit: float | None = Field(default=None, gt=0.0, le=100_000.0, description="bandwidth cap; None = unlimited")
    queue_limit_packets: int | None = Field(
        default=None, gt=0, le=1_000_000, description="netem queue; None = sized to the bandwidth-delay product"
    )

    @property
    def is_shaped(self) -> bool:
        return bool(self.delay_ms or self.jitter_ms or self.loss_pct or self.rate_mbit)

    @property
    def is_cut(self) -> bool:
        """100 % loss: nothing gets through (a chaos scenario's link cut)."""
        return self.loss_pct >= 100.0

    @property
    def rtt_ms(self) -> float:
        return 2.0 * self.delay_ms

    @property
    def rtt_tolerance_ms(self) -> float:
        """How far a measured RTT p50 may be from ``rtt_ms``: ±10 % or ±1 ms, whichever is wider."""
        return max(self.rtt_ms * RTT_TOLERANCE_PCT / 100, RTT_TOLERANCE_MS)

    def pings_for_p50(self) -> int:
        """Round trips enough that jitter moves their p50 by at most a quarter of the tolerance: the p50
        of ``n`` round trips of standard deviation σ = √2 × jitter (two one-way delays) wanders by about
        1.25 σ / √n (measured with 20 pings on 4g, jitter 5 ms: p50 off by over 4 ms in 5 of 12 probes)."""
        sigma_ms = math.sqrt(2.0) * self.jitter_ms
        return min(MAX_PINGS, math.ceil((1.25 * sigma_ms / (self.rtt_tolerance_ms / 4)) ** 2))


class TierEndpointSpec(FrozenSpec):
    url: str = Field(pattern=r"^https?://[^/\s]+/?$", description="base URL, e.g. http://edge:8000")

    @property
    def base_url(self) -> str:
        return self.url.rstrip("/")


class ModelEntrySpec(FrozenSpec):
    manifest: str = Field(min_length=1, description="manifest.json (or its folder), relative to models_dir")
    placements: tuple[str, ...] | None = Field(default=None, description="default: every valid placement")

    @field_validator("placements")
    @classmethod
    def _parse(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("placements, when given, must list at least one placement")
        return tuple(Placement.parse(p).name for p in value)


class DeploymentSpec(FrozenSpec):
    """What a stack serves: read by every tier, the role given separately."""

    models_dir: str = Field(default="models", description="relative to the deployment file's folder")
    models: tuple[ModelEntrySpec, ...] = Field(min_length=1)
    tiers: dict[TierName, TierEndpointSpec]
    links: dict[LinkName, LinkSpec] = Field(default_factory=dict)
    devices: dict[str, DeviceModelSpec] = Field(
        default_factory=dict, description="measured devices the tiers pace by, fitted against this host"
    )

    @model_validator(mode="after")
    def _every_tier_has_an_endpoint(self) -> DeploymentSpec:
        missing = [t for t in TIERS if t not in self.tiers]
        if missing:
            raise ValueError(f"tiers must give a url for every tier; missing: {', '.join(missing)}")
        return self

    def link(self, a: TierName, b: TierName) -> LinkSpec:
        return self.links.get(link_between(a, b), LinkSpec())


def load_deployment(path: Path) -> DeploymentSpec:
    """Read a deployment file (YAML or JSON) and validate it."""
    return load_yaml_spec(path, DeploymentSpec, "deployment")


# TCP payload per Ethernet frame with timestamps: MTU − 52 (IP 20, TCP 32) of MTU + 14 (Ethernet) bytes the
# shaper counts — 1448 of 1514 at MTU 1500; 1398 of 1464 on a Swarm overlay (MTU 1450: VXLAN's 50 bytes are
# added below the interface the tier shapes, on the underlay, and cost the link nothing it emulates)
ETHERNET_MTU = 1500


def tcp_payload_per_frame(mtu_bytes: int = ETHERNET_MTU) -> float:
    return (mtu_bytes - 52) / (mtu_bytes + 14)


# which tier measures which link: the one that sends requests over it
LINK_SENDERS: dict[LinkName, tuple[TierName, TierName]] = {
    "mobile-edge": ("mobile", "edge"),
    "edge-cloud": ("edge", "cloud"),
    "mobile-cloud": ("mobile", "cloud"),
}


class LinkProbeSpec(FrozenSpec):
    """What a tier is asked to measure on its link towards ``peer`` (``POST /tierlab/probe``)."""

    peer: TierName
    pings: int = Field(
        default=20, ge=1, le=1000, description="small round trips for the RTT (more on a jittered link: pings_for_p50)"
    )
    rounds: int = Field(default=5, ge=1, le=50, description="spaced blocks of pings; p50 = median of their medians")
    bulk_s: float = Field(default=1.0, gt=0.0, le=30.0, description="aim of each bulk transfer at the configured rate")
    bulk_repeats: int = Field(
        default=4, ge=0, le=10, description="quarter-and-full transfer pairs for the goodput (best of each); 0 = skip"
    )


class LinkMeasurementSpec(FrozenSpec):
    """A link measured through the path requests take (the emulation included), beside its configuration."""

    link: LinkName
    sender: TierName
    backend: str
    configured: LinkSpec
    rtt_ms_min: float
    rtt_ms_p50: float = Field(description="median of the medians of spaced rounds of pings")
    rtt_ms_p90: float
    path_rtt_ms_p50: float | None = Field(
        default=None,
        description="the same pings with the userspace delay left out, interleaved with them: the path's own "
        "round trip, which the link's delay adds to; None where the kernel adds the delay (netem)",
    )
    bulk_bytes: int
    goodput_mbit: float | None = Field(description="payload bits per second of the best bulk transfer")
    mtu_bytes: int = Field(default=ETHERNET_MTU, ge=576, le=65536, description="the shaped interface's MTU")

    @property
    def expected_rtt_ms(self) -> float:
        return self.configured.rtt_ms

    @property
    def emulated_rtt_ms_p50(self) -> float:
        """What the emulation adds to the path's own round trip (all of the RTT where that is not measured)."""
        return self.rtt_ms_p50 - (self.path_rtt_ms_p50 or 0.0)

    @property
    def expected_goodput_mbit(self) -> float | None:
        """TCP payload rate the configured link rate allows: rate × MSS / Ethernet frame at the interface's MTU
        (1448 / 1514 at 1500; 1398 / 1464 on an overlay)."""
        rate = self.configured.rate_mbit
        return None if rate is None else rate * tcp_payload_per_frame(self.mtu_bytes)

    def problems(self, *, rate_tolerance_pct: float = 10.0) -> list[str]:
        """Where the emulation leaves the tolerance (the RTT it adds to the path within
        ``LinkSpec.rtt_tolerance_ms``; goodput within ±pct of the expected); empty when the link is what it
        should be."""
        found = []
        rtt_slack = self.configured.rtt_tolerance_ms
        if abs(self.emulated_rtt_ms_p50 - self.expected_rtt_ms) > rtt_slack:
            path = "" if self.path_rtt_ms_p50 is None else f" ({self.path_rtt_ms_p50:.2f} of it the path's own)"
            found.append(
                f"{self.link}: RTT p50 {self.rtt_ms_p50:.2f} ms{path}, "
                f"expected {self.expected_rtt_ms:g} ± {rtt_slack:.2f} added to the path"
            )
        expected, measured = self.expected_goodput_mbit, self.goodput_mbit
        if expected and measured is not None and abs(measured - expected) > expected * rate_tolerance_pct / 100:
            found.append(
                f"{self.link}: goodput {measured:.1f} Mbit/s, expected {expected:.1f} ± {rate_tolerance_pct:g} %"
            )
        return found


def network_profile_links(path: Path) -> dict[LinkName, LinkSpec]:
    """The link conditions a network profile's compose override gives the tiers (its ``TIERLAB_LINKS``)."""
    try:
        document = yaml.safe_load(path.read_text())
        text = document["services"]["mobile"]["environment"]["TIERLAB_LINKS"]
        return {link: LinkSpec.model_validate(spec) for link, spec in json.loads(text).items()}
    except OSError as exc:
        raise ConfigError(f"cannot read network profile {path}: {exc.strerror}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"network profile {path} has no valid TIERLAB_LINKS: {exc}") from None
