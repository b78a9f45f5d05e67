"""Every variant as the chain of operators that makes it: compositions are declared here, not coded.

A chain may start with one white-box step (it trains a new torch model); the rest are black-box steps
on the ONNX draft (``operators.blackbox.BLACK_BOX``). A subject offers all variants but those its
model cannot take.
"""

from __future__ import annotations

VARIANTS: dict[str, tuple[str, ...]] = {
    "identity": ("identity",),
    "partition2": ("partition2",),
    "partition3": ("partition3",),
    "sptq": ("sptq",),
    "dynq": ("dynq",),
    "early-exit": ("early-exit",),
    "qee": ("early-exit", "sptq"),
    "sptq-partition": ("partition3", "sptq"),
    "qee-partition": ("early-exit2", "sptq"),
    "qat": ("qat",),
    "prune": ("prune",),
    "prune-structured": ("prune-structured",),
    "distill": ("distill",),
    "dsptq": ("distill", "sptq"),
}
WHITE_BOX = ("teacher", "qat", "prune", "prune-structured", "distill")
EXIT_VARIANTS = tuple(name for name, chain in VARIANTS.items() if any(s.startswith("early-exit") for s in chain))


def all_but(*excluded: str) -> tuple[str, ...]:
    unknown = set(excluded) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}")
    return tuple(name for name in VARIANTS if name not in excluded)
