"""Fitting a device to its published times, checking the fit against the device's own data, and carrying it
over from the tables' engine (ncnn) to the tiers' (onnxruntime).

A device's time for a network at ``t`` threads is modelled as the host's time for it split by kernel class,
each class scaled by the device's ratio for that class at ``t`` threads:

    device_ms(network, t) = Σ_class host_ms(network, class) × ratio_t(class)

The ratios are fitted per thread count on the device's published networks by least squares on the log of
predicted ÷ published (errors are relative: a network of 5 ms counts as much as one of 500), each class's
log ratio pulled towards the device's common one by a small penalty (``SHRINK``): a class few networks
exercise (int8 depthwise) then borrows from the others instead of taking any value that fits one network.

Fidelity is leave-one-network-out: each network's published time predicted from ratios fitted on the other
networks alone, at every thread count, its relative error kept. A network with a class no other network has
(more than 2 % of its time) cannot be predicted that way and is left out of the check (it still shapes the
fit). Two sets are reported: the **backbones with an int8 row** (``CHECKED``: ResNet-18/50, GoogLeNet,
SqueezeNet and VGG-16 in float and int8 — the architectures tierlab's subjects are built from and the
int8 ÷ float question is about), whose errors the tolerance applies to, and **every network** the table has,
shown beside them so nothing is hidden.

The tiers run onnxruntime, whose speed on this host differs from ncnn's class by class (onnxruntime's int8
convolutions use this host's VNNI and run 2-3× faster than its float ones; ncnn's gain here is smaller). The
**engine transfer** of a class is this host's ncnn time ÷ its onnxruntime time for the same networks
(``reference``: the converted ones), the median over the networks that spend at least ``TRANSFER_SHARE`` of
their time in the class in both engines. A tier paces a stage by ratio × transfer: the device's time for
the work as its published engine would do it, whatever this host's onnxruntime gains — so a device does not
inherit this host's int8 speed-up. What does not transfer (ncnn's and onnxruntime's relative efficiency
being the same on the device as here) is an assumption, and ``python -m services devices calibrate`` on a
device you own measures onnxruntime there directly.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np

from services.contracts.device import DeviceFitSpec, DeviceModelSpec, DeviceSourceSpec
from services.contracts.kernels import KERNEL_CLASSES, KernelClass
from services.devices import calibrate_device
from services.devices.kit import read_calibration
from services.devices.profiles import DeviceProfileSpec
from services.devices.published import SOURCE_URL, device_runs
from services.devices.reference import HostReferenceSpec

SHRINK = 0.05
COVERED_SHARE = 0.02
TRANSFER_SHARE = 0.10
CHECKED = tuple(f"{n}{q}" for n in ("squeezenet", "googlenet", "resnet18", "resnet50", "vgg16") for q in ("", "_int8"))


def _design(reference: HostReferenceSpec, names: list[str], *, engine: str) -> np.ndarray:
    """Each network's host time by class, in ``ncnn`` or ``onnxruntime``."""
    rows = []
    for name in names:
        network = reference.networks[name]
        classes = network.classes_ms if engine == "ncnn" else (network.ort_classes_ms or {})
        rows.append([classes.get(k, 0.0) for k in KERNEL_CLASSES])
    return np.array(rows)


def serving_ms_here(rounds: int = 3) -> float:
    """The serving micro-benchmark of the calibration kit, on this host (its fastest run over rounds)."""
    return min(calibrate_device.fastest(calibrate_device.serving_work, 50, 5) for _ in range(rounds))


def fit_ratios(host_ms: np.ndarray, device_ms: np.ndarray, shrink: float | None = None) -> np.ndarray:
    """Per-class ratios (one per column of ``host_ms``) that best predict ``device_ms``, in log error."""
    shrink = SHRINK if shrink is None else shrink
    from scipy.optimize import least_squares  # noqa: PLC0415 — fitting is host-side only

    used = host_ms.sum(axis=0) > 0

    def residuals(x: np.ndarray) -> np.ndarray:
        ratios = np.exp(x[0] + x[1:])
        return np.concatenate([np.log(host_ms @ ratios / device_ms), math.sqrt(shrink) * x[1:]])

    start = np.zeros(host_ms.shape[1] + 1)
    start[0] = math.log(float(np.median(device_ms / host_ms.sum(axis=1))))
    solution = least_squares(residuals, start).x
    ratios = np.exp(solution[0] + solution[1:])
    # a class no network exercises keeps the device's common ratio
    return np.where(used, ratios, math.exp(solution[0]))


def engine_transfer(reference: HostReferenceSpec) -> dict[KernelClass, float]:
    """Per class, this host's ncnn time ÷ onnxruntime time (median over networks busy in it in both); 1.0
    for a class no converted network spends enough time in (no transfer measured)."""
    found: dict[KernelClass, float] = {}
    for kind in KERNEL_CLASSES:
        ratios = []
        for network in reference.networks.values():
            if network.ort_classes_ms is None or network.ort_wall_ms is None:
                continue
            ncnn_ms, ort_ms = network.classes_ms.get(kind, 0.0), network.ort_classes_ms.get(kind, 0.0)
            if ncnn_ms >= TRANSFER_SHARE * network.wall_ms and ort_ms >= TRANSFER_SHARE * network.ort_wall_ms:
                ratios.append(ncnn_ms / ort_ms)
        found[kind] = round(statistics.median(ratios), 5) if ratios else 1.0
    return found


@dataclass(frozen=True)
class Prediction:
    network: str
    threads: int
    published_ms: float
    predicted_ms: float

    @property
    def error(self) -> float:
        return self.predicted_ms / self.published_ms - 1


def leave_one_out(host_ms: np.ndarray, device_ms: np.ndarray, names: list[str], threads: int) -> list[Prediction]:
    """Each network's time predicted from the others' fit (networks with an uncovered class skipped)."""
    shares = host_ms / host_ms.sum(axis=1, keepdims=True)
    found = []
    for i, name in enumerate(names):
        others = np.arange(len(names)) != i
        covered = (shares[others] > COVERED_SHARE).any(axis=0)
        if np.any((shares[i] > COVERED_SHARE) & ~covered):
            continue
        ratios = fit_ratios(host_ms[others], device_ms[others])
        found.append(Prediction(name, threads, float(device_ms[i]), float(host_ms[i] @ ratios)))
    return found


def summarise(predictions: list[Prediction]) -> tuple[float, float, int]:
    errors = [abs(p.error) for p in predictions]
    if not errors:
        return math.inf, math.inf, 0
    return round(statistics.median(errors), 4), round(max(errors), 4), len({p.network for p in predictions})


@dataclass(frozen=True)
class DeviceFit:
    model: DeviceModelSpec
    predictions: list[Prediction]  # every network, every thread count

    def checked(self) -> list[Prediction]:
        return [p for p in self.predictions if p.network in CHECKED]


def fit_device(profile: DeviceProfileSpec, reference: HostReferenceSpec) -> DeviceFit:
    """The device's ratios against this host at each of its thread counts, and their leave-one-out check.
    A published device is fitted on this host's ncnn times and carried to onnxruntime by the engine transfer;
    a calibrated one (measured in onnxruntime on the device) on this host's onnxruntime times directly."""
    if profile.calibrated:
        calibration = read_calibration(profile.calibration_file)
        published = {t: calibration.ms[t] for t in profile.threads}
        engine, transfer = "onnxruntime", dict.fromkeys(KERNEL_CLASSES, 1.0)
        serving = calibration.serving_ms / serving_ms_here()
        serving_basis = "the calibration kit's serving micro-benchmark on the device ÷ the same here"
    else:
        assert profile.table is not None  # load_profile checks a profile has one or the other
        published = device_runs(profile.table, list(profile.threads))
        engine, transfer = "ncnn", engine_transfer(reference)
        serving = 0.0  # the "other" ratio, below
        serving_basis = ("the device's one-thread ratio for memory-bound layers (class 'other'): a proxy for its "
                         "Python serving work; calibrate the device with the kit to measure it")  # fmt: skip
    ratios: dict[int, dict[KernelClass, float]] = {}
    predictions: list[Prediction] = []
    for threads, rows in published.items():
        names = sorted(n for n in rows if n in reference.networks and _design(reference, [n], engine=engine).sum() > 0)
        host_ms = _design(reference, names, engine=engine)
        device_ms = np.array([rows[n] for n in names])
        fitted = fit_ratios(host_ms, device_ms)
        ratios[threads] = {k: round(float(r), 5) for k, r in zip(KERNEL_CLASSES, fitted, strict=True)}
        predictions += leave_one_out(host_ms, device_ms, names, threads)
    checked = [p for p in predictions if p.network in CHECKED]
    applied = {t: {k: round(r * transfer[k], 5) for k, r in by_class.items()} for t, by_class in ratios.items()}
    median, worst, count = summarise(checked)
    median_all, worst_all, _ = summarise(predictions)
    fit = DeviceFitSpec(
        median_abs_err=median, worst_abs_err=worst, networks=count, predictions=len(checked),
        median_abs_err_all=median_all, worst_abs_err_all=worst_all, predictions_all=len(predictions),
    )  # fmt: skip
    model = DeviceModelSpec(
        name=profile.name,
        description=profile.description,
        cores=profile.cores,
        ratios=applied,
        engine_transfer=transfer,
        serving_ratio=round(serving or ratios[1]["other"], 5),
        serving_basis=serving_basis,
        source=DeviceSourceSpec(
            table=profile.table,
            url=SOURCE_URL,
            engine=profile.engine,
            arithmetic=profile.arithmetic,
            notes=profile.notes,
        ),
        fit=fit,
        host=reference.host,
    )
    return DeviceFit(model, predictions)
