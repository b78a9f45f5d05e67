"""Fuzzing the parsers every request and file goes through: whatever bytes arrive, the codec, the pipeline
parameters and the manifest and deployment loaders answer with tierlab's own errors (4xx for requests,
ConfigError for files) or a result — never another exception (which a tier would turn into a 500). Hypothesis,
derandomized; the example counts are the ``FUZZ_*`` constants."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.contracts import codec
from services.contracts.dtypes import NUMPY_DTYPES
from services.contracts.errors import BadRequest, ConfigError
from services.contracts.manifest import load_manifest
from services.contracts.pipeline import PipelineRequest
from services.contracts.specs import load_deployment

FUZZ_BYTES = 3000
FUZZ_DOCUMENTS = 3000
FUZZ_MANIFESTS = 500

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
_datatypes = st.sampled_from([*NUMPY_DTYPES, "BYTES", "FP8", "", "fp32"])
_shapes = st.lists(st.integers(min_value=-3, max_value=1 << 40), max_size=4)
_tensor = st.fixed_dictionaries(
    {"name": st.text(max_size=4), "datatype": _datatypes, "shape": _shapes},
    optional={"data": _json, "parameters": st.dictionaries(st.sampled_from(["binary_data_size", "x"]), _json)},
)
_request = st.fixed_dictionaries(
    {"inputs": st.lists(_tensor, max_size=3)},
    optional={"id": _json, "parameters": st.dictionaries(st.text(max_size=12), _json), "outputs": _json},
)


def _fuzz(examples: int) -> settings:
    """Fixed examples (derandomized: CI sees what a developer saw), no example database, no time limit."""
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip


@_fuzz(FUZZ_BYTES)
@given(body=st.binary(max_size=512), header_length=st.none() | st.integers(min_value=-5, max_value=600))
def test_any_bytes_are_a_request_or_a_client_error(body: bytes, header_length: int | None) -> None:
    for decode in (codec.decode_request, codec.decode_response):
        with contextlib.suppress(BadRequest):
            decode(body, header_length)


@_fuzz(FUZZ_DOCUMENTS)
@given(document=_request, tail=st.binary(max_size=64), binary=st.booleans())
def test_any_v2_shaped_document_is_a_request_or_a_client_error(
    document: dict[str, Any], tail: bytes, binary: bool
) -> None:
    header = json.dumps(document).encode()
    body, header_length = (header + tail, len(header)) if binary else (header, None)
    try:
        request = codec.decode_request(body, header_length)
    except BadRequest:
        return
    with contextlib.suppress(BadRequest):
        PipelineRequest.from_parameters(request.parameters)


@pytest.mark.parametrize("load", [load_manifest, load_deployment], ids=["manifest", "deployment"])
@_fuzz(FUZZ_MANIFESTS)
@given(content=st.binary(max_size=256) | _json.map(lambda d: json.dumps(d).encode()))
def test_any_file_is_a_manifest_or_deployment_or_a_config_error(
    load: Callable[[Path], object], content: bytes, tmp_path_factory: Any
) -> None:
    path = Path(tmp_path_factory.mktemp("f")) / "file.json"
    path.write_bytes(content)
    with contextlib.suppress(ConfigError):
        load(path)
