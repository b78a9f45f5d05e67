"""Command line: ``python -m services tier|local|demo``.

``tier``   run one tier (the container entry point); options mirror ``TierSettings`` and fall back to
           ``TIERLAB_*`` environment variables.
``local``  run the three tiers of a deployment as processes on this host until Ctrl-C.
``demo``   write the demo variants and a local deployment file, to try tiers before ``make models``.
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
    import uvicorn

    from services.tier.app import build_tier, create_app

    try:
        settings = _settings_from(args)
    except ValidationError as exc:
        print(f"tierlab tier: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format=f"%(asctime)s {settings.tier} %(levelname)s %(message)s")
    try:
        tier = build_tier(settings)
    except ConfigError as exc:
        print(f"tierlab tier {settings.tier}: {exc.message}", file=sys.stderr)
        return 2
    uvicorn.run(
        create_app(tier), host=settings.host, port=settings.port, loop="uvloop", http="httptools",
        access_log=False, log_level=settings.log_level, timeout_graceful_shutdown=5,
    )  # fmt: skip
    return 0


def run_local(args: argparse.Namespace) -> int:
    from services.local import LocalStack

    try:
        stack = LocalStack(Path(args.deployment), tier_args=args.tier_args or ())
    except ConfigError as exc:
        print(f"tierlab local: {exc.message}", file=sys.stderr)
        return 2
    try:
        stack.start()
    except (RuntimeError, TimeoutError) as exc:
        print(f"tierlab local: {exc}", file=sys.stderr)
        return 1
    for tier in stack.tiers:
        print(f"{tier:>6}  {stack.url(tier)}  (log {stack.log_path(tier)})")
    print("tiers ready; Ctrl-C stops them")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while all(p.poll() is None for p in stack.processes.values()):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()
    dead = [t for t, p in stack.processes.items() if p.poll()]
    return 1 if dead else 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_demo(args: argparse.Namespace) -> int:
    from services.demo import write_demo

    deployment = write_demo(Path(args.directory), seed=args.seed)
    print(f"wrote demo variants and {deployment}")
    print(f"start the tiers:  python -m services local --deployment {deployment}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)

    tier = commands.add_parser("tier", help="run one tier")
    _add_settings_options(tier)
    tier.set_defaults(handler=run_tier)

    local = commands.add_parser("local", help="run the three tiers of a deployment on this host")
    local.add_argument("--deployment", required=True, help="deployment file (YAML or JSON)")
    local.add_argument("tier_args", nargs=argparse.REMAINDER, help="options passed to every tier, after --")
    local.set_defaults(handler=run_local)

    demo = commands.add_parser("demo", help="write demo variants and a local deployment")
    demo.add_argument("directory", nargs="?", default="models/demo", help="where to write (default models/demo)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=run_demo)

    args = parser.parse_args(argv)
    if getattr(args, "tier_args", None) and args.tier_args[0] == "--":
        args.tier_args = args.tier_args[1:]
    handler: Any = args.handler
    return int(handler(args))


if __name__ == "__main__":
    sys.exit(main())
