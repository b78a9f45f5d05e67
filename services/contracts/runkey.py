"""The names a run is known by, typed: a strategy (``variant@placement``) and a bandwidth-sweep cell
(``sweep:<row>x<column>``, the network name of a sweep's run). One writer (``str``) and one reader
(``parse``) each, so the loadgen, the tier and the report never split these strings themselves."""

from __future__ import annotations

from dataclasses import dataclass

from services.contracts.errors import ConfigError

SWEEP_PREFIX = "sweep:"


@dataclass(frozen=True, slots=True)
class Strategy:
    """A variant placed on tiers: what an engineer chooses."""

    model: str
    placement: str

    def __str__(self) -> str:
        return f"{self.model}@{self.placement}"

    @classmethod
    def parse(cls, text: str) -> Strategy:
        model, at, placement = text.rpartition("@")
        if not at or not model or not placement:
            raise ConfigError(f"{text!r} is not a strategy: write <variant>@<placement>, e.g. fmnist-resnet.sptq@E")
        return cls(model, placement)

    @property
    def operator(self) -> str:
        """The variant's operator (``fmnist-resnet.sptq`` → ``sptq``)."""
        return self.model.split(".", 1)[-1]


@dataclass(frozen=True, slots=True)
class SweepCell:
    """One cell of a bandwidth sweep: the rates (Mbit/s) of its row and column links."""

    row_mbit_s: float
    column_mbit_s: float

    def __str__(self) -> str:
        return f"{SWEEP_PREFIX}{self.row_mbit_s:g}x{self.column_mbit_s:g}"

    @staticmethod
    def names(network: str) -> bool:
        """Whether a run's network name is a sweep cell (not a network profile)."""
        return network.startswith(SWEEP_PREFIX)

    @classmethod
    def parse(cls, network: str) -> SweepCell:
        try:
            row, column = (float(v) for v in network.removeprefix(SWEEP_PREFIX).split("x"))
        except ValueError:
            raise ConfigError(f"{network!r} is not a sweep cell: write {SWEEP_PREFIX}<row>x<column>") from None
        if not cls.names(network):
            raise ConfigError(f"{network!r} is not a sweep cell: write {SWEEP_PREFIX}<row>x<column>")
        return cls(row, column)
