"""The stack's state file is a typed document: what the runtimes write, everything reads back; a state file
written by an older tierlab (a plain dict, no version) still reads; a torn one reads as no stack; and a
misspelt field is caught by the type checker before anything runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from services.contracts.stack_state import (
    STACK_STATE_VERSION,
    LocalTierSpec,
    StackImagesSpec,
    StackStateSpec,
    read_stack_state,
    write_stack_state,
)

ROOT = Path(__file__).resolve().parents[2]

# what `make up` wrote before the state had a type (a Docker stack, 2026-12-07)
OLDER_DOCKER_STATE = {
    "runtime": "docker", "profile": "laptop", "network": "lan", "models_dir": "models",
    "subjects": ["fmnist-resnet"],
    "urls": {"mobile": "http://127.0.0.1:8001", "edge": "http://127.0.0.1:8002", "cloud": "http://127.0.0.1:8003"},
    "prometheus": "http://127.0.0.1:9090", "grafana": None, "grafana_admin_password_file": None,
    "images": {"tier": "tierlab/tier:e6ab", "prometheus": "tierlab/prometheus:1", "grafana": None, "base": "b"},
    "up_s": 41.3, "control_token_file": "/x/.local/stack/control-token",
}  # fmt: skip


def test_what_a_runtime_writes_reads_back_whole(tmp_path: Path) -> None:
    state = StackStateSpec(
        runtime="local",
        urls={"edge": "http://127.0.0.1:8002"},
        tiers={"edge": LocalTierSpec(pid=42, url="http://127.0.0.1:8002", log="edge.log", argv=["python"])},
        images=StackImagesSpec(tier="t"),
        env={"TIERLAB_STARTUP_MODELS": "none"},
    )
    write_stack_state(tmp_path / "stack.json", state)
    assert read_stack_state(tmp_path / "stack.json") == state
    assert not (tmp_path / "stack.partial").exists()


def test_an_older_state_file_still_reads(tmp_path: Path) -> None:
    (tmp_path / "stack.json").write_text(json.dumps({**OLDER_DOCKER_STATE, "a_field_from_elsewhere": 1}))
    state = read_stack_state(tmp_path / "stack.json")
    assert state is not None and state.version == STACK_STATE_VERSION
    assert state.urls["edge"] == "http://127.0.0.1:8002" and state.images is not None
    assert state.images.tier == "tierlab/tier:e6ab" and state.profile == "laptop" and state.tiers == {}


def test_a_torn_or_foreign_file_is_no_stack(tmp_path: Path) -> None:
    (tmp_path / "torn.json").write_text(json.dumps(OLDER_DOCKER_STATE)[:100])
    (tmp_path / "foreign.json").write_text(json.dumps({"urls": "not a map"}))
    assert read_stack_state(tmp_path / "torn.json") is None
    assert read_stack_state(tmp_path / "foreign.json") is None
    assert read_stack_state(tmp_path / "missing.json") is None


def test_a_misspelt_field_is_a_type_error(tmp_path: Path) -> None:
    """A reader that names a field the document does not have (``url`` for ``urls``) fails ``make check``."""
    reader = tmp_path / "reader.py"
    reader.write_text(
        "from services.contracts.stack_state import StackStateSpec\n\n\n"
        "def entry(state: StackStateSpec) -> str:\n"
        '    return state.url["mobile"]\n'
    )
    checked = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--follow-imports=silent", str(reader)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert checked.returncode != 0
    assert '"StackStateSpec" has no attribute "url"' in checked.stdout, checked.stdout
