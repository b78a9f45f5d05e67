"""``python -m services stack …``: the commands behind ``make up/down/status/logs/images/clean``.

``up`` brings up the Docker stack (``--runtime docker``, the default), the same stack across a Docker Swarm
(``--runtime swarm``), or the three tiers as local processes (``--runtime local``, no Docker needed; the
network profile is then emulated in userspace). Both record
``.local/stack.json``, which ``status``, ``down`` and the loadgen read to find the tiers.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from services.contracts.calibration import measure_speeds
from services.contracts.errors import ConfigError
from services.contracts.specs import (
    TIERS,
    LinkName,
    LinkSpec,
    TierName,
    network_profile_links,
)
from services.contracts.stack_state import StackStateSpec
from services.contracts.tier_status import TierStatusSpec, read_tier_status
from services.contracts.transport import json_call, probe_links
from services.stack.compose import (
    DEFAULT_SUBJECTS,
    StackSpec,
    available,
    compose_available,
    override_file,
    read_state,
    state_path,
)
from services.stack.docker import output, project_root, run, say
from services.stack.runtime import RUNTIMES, recorded_runtime


def network_links(name: str, root: Path) -> dict[LinkName, LinkSpec]:
    """The link conditions of network profile ``name`` (compose/network-<name>.yml)."""
    return network_profile_links(override_file("network", name, root))


def _spec(args: argparse.Namespace) -> StackSpec:
    subjects = tuple(s for s in args.subjects.split(",") if s) if args.subjects != "all" else ()
    return StackSpec(
        args.profile,
        args.network,
        Path(args.models_dir),
        subjects,
        with_grafana=not args.no_grafana,
        startup_models=args.startup_models,
    )


def cmd_up(args: argparse.Namespace) -> int:
    root = project_root()
    existing = read_state(root)
    if existing is not None:
        say(f"a {existing.runtime} stack is recorded in {state_path(root)}: taking it down first")
        _down(root, existing)
    runtime = RUNTIMES[args.runtime].up(_spec(args), root, args.timeout_s)
    if not runtime.contained:
        say("tiers started as local processes (no cgroup limits; links shaped in userspace)")
        return print_status(runtime.state)
    say(f"stack up in {runtime.state.up_s or 0:.0f} s")
    code = cmd_status(args)
    print("device speed (the calibration model on each tier vs this host; `make fidelity` adds the links):")
    for problem in print_speed_fidelity(runtime.state.urls, runs=30):
        print(f"  outside tolerance: {problem}")
    return code


def _down(root: Path, state: StackStateSpec | None) -> None:
    """Stop what ``state`` records; with no state, whatever the Docker project still has."""
    runtime = recorded_runtime(state or StackStateSpec(runtime="docker", urls={}), state_path(root))
    say(runtime.said_down(runtime.down()))
    state_path(root).unlink(missing_ok=True)


def cmd_down(args: argparse.Namespace) -> int:
    root = project_root()
    _down(root, read_state(root))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    state = read_state(project_root())
    if state is None:
        print("no stack is up (make up)")
        return 1
    return print_status(state)


def print_status(state: StackStateSpec) -> int:
    runtime = state.runtime
    contained = RUNTIMES[runtime].contained if runtime in RUNTIMES else False
    where = f"resources '{state.profile}', " if contained else ""
    print(f"tierlab stack: {runtime}, {where}network '{state.network}'")
    for tier, node in state.nodes.items():
        print(f"  {tier:<6} on node {node['hostname']} ({node['address']}, {node['arch']}, {node['cpus']:g} CPUs)")
    healthy = True
    for tier in TIERS:
        url = state.urls[tier]
        code, status = json_call(f"{url}/tierlab/status")
        if code != 200:
            healthy = False
            process = recorded_runtime(state).processes()[tier] if code == 0 else None
            down = "DOWN" + (f" ({process.run})" if process else "")
            if process is not None and process.oom_killed:
                down = "DOWN (OOM-killed: over its memory limit)"
            print(f"  {tier:<6} {url}  {down if code == 0 else f'answered {code}'}")
            continue
        _print_tier_status(url, read_tier_status(status))
    prometheus = state.prometheus
    if prometheus:
        code, targets = json_call(f"{prometheus}/api/v1/targets")
        if code == 200:
            active = targets["data"]["activeTargets"]
            up = [t["labels"].get("tier") or t["labels"]["job"] for t in active if t["health"] == "up"]
            print(f"  prometheus {prometheus}  targets up: {', '.join(up) or 'none yet'} ({len(active)} in all)")
        else:
            print(f"  prometheus {prometheus}  not answering")
    if contained:
        grafana, password = state.grafana, state.grafana_admin_password_file
        if grafana:
            print(f"  grafana    {grafana}  (dashboards open to view; admin's password in {password})")
        else:
            print("  grafana    not running (no image here; see make up's output)")
    return 0 if healthy else 1


def _print_tier_status(url: str, status: TierStatusSpec) -> None:
    limits, device, throttling, model = status.limits, status.device, status.cpu_throttling, status.device_model
    quota, memory = limits.cpu_quota_cores, limits.memory_limit_bytes
    ready = "ready" if status.ready else f"NOT READY ({status.load_error or 'loading'})"
    print(
        f"  {status.tier:<6} {url}  {ready}  cgroup {limits.cgroup}: cpu quota "
        f"{f'{quota:g} cores' if quota else 'none'} (uses {limits.cpu_cores:g}), memory "
        f"{f'{memory / (1 << 30):.2f} GiB' if memory else 'unlimited'}, onnxruntime threads "
        f"{status.onnxruntime.intra_op_threads}, {status.loaded_summary()}"
    )
    throttled = (
        f"CFS throttled in {throttling.throttled_periods} of {throttling.periods} periods "
        f"({throttling.throttled_s:.2f} s)" if throttling else "no CFS statistics"
    )  # fmt: skip
    what = f"device {model.name} (measured)" if model else f"device speed {device.speed:g} of a host core"
    print(
        f"         {what}, {device.cores} core(s), {status.compute_slots} compute slot(s), "
        f"CFS period {device.cfs_period_us / 1000:g} ms; {throttled}"
    )
    for link in status.links:
        rate = f"{link.rate_mbit:g} Mbit/s" if link.rate_mbit else "unlimited"
        print(
            f"         link {link.link:<12} -> {link.peer:<6} {link.backend:<14} "
            f"delay {link.delay_ms:g}±{link.jitter_ms:g} ms, {rate}, loss {link.loss_pct:g} % {link.note}"
        )


def cmd_logs(args: argparse.Namespace) -> int:
    root = project_root()
    state = read_state(root) or StackStateSpec(runtime="docker", urls={})
    print(recorded_runtime(state, state_path(root)).logs(args.tail))
    return 0


def cmd_fidelity(args: argparse.Namespace) -> int:
    state = read_state(project_root())
    if state is None:
        print("no stack is up (make up)")
        return 1
    problems = print_speed_fidelity(state.urls, runs=args.runs)
    print()
    print(f"{'link':<13}{'backend':<15}{'RTT configured':>15}{'measured p50':>14}{'path':>10}{'rate configured':>17}"
          f"{'goodput expected':>18}{'measured':>10}")  # fmt: skip
    for m in probe_links(state.urls, pings=args.pings, repeats=args.probes):
        rate = m.configured.rate_mbit
        expected = m.expected_goodput_mbit
        print(
            f"{m.link:<13}{m.backend:<15}{m.expected_rtt_ms:>12.2f} ms{m.rtt_ms_p50:>11.2f} ms"
            f"{(f'{m.path_rtt_ms_p50:.2f} ms' if m.path_rtt_ms_p50 is not None else '-'):>10}"
            f"{(f'{rate:g} Mbit/s' if rate else 'unlimited'):>17}"
            f"{(f'{expected:.1f}' if expected else '-'):>18}{(m.goodput_mbit or 0):>10.1f}"
        )
        problems += m.problems()
    for problem in problems:
        print(f"  outside tolerance: {problem}")
    return 0 if not problems else 1


def print_speed_fidelity(urls: dict[TierName, str], *, runs: int) -> list[str]:
    """Each tier's calibration model against the host's ÷ its speed, as a table (the pacing check), then
    each measured device's leave-one-network-out error against its published times; the pacing problems."""
    print(f"{'tier':<8}{'speed':>7}{'threads':>8}{'host p50':>11}{'expected':>11}{'measured p50':>14}"
          f"{'achieved speed':>16}{'p95/p50':>9}")  # fmt: skip
    problems: list[str] = []
    measured = measure_speeds(urls, runs=runs)
    for m in measured:
        print(
            f"{m.tier:<8}{m.configured_speed:>7.3g}{m.threads:>8}{m.host_ms_p50:>8.2f} ms{m.expected_ms:>8.2f} ms"
            f"{m.tier_ms_p50:>11.2f} ms{m.achieved_speed:>16.2f}{m.p95_over_p50:>9.2f}"
        )
        problems += m.problems()
    for m in measured:
        if gap := m.gap():
            print(f"  emulation gap: {gap}")
    print_device_fits(urls)
    return problems


def print_device_fits(urls: dict[TierName, str]) -> None:
    """The measured devices the tiers run as: how well each predicts its own published times when a network
    is left out of its fit (``make fidelity-devices`` shows every prediction)."""
    rows = []
    for tier, url in urls.items():
        code, status = json_call(f"{url}/tierlab/status")
        model = read_tier_status(status).device_model if code == 200 else None
        if model is not None:
            rows.append((tier, model))
    if not rows:
        return
    print("measured devices (speed above: this calibration model's factor), leave-one-network-out against their "
          "published times:")  # fmt: skip
    for tier, model in rows:
        fit = model.fit
        verdict = "within tolerance" if fit.within_tolerance else "OUTSIDE tolerance"
        print(
            f"  {tier:<6} {model.name:<18} median |error| {fit.median_abs_err:.1%}, worst {fit.worst_abs_err:.1%} "
            f"over {fit.networks} networks ({verdict}: ≤ {fit.tolerance_median:.0%}, ≤ {fit.tolerance_worst:.0%}); "
            f"{model.source.table}, {model.source.arithmetic}"
        )


def cmd_loadgen(args: argparse.Namespace) -> int:
    root = project_root()
    state = read_state(root)
    if state is None:
        print("the in-stack loadgen needs the Docker stack up (make up)")
        return 1
    return recorded_runtime(state, state_path(root)).run_loadgen(args.spec)


def cmd_images(args: argparse.Namespace) -> int:
    from services.stack.docker import require_engine
    from services.stack.images import ensure_images, foreign_tier_image, host_arch

    require_engine()
    started = time.monotonic()
    if args.arch and args.arch != host_arch():
        foreign = foreign_tier_image(args.arch)
        print(f"  tier ({args.arch}) {foreign}   ({time.monotonic() - started:.0f} s)")
        as_deployed = ensure_images(with_grafana=False).tier  # the tag the stack file names on every node
        print(f"  to a node: docker save {foreign} | ssh <node> 'docker load && docker tag {foreign} {as_deployed}'")
        return 0
    images = ensure_images(with_grafana=not args.no_grafana)
    for role, tag in (("tier", images.tier), ("prometheus", images.prometheus), ("grafana", images.grafana)):
        print(f"  {role:<10} {tag or 'unavailable (no registry)'}")
    print(f"  base       {images.base}   ({time.monotonic() - started:.0f} s)")
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    """Everything tierlab created in Docker: the stack, its volumes and networks, its images."""
    root = project_root()
    _down(root, read_state(root))
    if compose_available():
        tags = [t for t in output(["docker", "images", "--format", "{{.Repository}}:{{.Tag}}"]).splitlines()
                if t.startswith("tierlab/") and (args.all or not t.startswith("tierlab/base:"))]  # fmt: skip
        if tags:
            run(["docker", "rmi", "--force", *tags], quiet=True, check=False)
            say(f"removed images: {', '.join(tags)}")
    shutil.rmtree(root / ".local" / "stack", ignore_errors=True)
    return 0


def cmd_nodes(args: argparse.Namespace) -> int:
    """A multi-node swarm of Docker-in-Docker nodes on this machine (services/stack/nodes.py)."""
    from services.stack import nodes

    if args.action == "down":
        removed = nodes.nodes_down()
        say(f"removed swarm nodes: {', '.join(removed) or 'none were running'}")
        return 0
    started = nodes.nodes_up(args.count, project_root(), join=args.join)
    for node in started:
        print(f"  {node.name:<16} {node.address:<15} engine {node.engine}")
    if args.join:
        print(f"swarm formed; deploy across it with:\n  DOCKER_HOST={started[0].engine} make up RUNTIME=swarm")
    else:
        print("no swarm yet: form it as on real machines (README, 'Join real machines'), with `docker -H <engine>`")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from services.stack.dashboard import write

    print(f"wrote {write(project_root())}")
    return 0


def cmd_profiles(args: argparse.Namespace) -> int:
    root = project_root()
    print("resource profiles:", ", ".join(available("resources", root)))
    print("network profiles: ", ", ".join(available("network", root)))
    return 0


def add_commands(commands: Any) -> None:
    stack = commands.add_parser("stack", help="the Docker stack (or local tier processes): up, down, status …")
    verbs = stack.add_subparsers(dest="verb", required=True)

    up = verbs.add_parser("up", help="bring the stack up (builds images on first use)")
    up.add_argument("--runtime", choices=tuple(RUNTIMES), default="docker")
    up.add_argument("--profile", default="laptop", help="resource profile: compose/resources-<name>.yml")
    up.add_argument("--network", default="lan", help="network profile: compose/network-<name>.yml")
    up.add_argument("--models-dir", default="models")
    up.add_argument("--subjects", default=",".join(DEFAULT_SUBJECTS), help="comma list, or 'all'")
    up.add_argument("--no-grafana", action="store_true")
    up.add_argument(
        "--startup-models",
        default="none",
        help="variants each tier loads at start: none (the loadgen loads what each run needs), all, or names",
    )
    up.add_argument("--timeout-s", type=float, default=300.0)
    up.set_defaults(handler=cmd_up)

    for name, handler, text in (
        ("down", cmd_down, "stop the stack; no container, network or volume is left"),
        ("status", cmd_status, "tiers, limits seen from inside, link backends, URLs"),
        ("dashboard", cmd_dashboard, "regenerate the Grafana dashboard JSON"),
        ("profiles", cmd_profiles, "list resource and network profiles"),
    ):
        verbs.add_parser(name, help=text).set_defaults(handler=handler)
    fidelity = verbs.add_parser(
        "fidelity", help="measure every tier's speed and every link's RTT and rate against the profiles"
    )
    fidelity.add_argument("--pings", type=int, default=60)
    fidelity.add_argument("--probes", type=int, default=3, help="probes per link; the medians are judged")
    fidelity.add_argument("--runs", type=int, default=60, help="calibration runs per tier")
    fidelity.set_defaults(handler=cmd_fidelity)
    logs = verbs.add_parser("logs", help="the last log lines of every service")
    logs.add_argument("--tail", type=int, default=100)
    logs.set_defaults(handler=cmd_logs)
    loadgen = verbs.add_parser("loadgen", help="run an experiment from a loadgen container inside the stack")
    loadgen.add_argument("--spec", default="quick")
    loadgen.set_defaults(handler=cmd_loadgen)
    nodes = verbs.add_parser("nodes", help="a multi-node swarm of Docker-in-Docker nodes on this machine")
    nodes.add_argument("action", choices=("up", "down"))
    nodes.add_argument("--count", type=int, default=3)
    nodes.add_argument(
        "--join",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="form the swarm and label the nodes (--no-join: engines and images only, to do it by hand)",
    )
    nodes.set_defaults(handler=cmd_nodes)
    images = verbs.add_parser("images", help="build (or pull) the images")
    images.add_argument("--no-grafana", action="store_true")
    images.add_argument("--arch", help="build the tier image for another architecture (e.g. arm64), emulated")
    images.set_defaults(handler=cmd_images)
    clean = verbs.add_parser("clean", help="remove the stack and tierlab's images (--all: the base too)")
    clean.add_argument("--all", action="store_true")
    clean.set_defaults(handler=cmd_clean)


def main(args: argparse.Namespace) -> int:
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        print(f"tierlab stack: {exc.message}", file=sys.stderr)
        return exc.exit_code
