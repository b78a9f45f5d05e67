"""Command line: ``python -m services tier|local|demo``.

``tier``   run one tier (the container entry point); options mirror ``TierSettings`` and fall back to
           ``TIERLAB_*`` environment variables.
``local``  run the three tiers of a deployment as processes on this host (until Ctrl-C, or ``--detach``).
``down``   stop tiers started with ``local --detach``.
``status`` show each tier's readiness, cgroup limits, onnxruntime threads and link backends.
``demo``   write the demo variants and a local deployment file, to try tiers before ``make models``.
``devices`` the measured devices: list, fit, fidelity against their published data, the calibration kit.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
import types
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import ValidationError

from services.contracts.errors import ConfigError
from services.contracts.stack_state import read_stack_state, write_stack_state
from services.contracts.tier_status import TierStatusSpec, read_tier_status
from services.tier.settings import TierSettings


def _add_settings_options(parser: argparse.ArgumentParser) -> None:
    """One option per TierSettings field, so the CLI and the environment can never drift apart."""
    for name, info in TierSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        annotation = info.annotation
        help_text = f"{info.description or ''} (env TIERLAB_{name.upper()})".strip()
        if annotation is bool or (get_origin(annotation) in (types.UnionType,) and bool in get_args(annotation)):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            choices = get_args(annotation) if get_origin(annotation) is None and get_args(annotation) else None
            parser.add_argument(flag, dest=name, default=None, choices=choices, help=help_text)


def _settings_from(args: argparse.Namespace) -> TierSettings:
    given: dict[str, Any] = {
        name: getattr(args, name) for name in TierSettings.model_fields if getattr(args, name, None) is not None
    }
    return TierSettings(**given)


def run_tier(args: argparse.Namespace) -> int:
    from services.tier.app import build_tier
    from services.tier.routes import create_app

    try:
        settings = _settings_from(args)
    except ValidationError as exc:
        print(f"tierlab tier: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format=f"%(asctime)s {settings.tier} %(levelname)s %(message)s"
    )
    try:
        tier = build_tier(settings)
    except ConfigError as exc:
        print(f"tierlab tier {settings.tier}: {exc.message}", file=sys.stderr)
        return exc.exit_code
    graceful_s = 5.0
    app = create_app(tier)
    if settings.http_server == "uvicorn":
        import uvicorn

        uvicorn.run(
            app,
            host=settings.host,
            port=settings.port,
            loop="uvloop",
            http="httptools",
            access_log=False,
            log_level=settings.log_level,
            timeout_graceful_shutdown=int(graceful_s),
            timeout_keep_alive=int(settings.keep_alive_s),
        )
        return 0
    from services.tier import server

    http = server.Server(app, settings.host, settings.port, app.server_limits, graceful_s, budget=app.budget)
    tier.http_server = http  # re-shaped links update its limits
    try:
        server.serve(http)
    except (RuntimeError, OSError) as exc:
        print(f"tierlab tier {settings.tier}: {exc}", file=sys.stderr)
        return 3
    return 0


def run_local(args: argparse.Namespace) -> int:
    from services.local import LocalStack

    state_file = Path(args.state)
    if args.detach and state_file.exists():
        print(
            f"tierlab local: {state_file} exists: tiers may be running already (`python -m services down`)",
            file=sys.stderr,
        )
        return 1
    try:
        stack = LocalStack(
            Path(args.deployment),
            tier_args=args.tier_args or (),
            detach=args.detach,
            log_dir=state_file.parent / "logs" if args.detach else None,
        )
        stack.start()
    except ConfigError as exc:
        print(f"tierlab local: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except (RuntimeError, TimeoutError) as exc:
        print(f"tierlab local: {exc}", file=sys.stderr)
        return 1
    for tier in stack.tiers:
        print(f"{tier:>6}  {stack.url(tier)}  (log {stack.log_path(tier)})")
    if args.detach:
        write_stack_state(state_file, stack.state())
        print(f"tiers ready in the background; stop them with: python -m services down --state {state_file}")
        return 0
    print("tiers ready; Ctrl-C stops them")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while all(p.poll() is None for p in stack.processes.values()):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_down(args: argparse.Namespace) -> int:
    from services.stack.runtime import LocalRuntime

    state_file = Path(args.state)
    state = read_stack_state(state_file)
    if state is None:
        print("no local tiers running (nothing to stop)")
        return 0
    stopped = LocalRuntime(state).down()
    state_file.unlink()
    print(f"stopped: {', '.join(stopped) or 'none were still running'}")
    return 0


def run_status(args: argparse.Namespace) -> int:
    from services.contracts.specs import TIERS, load_deployment
    from services.local import http_get_json

    try:
        deployment = load_deployment(Path(args.deployment))
    except ConfigError as exc:
        print(f"tierlab status: {exc.message}", file=sys.stderr)
        return exc.exit_code
    healthy = True
    for tier in TIERS:
        url = deployment.tiers[tier].base_url
        code, status = http_get_json(f"{url}/tierlab/status")
        if code != 200:
            healthy = False
            print(f"{tier:>6}  {url}  DOWN" if code == 0 else f"{tier:>6}  {url}  answered {code}")
            continue
        read = read_tier_status(status)
        print(_status_line(tier, url, read))
        for link in read.links:
            print(
                f"        link {link.link:<12} {link.backend:<14} delay {link.delay_ms:g} ms, "
                f"rate {link.rate_mbit or 'unlimited'} Mbit/s {link.note}"
            )
    return 0 if healthy else 1


def _status_line(tier: str, url: str, status: TierStatusSpec) -> str:
    limits = status.limits
    memory = limits.memory_limit_bytes
    memory_text = f"{memory / (1 << 20):.0f} MiB" if memory else "unlimited"
    ready = "ready" if status.ready else f"NOT READY ({status.load_error or 'loading'})"
    return (
        f"{tier:>6}  {url}  {ready}; cpu {limits.cpu_cores:g} cores ({limits.cgroup}), memory {memory_text}, "
        f"onnxruntime threads {status.onnxruntime.intra_op_threads}, {status.loaded_summary()}"
    )


def run_demo(args: argparse.Namespace) -> int:
    from services.demo import write_demo

    deployment = write_demo(Path(args.directory), seed=args.seed)
    print(f"wrote demo variants and {deployment}")
    print(f"start the tiers:  python -m services local --deployment {deployment}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    tier = commands.add_parser("tier", help="run one tier")
    _add_settings_options(tier)
    tier.set_defaults(handler=run_tier)

    local = commands.add_parser("local", help="run the three tiers of a deployment on this host")
    local.add_argument("--deployment", required=True, help="deployment file (YAML or JSON)")
    local.add_argument("--detach", action="store_true", help="start in the background and return")
    local.add_argument("--state", default=".local/stack.json", help="where --detach records the tiers' pids")
    local.add_argument("tier_args", nargs=argparse.REMAINDER, help="options passed to every tier, after --")
    local.set_defaults(handler=run_local)

    down = commands.add_parser("down", help="stop tiers started with local --detach")
    down.add_argument("--state", default=".local/stack.json")
    down.set_defaults(handler=run_down)

    status = commands.add_parser("status", help="show each tier's readiness, limits and links")
    status.add_argument("--deployment", required=True, help="deployment file (YAML or JSON)")
    status.set_defaults(handler=run_status)

    demo = commands.add_parser("demo", help="write demo variants and a local deployment")
    demo.add_argument("directory", nargs="?", default="models/demo", help="where to write (default models/demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=run_demo)

    from services.devices.cli import add_commands as add_device_commands
    from services.stack.cli import add_commands

    add_commands(commands)
    add_device_commands(commands)

    args = parser.parse_args(argv)
    if args.command == "stack":
        from services.stack.cli import main as stack_main

        return stack_main(args)
    if getattr(args, "tier_args", None) and args.tier_args[0] == "--":
        args.tier_args = args.tier_args[1:]
    handler: Any = args.handler
    try:
        return int(handler(args))
    except ConfigError as exc:
        print(f"tierlab: {exc.message}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
