"""The tier's HTTP API fuzzed on a real tier process: schemathesis generates valid and invalid requests for
every operation of the tier's own OpenAPI document, and hypothesis generates inference requests (the fast
path the OpenAPI document does not describe). No request gets a 500; a 5xx is only what names another
party's failure or the tier's own state — 502/504 (a peer, named), 503 (busy or not ready, Retry-After),
507 (does not fit) — always with a JSON ``error``. The counts are the ``FUZZ_*`` constants; the control
routes run without a token here so their bodies are fuzzed (with one, they answer 401 before reading)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.core.result import Ok

from services.contracts.specs import TIERS, TierName
from services.demo import DEMO_DIMS, local_deployment, write_deployment
from services.local import LocalStack, free_ports
from tests.conftest import DEMO_MODELS

DEMO_INPUT_WIDTH = DEMO_DIMS[0]
FUZZ_EXAMPLES_PER_OPERATION = 25  # for each generation mode (valid, invalid)
FUZZ_INFER_REQUESTS = 300
ALLOWED_5XX = {502, 503, 504, 507}


def _fuzz(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))  # fmt: skip


@pytest.fixture(scope="module")
def edge_url(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("api-fuzz")
    ports: dict[TierName, int] = dict(zip(TIERS, free_ports(3), strict=True))
    deployment = local_deployment(
        [f"demo-mlp/{name}/manifest.json" for name in DEMO_MODELS], models_dir=str(demo_root), ports=ports
    )
    with LocalStack(write_deployment(deployment, folder / "d.yaml"), tiers=["edge"], log_dir=folder,
                    env={"TIERLAB_STARTUP_MODELS": "all"}) as stack:  # fmt: skip
        yield stack.url("edge")


def _check(status: int, body: bytes, what: str) -> None:
    assert status != 500, f"{what}: 500 {body[:300]!r}"
    if status >= 500:
        assert status in ALLOWED_5XX and "error" in json.loads(body), f"{what}: {status} {body[:300]!r}"


def test_every_openapi_operation_answers_without_a_server_error(edge_url: str) -> None:
    schema = schemathesis.openapi.from_url(f"{edge_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations() if isinstance(result, Ok)]
    assert len(operations) >= 15, [f"{o.method} {o.path}" for o in operations]
    statuses: Counter[int] = Counter()
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @_fuzz(FUZZ_EXAMPLES_PER_OPERATION)
            @given(case=operation.as_strategy(generation_mode=mode))
            def call(case: Any) -> None:
                response = case.call(base_url=edge_url, timeout=60)
                statuses[response.status_code] += 1
                _check(response.status_code, response.content, f"{case.method} {case.formatted_path}")

            try:
                call()
            except Unsatisfiable:  # an operation without parameters or body has no invalid request
                assert mode is GenerationMode.NEGATIVE, operation.path
    print(f"schemathesis: {sum(statuses.values())} requests over {len(operations)} operations: {dict(statuses)}")
    assert sum(statuses.values()) >= len(operations) * 2


_values = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6)
_tensor = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["x", "y", ""]),
        "datatype": st.sampled_from(["FP32", "FP16", "INT64", "BYTES", "BOOL", "fp32", ""]),
        "shape": st.lists(st.integers(min_value=-2, max_value=70), max_size=3),
    },
    optional={"data": st.lists(_values | st.lists(_values, max_size=3), max_size=130)},
)
_parameters = st.dictionaries(
    st.sampled_from(["placement", "exit_threshold", "timeout_ms", "request_id", "stage", "tierlab_hop"]),
    _values | st.sampled_from(["E", "M-E", "E-C", "M-E-C", "X"]),
    max_size=3,
)
_well_formed = st.integers(min_value=1, max_value=3).flatmap(
    lambda rows: st.fixed_dictionaries(
        {
            "name": st.just("x"),
            "datatype": st.just("FP32"),
            "shape": st.just([rows, DEMO_INPUT_WIDTH]),
            "data": st.lists(
                st.floats(-1e3, 1e3, width=32), min_size=rows * DEMO_INPUT_WIDTH, max_size=rows * DEMO_INPUT_WIDTH
            ),
        }
    )
)
_infer = st.fixed_dictionaries(
    {"inputs": st.lists(_tensor | _well_formed, max_size=2)},
    optional={"parameters": _parameters, "outputs": _values},
)


def test_fuzzed_inference_requests_are_answered_or_refused(edge_url: str) -> None:
    statuses: Counter[int] = Counter()

    @_fuzz(FUZZ_INFER_REQUESTS)
    @given(model=st.sampled_from([f"demo-mlp.{name}" for name in DEMO_MODELS] + ["nope"]), document=_infer)
    def call(model: str, document: dict[str, Any]) -> None:
        request = urllib.request.Request(
            f"{edge_url}/v2/models/{model}/infer", data=json.dumps(document).encode(), method="POST",
            headers={"content-type": "application/json"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=60) as reply:
                status, body = reply.status, reply.read()
        except urllib.error.HTTPError as error:
            status, body = error.code, error.read()
        statuses[status] += 1
        _check(status, body, f"{model} {document}")

    call()
    print(f"inference fuzz: {sum(statuses.values())} requests: {dict(statuses)}")
    assert statuses[200] > 0 and statuses[400] > 0  # both sides of the parser were reached
