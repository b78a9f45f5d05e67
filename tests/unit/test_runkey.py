"""Strategy and sweep-cell names: what ``str`` writes, ``parse`` reads back; a malformed one is a clear error."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.contracts.errors import ConfigError
from services.contracts.runkey import Strategy, SweepCell

names = st.from_regex(r"[a-z0-9][a-z0-9.\-]{0,20}", fullmatch=True)
placements = st.sampled_from(["M", "E", "C", "M-E", "E-C", "M-C", "M-E-C"])
rates = st.floats(min_value=0.01, max_value=10_000, allow_nan=False).map(lambda r: float(f"{r:g}"))


@given(names, placements)
def test_a_strategy_reads_back_what_it_wrote(model: str, placement: str) -> None:
    assert Strategy.parse(str(Strategy(model, placement))) == Strategy(model, placement)


@given(rates, rates)
def test_a_sweep_cell_reads_back_what_it_wrote(row: float, column: float) -> None:
    cell = SweepCell(row, column)
    assert SweepCell.names(str(cell))
    assert SweepCell.parse(str(cell)) == cell


def test_the_operator_of_a_strategy() -> None:
    assert Strategy.parse("fmnist-resnet.sptq-partition@M-E").operator == "sptq-partition"


@pytest.mark.parametrize("text", ["fmnist-resnet.sptq", "@M", "fmnist-resnet.sptq@", ""])
def test_a_malformed_strategy_says_how_to_write_one(text: str) -> None:
    with pytest.raises(ConfigError, match="<variant>@<placement>"):
        Strategy.parse(text)


@pytest.mark.parametrize("text", ["paper", "sweep:10", "sweep:axb", "10x20"])
def test_a_malformed_sweep_cell_says_how_to_write_one(text: str) -> None:
    with pytest.raises(ConfigError, match="sweep:<row>x<column>"):
        SweepCell.parse(text)
