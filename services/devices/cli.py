"""``python -m services devices …``: the measured devices — list, fit, check against their data, calibrate.

list                          the device profiles (compose/devices) and what each is fitted to
fit [NAME …]                  fit devices against this host and print their per-class ratios
fidelity [NAME …]             leave-one-network-out check of every device; last line JSON (make fidelity-devices)
kit DIR                       write the calibration kit for a device you own
import-calibration FILE       a profile from the kit's device.json (--name, --description, --cores)
import-published README.md    remake services/devices/data/ncnn-benchmark.tsv from ncnn's benchmark README
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from services.contracts.device import DeviceModelSpec
from services.contracts.errors import ConfigError
from services.devices.fit import CHECKED, DeviceFit, fit_device
from services.devices.kit import import_calibration, write_kit
from services.devices.profiles import known_devices, load_profile
from services.devices.published import PUBLISHED_FILE, parse_readme, write_published
from services.devices.reference import host_reference


def fitted(names: list[str], root: Path = Path(".")) -> dict[str, DeviceFit]:
    """The named devices fitted against this host (its reference networks measured once, cached)."""
    reference = host_reference(root)
    return {name: fit_device(load_profile(name), reference) for name in names}


def device_models(names: list[str], root: Path = Path(".")) -> dict[str, DeviceModelSpec]:
    return {name: fit.model for name, fit in fitted(names, root).items()}


def _names(args: argparse.Namespace) -> list[str]:
    return list(args.names) or known_devices()


def cmd_list(args: argparse.Namespace) -> int:
    for name in known_devices():
        profile = load_profile(name)
        source = profile.table if profile.table else "calibrated with the kit"
        print(f"{name:18s} {profile.cores} cores  {profile.description}\n{'':18s} data: {source}")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    for name, fit in fitted(_names(args)).items():
        model = fit.model
        print(f"{name}: {model.description}; against {model.host}")
        for threads, ratios in sorted(model.ratios.items()):
            shown = "  ".join(f"{k} {v:.2f}" for k, v in ratios.items())
            print(f"  {threads} thread(s), device ÷ this host's onnxruntime:  {shown}")
        print(f"  serving ratio {model.serving_ratio:.2f} ({model.serving_basis})")
    return 0


def cmd_fidelity(args: argparse.Namespace) -> int:
    """Per device: every prediction of the leave-one-network-out check, then the summary, then JSON."""
    summary: dict[str, dict[str, Any]] = {}
    for name, fit in fitted(_names(args)).items():
        model = fit.model
        print(f"\n{name} ({model.source.table}; {model.source.arithmetic})")
        print(f"  {'network':22s} {'threads':>7s} {'published ms':>13s} {'predicted ms':>13s} {'error':>7s}")
        for p in sorted(fit.predictions, key=lambda p: (p.network not in CHECKED, p.network, p.threads)):
            mark = "" if p.network in CHECKED else "  (not in the checked set)"
            print(f"  {p.network:22s} {p.threads:7d} {p.published_ms:13.2f} {p.predicted_ms:13.2f} "
                  f"{p.error:+7.1%}{mark}")  # fmt: skip
        f = model.fit
        verdict = "within" if f.within_tolerance else "OUTSIDE"
        print(f"  checked ({f.networks} networks, {f.predictions} predictions): median |error| "
              f"{f.median_abs_err:.1%}, worst {f.worst_abs_err:.1%} — {verdict} tolerance "
              f"(median ≤ {f.tolerance_median:.0%}, worst ≤ {f.tolerance_worst:.0%}); every network "
              f"({f.predictions_all}): median {f.median_abs_err_all:.1%}, worst {f.worst_abs_err_all:.1%}")  # fmt: skip
        summary[name] = {
            "median_abs_err": f.median_abs_err, "worst_abs_err": f.worst_abs_err, "networks": f.networks,
            "predictions": f.predictions, "within_tolerance": f.within_tolerance,
            "median_abs_err_all": f.median_abs_err_all, "worst_abs_err_all": f.worst_abs_err_all,
        }  # fmt: skip
    print(json.dumps({"devices": summary}))
    return 0


def cmd_kit(args: argparse.Namespace) -> int:
    write_kit(Path(args.folder))
    return 0


def cmd_import_calibration(args: argparse.Namespace) -> int:
    path = import_calibration(Path(args.file), args.name, args.description or "", args.cores)
    print(f'wrote {path}; use it in a resource profile: TIERLAB_DEVICE: \'{{"model": "{args.name}", ...}}\'')
    return 0


def cmd_import_published(args: argparse.Namespace) -> int:
    tables = [load_profile(n).table for n in known_devices() if load_profile(n).table]
    try:
        text = Path(args.readme).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {args.readme}: {exc.strerror}") from None
    runs = parse_readme(text, [t for t in tables if t])
    write_published(runs)
    print(f"wrote {len(runs)} runs of {len({r.table for r in runs})} devices to {PUBLISHED_FILE}")
    return 0


def add_commands(commands: Any) -> None:
    devices = commands.add_parser("devices", help="measured devices: list, fit, fidelity, calibration kit")
    sub = devices.add_subparsers(dest="devices_command", required=True)
    listed = (
        ("list", cmd_list, "the device profiles"),
        ("fit", cmd_fit, "fit devices against this host"),
        ("fidelity", cmd_fidelity, "check every device against its data; last line JSON"),
    )
    for name, handler, text in listed:
        command = sub.add_parser(name, help=text)
        if name != "list":
            command.add_argument("names", nargs="*", help="device names (default: every profile)")
        command.set_defaults(handler=handler)
    kit = sub.add_parser("kit", help="write the calibration kit for a device you own")
    kit.add_argument("folder")
    kit.set_defaults(handler=cmd_kit)
    calibration = sub.add_parser("import-calibration", help="a device profile from the kit's device.json")
    calibration.add_argument("file")
    calibration.add_argument("--name", required=True, help="the profile's name (lower case, digits, dashes)")
    calibration.add_argument("--description")
    calibration.add_argument("--cores", type=int, help="default: the cores it was measured with")
    calibration.set_defaults(handler=cmd_import_calibration)
    published = sub.add_parser("import-published", help="remake the published-times table from ncnn's README")
    published.add_argument("readme")
    published.set_defaults(handler=cmd_import_published)
