"""Images that build anywhere: with a registry (python:3.11-slim, prom/prometheus, grafana/grafana) or without.

Without a registry the base is made here, once: ``debootstrap --variant=minbase bookworm`` + ``docker
import`` (about 70 s, cached as ``tierlab/base:bookworm``). Python wheels are built on the host into a
wheelhouse pinned to the project's tested versions, and images are built with ``--network none``.
Prometheus comes from Debian's package when ``prom/prometheus`` cannot be pulled; Grafana has no such
fallback, so the stack runs without it and says so. Tags carry a hash of what shaped them, so a warm
``make up`` rebuilds nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from services.contracts.errors import ConfigError
from services.stack.docker import image_exists, output, project_root, run, say, try_pull

REGISTRY_BASE = "python:3.11-slim"
OFFLINE_BASE = "tierlab/base:bookworm"
DEBIAN_MIRROR = os.environ.get("TIERLAB_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# what the tier image needs from Debian: python, and tc/ip plus setcap so a non-root tier may shape links
BASE_PACKAGES = ("python3", "python3-venv", "iproute2", "libcap2-bin", "ca-certificates")
PROMETHEUS_IMAGE = "prom/prometheus:v2.53.0"
GRAFANA_IMAGE = "grafana/grafana:11.2.0"
IMAGE_SOURCES = ("services", "loadgen", "compose")


@dataclass(frozen=True, slots=True)
class ImageSet:
    tier: str
    prometheus: str
    grafana: str | None
    base: str

    def environment(self) -> dict[str, str]:
        """The variables docker-compose.yml reads its image names from."""
        env = {"TIERLAB_TIER_IMAGE": self.tier, "TIERLAB_PROMETHEUS_IMAGE": self.prometheus}
        if self.grafana:
            env["TIERLAB_GRAFANA_IMAGE"] = self.grafana
        return env


def debootstrap_argv(target: Path, mirror: str = DEBIAN_MIRROR) -> list[str]:
    return [
        "debootstrap",
        "--variant=minbase",
        f"--include={','.join(BASE_PACKAGES)}",
        "bookworm",
        str(target),
        mirror,
    ]


def image_requirements(pyproject: Path) -> list[str]:
    """The image installs the project's base dependencies (serving and load); operators stay on the host."""
    return list(tomllib.loads(pyproject.read_text())["project"]["dependencies"])


def pinned_constraints(python: str) -> list[str]:
    """The host venv's exact versions, so the image runs what the tests ran."""
    frozen = output([python, "-m", "pip", "freeze", "--exclude-editable"]).splitlines()
    return [line for line in frozen if "==" in line and not line.startswith("-")]


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:12]


def source_digest(root: Path) -> str:
    files = sorted(
        p for top in IMAGE_SOURCES for p in (root / top).rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )
    return _digest(*(p.relative_to(root).as_posix().encode() + p.read_bytes() for p in files))


def ensure_base(*, offline_only: bool = False) -> str:
    """``python:3.11-slim`` if a registry gives it, else the debootstrapped base (built once)."""
    if not offline_only and try_pull(REGISTRY_BASE, timeout_s=180):
        return REGISTRY_BASE
    if image_exists(OFFLINE_BASE):
        return OFFLINE_BASE
    if shutil.which("debootstrap") is None:
        raise ConfigError(
            f"no registry answers for {REGISTRY_BASE} and debootstrap is missing: sudo apt-get install -y debootstrap"
        )
    say(f"no registry: building the offline base {OFFLINE_BASE} with debootstrap (once, about 2 minutes)")
    with tempfile.TemporaryDirectory(prefix="tierlab-rootfs-") as folder:
        rootfs = Path(folder) / "rootfs"
        run(debootstrap_argv(rootfs), quiet=True, timeout_s=1800)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(
            ["docker", "import", "-", OFFLINE_BASE], stdin=tar.stdout, capture_output=True, check=False
        )
        tar.wait()
        if imported.returncode != 0 or tar.returncode != 0:
            raise ConfigError(f"docker import of the base failed: {imported.stderr.decode().strip()}")
    return OFFLINE_BASE


def ensure_wheelhouse(root: Path, python: str) -> Path:
    """Wheels for the image's requirements, pinned to the venv, built on the host (cached by content)."""
    house = root / ".local" / "wheelhouse"
    requirements = "\n".join(image_requirements(root / "pyproject.toml")) + "\n"
    constraints = "\n".join(pinned_constraints(python)) + "\n"
    stamp = house / f".built-{_digest(requirements.encode(), constraints.encode())}"
    if stamp.exists():
        return house
    say("collecting wheels for the images into .local/wheelhouse")
    if house.exists():
        shutil.rmtree(house)
    house.mkdir(parents=True)
    (house / "requirements.txt").write_text(requirements)
    (house / "constraints.txt").write_text(constraints)
    run(
        [python, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(house), "--prefer-binary",
         "-r", str(house / "requirements.txt"), "-c", str(house / "constraints.txt")],
        timeout_s=1800,
    )  # fmt: skip
    stamp.touch()
    return house


def build_tier_image(root: Path, base: str, python: str) -> str:
    house = ensure_wheelhouse(root, python)
    digest = _digest(
        (root / "Dockerfile").read_bytes(),
        (house / "requirements.txt").read_bytes(),
        (house / "constraints.txt").read_bytes(),
        source_digest(root).encode(),
        base.encode(),
    )
    tag = f"tierlab/tier:{digest}"
    if image_exists(tag):
        return tag
    # wheels always come from the wheelhouse; only python:3.11-slim needs the network, for apt's iproute2
    offline = base != REGISTRY_BASE
    say(f"building {tag} from {base}" + (" (no network)" if offline else ""))
    run(
        ["docker", "build", *(["--network", "none"] if offline else []), "--build-arg", f"BASE={base}", "-t", tag,
         "-t", "tierlab/tier:latest", "-f", str(root / "Dockerfile"), str(root)],
        timeout_s=1800,
    )  # fmt: skip
    return tag


def build_prometheus_image(root: Path, base: str) -> str:
    """``prom/prometheus`` if it can be pulled, else an image from Debian's ``prometheus`` package."""
    if try_pull(PROMETHEUS_IMAGE):
        return PROMETHEUS_IMAGE
    dockerfile = root / "dashboards" / "prometheus.Dockerfile"
    tag = f"tierlab/prometheus:{_digest(dockerfile.read_bytes(), base.encode())}"
    if image_exists(tag):
        return tag
    say(f"no registry for {PROMETHEUS_IMAGE}: building {tag} from Debian's prometheus package")
    context = root / ".local" / "images" / "prometheus"
    if context.exists():
        shutil.rmtree(context)
    context.mkdir(parents=True)
    done = run(["apt-get", "download", "prometheus"], check=False, quiet=True, timeout_s=600, cwd=context)
    if done.returncode != 0:
        raise ConfigError(
            "cannot pull prom/prometheus and `apt-get download prometheus` failed: "
            + (done.stderr or b"").decode(errors="replace").strip()
        )
    shutil.copy(dockerfile, context / "Dockerfile")
    run(["docker", "build", "--network", "none", "--build-arg", f"BASE={base}", "-t", tag, str(context)],
        timeout_s=900)  # fmt: skip
    return tag


def ensure_images(*, with_grafana: bool = True, python: str = sys.executable) -> ImageSet:
    root = project_root()
    base = ensure_base(offline_only=os.environ.get("TIERLAB_OFFLINE") == "1")
    tier = build_tier_image(root, base, python)
    prometheus = build_prometheus_image(root, base)
    grafana: str | None = None
    if with_grafana:
        if try_pull(GRAFANA_IMAGE):
            grafana = GRAFANA_IMAGE
        else:
            say(
                f"Grafana: {GRAFANA_IMAGE} cannot be pulled here (no registry) and has no offline build; "
                "the stack runs without it. Dashboards stay in dashboards/ for any Grafana you point at Prometheus."
            )
    return ImageSet(tier, prometheus, grafana, base)
