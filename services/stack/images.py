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
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from services.contracts.errors import ConfigError
from services.contracts.stack_state import StackImagesSpec
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

    def spec(self) -> StackImagesSpec:
        """As the stack's state records them."""
        return StackImagesSpec(tier=self.tier, prometheus=self.prometheus, grafana=self.grafana, base=self.base)

    def environment(self) -> dict[str, str]:
        """The variables docker-compose.yml reads its image names from."""
        env = {"TIERLAB_TIER_IMAGE": self.tier, "TIERLAB_PROMETHEUS_IMAGE": self.prometheus}
        if self.grafana:
            env["TIERLAB_GRAFANA_IMAGE"] = self.grafana
        return env


def host_arch() -> str:
    """This machine's architecture in Debian's and Docker's words (amd64, arm64)."""
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv8l": "arm64"}.get(machine, machine)


def debootstrap_argv(
    target: Path, mirror: str = DEBIAN_MIRROR, *, arch: str | None = None, packages: tuple[str, ...] = BASE_PACKAGES
) -> list[str]:
    foreign = [f"--arch={arch}"] if arch and arch != host_arch() else []
    return [
        "debootstrap",
        "--variant=minbase",
        *foreign,
        f"--include={','.join(packages)}",
        "bookworm",
        str(target),
        mirror,
    ]


QEMU_BINFMT = {"arm64": "qemu-aarch64", "amd64": "qemu-x86_64"}
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")


def require_emulation(arch: str, binfmt_dir: Path = BINFMT_DIR) -> None:
    """A foreign architecture's binaries must run here (debootstrap's second stage, the image's RUN steps):
    qemu-user-static registered with binfmt_misc, its interpreter fixed at registration ("F")."""
    entry = binfmt_dir / QEMU_BINFMT.get(arch, f"qemu-{arch}")
    try:
        registered = entry.read_text()
    except OSError:
        registered = ""
    flags = next((line.split(":", 1)[1] for line in registered.splitlines() if line.startswith("flags:")), "")
    if not registered.startswith("enabled") or "F" not in flags:
        raise ConfigError(
            f"building {arch} images here needs {arch} emulation: sudo apt-get install -y qemu-user-static "
            "binfmt-support; sudo mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc (if not mounted); "
            f"sudo update-binfmts --enable {entry.name}"
        )


def offline_base_tag(arch: str) -> str:
    return OFFLINE_BASE if arch == host_arch() else f"{OFFLINE_BASE}-{arch}"


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


def ensure_base(*, offline_only: bool = False, arch: str | None = None) -> str:
    """``python:3.11-slim`` if a registry gives it, else the debootstrapped base (built once). Another
    architecture's base is always made here (under qemu emulation)."""
    arch = arch or host_arch()
    foreign = arch != host_arch()
    if not offline_only and not foreign and try_pull(REGISTRY_BASE, timeout_s=180):
        return REGISTRY_BASE
    tag = offline_base_tag(arch)
    if image_exists(tag):
        return tag
    slower = ", far longer emulated" if foreign else ""
    say(f"building the offline base {tag} with debootstrap (once, about 2 minutes{slower})")
    return debootstrap_image(tag, arch, BASE_PACKAGES)


def debootstrap_image(tag: str, arch: str, packages: tuple[str, ...], changes: tuple[str, ...] = ()) -> str:
    """A Debian bookworm image with ``packages``, made by debootstrap and ``docker import`` (no registry)."""
    if shutil.which("debootstrap") is None:
        raise ConfigError(f"building {tag} needs debootstrap: sudo apt-get install -y debootstrap")
    if arch != host_arch():
        require_emulation(arch)
    with tempfile.TemporaryDirectory(prefix="tierlab-rootfs-") as folder:
        rootfs = Path(folder) / "rootfs"
        run(debootstrap_argv(rootfs, arch=arch, packages=packages), quiet=True, timeout_s=3600)
        argv = ["docker", "import", "--platform", f"linux/{arch}"]
        for change in changes:
            argv += ["--change", change]
        with subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE) as tar:
            imported = subprocess.run([*argv, "-", tag], stdin=tar.stdout, capture_output=True, check=False)
        if imported.returncode != 0 or tar.returncode != 0:
            raise ConfigError(f"docker import of {tag} failed: {imported.stderr.decode().strip()}")
    if arch != host_arch():
        replatform(tag, arch)
    return tag


def wheelhouse_dir(root: Path, arch: str) -> Path:
    return root / ".local" / ("wheelhouse" if arch == host_arch() else f"wheelhouse-{arch}")


# the manylinux tags another architecture's wheels carry (pip download --platform, one per tag)
MANYLINUX_TAGS = {
    "arm64": ("manylinux2014_aarch64", "manylinux_2_17_aarch64", "manylinux_2_28_aarch64"),
    "amd64": ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64"),
}


def ensure_wheelhouse(root: Path, python: str, arch: str | None = None) -> Path:
    """Wheels for the image's requirements, pinned to the venv (cached by content): built on the host for
    its own architecture, downloaded as binary wheels (``pip download --platform``) for another."""
    arch = arch or host_arch()
    house = wheelhouse_dir(root, arch)
    requirements = "\n".join(image_requirements(root / "pyproject.toml")) + "\n"
    constraints = "\n".join(pinned_constraints(python)) + "\n"
    stamp = house / f".built-{_digest(requirements.encode(), constraints.encode())}"
    if stamp.exists():
        return house
    say(f"collecting {arch} wheels for the images into {house.relative_to(root)}")
    if house.exists():
        shutil.rmtree(house)
    house.mkdir(parents=True)
    (house / "requirements.txt").write_text(requirements)
    (house / "constraints.txt").write_text(constraints)
    files = ["-r", str(house / "requirements.txt"), "-c", str(house / "constraints.txt")]
    if arch == host_arch():
        argv = [python, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(house), "--prefer-binary", *files]
    else:
        if arch not in MANYLINUX_TAGS:
            raise ConfigError(f"no wheel platform known for {arch}; known: {', '.join(MANYLINUX_TAGS)}")
        platforms = [a for tag in MANYLINUX_TAGS[arch] for a in ("--platform", tag)]
        argv = [python, "-m", "pip", "download", "--quiet", "--dest", str(house), "--only-binary=:all:",
                *platforms, "--python-version", "3.11", "--implementation", "cp", *files]  # fmt: skip
    run(argv, timeout_s=1800)
    stamp.touch()
    return house


def build_tier_image(root: Path, base: str, python: str, arch: str | None = None) -> str:
    """The tier image from ``base`` and the wheelhouse; another architecture's is tagged ``…-<arch>`` and
    built under emulation (its RUN steps are few: a venv from local wheels, one setcap)."""
    arch = arch or host_arch()
    foreign = arch != host_arch()
    house = ensure_wheelhouse(root, python, arch)
    digest = _digest(
        (root / "Dockerfile").read_bytes(),
        (house / "requirements.txt").read_bytes(),
        (house / "constraints.txt").read_bytes(),
        source_digest(root).encode(),
        base.encode(),
    )
    tag = f"tierlab/tier:{digest}" + (f"-{arch}" if foreign else "")
    if image_exists(tag):
        if foreign:
            replatform(tag, arch)  # (an image built before tierlab labelled them)
        return tag
    # wheels always come from the wheelhouse; only python:3.11-slim needs the network, for apt's iproute2
    offline = base != REGISTRY_BASE
    say(
        f"building {tag} from {base}" + (" (no network)" if offline else "") + (f", {arch} emulated" if foreign else "")
    )
    latest = [] if foreign else ["-t", "tierlab/tier:latest"]
    run(
        # no --platform: Docker's legacy builder (what docker.io has without buildx) tags its intermediate
        # images with the host's platform and then refuses them ("does not match the specified platform");
        # the base's own architecture carries through, its RUN steps run under binfmt's qemu
        ["docker", "build", *(["--network", "none"] if offline else []),
         "--build-arg", f"BASE={base}", "--build-arg", f"WHEELHOUSE={house.relative_to(root)}", "-t", tag, *latest,
         "-f", str(root / "Dockerfile"), str(root)],
        timeout_s=3600,
    )  # fmt: skip
    if foreign:
        replatform(tag, arch)
    return tag


# Docker's words for an architecture's variant (``docker image inspect``: Architecture, Variant)
PLATFORM_VARIANTS = {"arm64": "v8"}


def image_architecture(tag: str) -> str:
    return output(["docker", "image", "inspect", "--format", "{{.Architecture}}", tag]).strip()


def platform_config(config: Mapping[str, object], arch: str) -> dict[str, object]:
    """An image config saying it is for linux/``arch`` (with its variant, if Docker names one)."""
    changed = {k: v for k, v in config.items() if k != "variant"}
    changed.update(os="linux", architecture=arch)
    if arch in PLATFORM_VARIANTS:
        changed["variant"] = PLATFORM_VARIANTS[arch]
    return changed


def replatform(tag: str, arch: str) -> None:
    """Label image ``tag`` as linux/``arch``. Docker's legacy builder records the host's architecture on an
    image built under emulation (and its ``docker import --platform`` does too), so an arm64 image would
    say amd64 and a Pi would warn on every start. ``docker save``, the config's architecture rewritten,
    ``docker load`` in the classic layout (manifest.json with the new config's digest, layers unchanged)."""
    if image_architecture(tag) == arch:
        return
    say(f"labelling {tag} as linux/{arch}")
    with tempfile.TemporaryDirectory(prefix="tierlab-replatform-") as scratch:
        saved, loaded = Path(scratch) / "saved.tar", Path(scratch) / "loaded.tar"
        run(["docker", "save", "-o", str(saved), tag], timeout_s=1800)
        with tarfile.open(saved) as source, tarfile.open(loaded, "w") as target:
            (manifest,) = json.loads(source.extractfile("manifest.json").read())  # type: ignore[union-attr]
            config = json.loads(source.extractfile(manifest["Config"]).read())  # type: ignore[union-attr]
            config_bytes = json.dumps(platform_config(config, arch), separators=(",", ":")).encode()
            config_name = f"blobs/sha256/{hashlib.sha256(config_bytes).hexdigest()}"
            for member in source.getmembers():
                if member.isfile() and member.name in manifest["Layers"]:
                    target.addfile(member, source.extractfile(member))
                elif member.isdir() and any(layer.startswith(member.name + "/") for layer in manifest["Layers"]):
                    target.addfile(member)
            _add_bytes(target, config_name, config_bytes)
            _add_bytes(target, "manifest.json", json.dumps([{**manifest, "Config": config_name}]).encode())
        run(["docker", "load", "-i", str(loaded)], quiet=True, timeout_s=1800)
    if image_architecture(tag) != arch:
        raise ConfigError(f"{tag} still says {image_architecture(tag)} after relabelling it {arch}")


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


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


def foreign_tier_image(arch: str, python: str = sys.executable) -> str:
    """The tier image for another architecture (a Raspberry Pi's arm64), made offline under emulation: its
    own debootstrapped base, the wheels of that architecture, the same Dockerfile. Prometheus and Grafana
    run on a manager and need none."""
    return build_tier_image(project_root(), ensure_base(offline_only=True, arch=arch), python, arch)


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
