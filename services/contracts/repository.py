"""The model repository every tier serves: the Open Inference Protocol model-repository extension.

As in Triton and KServe, ``POST /v2/repository/index`` lists every model the tier can serve with its
state, and ``POST /v2/repository/models/{name}/load`` / ``…/unload`` change it. A tier starts with the
models its settings name (``StartupModelsSpec``: all, none or a list) and the loadgen loads what a run
group needs on the tiers its placements use. Each index entry carries what the load cost on that tier,
measured: resident memory, the peak while loading and warming, the load and warm-up times.

A load is refused, with the numbers, when its estimated peak (``LOAD_PEAK_FACTOR`` × the ONNX files
plus ``LOAD_PEAK_FIXED_MIB``) exceeds the memory the tier has free, rather than letting the kernel's
OOM killer take the tier down mid-experiment. The factor is measured: the peak resident growth of
loading and first running an onnxruntime session was 0.5× the file for a MatMul chain and 2.4× for a
convolution chain (weights pre-packed on the first run), 1.1× for the fmnist ResNet.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from services.contracts.manifest import FrozenSpec

MIB = 1 << 20
LOAD_PEAK_FACTOR = 2.5
LOAD_PEAK_FIXED_MIB = 32.0
ModelState = Literal["READY", "LOADING", "UNLOADING", "UNAVAILABLE"]
StartupModels = Literal["all", "none"] | tuple[str, ...]


class RepositoryIndexRequestSpec(FrozenSpec):
    """``POST /v2/repository/index`` body: ``ready`` true lists only the models ready to serve."""

    ready: bool = False


class RepositoryModelSpec(FrozenSpec):
    """One entry of a tier's repository index (the extension's name/version/state/reason, and tierlab's
    measured costs of loading it on this tier)."""

    name: str
    version: str = "1"
    state: ModelState
    reason: str = Field(default="", description="why the model is UNAVAILABLE (refused or failed load)")
    placements: tuple[str, ...] = Field(default=(), description="the placements the stack serves it under")
    stages_here: tuple[int, ...] = Field(description="the stages this tier runs for some served placement")
    file_mib: float = Field(ge=0, description="the ONNX files of those stages")
    resident_mib: float | None = Field(default=None, description="resident growth of load + warm-up, measured")
    peak_mib: float | None = Field(default=None, description="peak resident growth while loading, measured")
    load_ms: float | None = None
    warmup_ms: float | None = None

    @property
    def ready(self) -> bool:
        return self.state == "READY"


def estimated_peak_mib(file_mib: float) -> float:
    """What loading ``file_mib`` of ONNX may take at its peak, to compare with the memory free."""
    return LOAD_PEAK_FACTOR * file_mib + LOAD_PEAK_FIXED_MIB


def parse_startup_models(text: str) -> StartupModels:
    """``TIERLAB_STARTUP_MODELS``: ``all`` (every model of the deployment), ``none``, or names, comma-separated."""
    cleaned = text.strip()
    if cleaned.lower() in ("all", "none"):
        return "all" if cleaned.lower() == "all" else "none"
    names = tuple(n.strip() for n in cleaned.split(",") if n.strip())
    return names or "none"
