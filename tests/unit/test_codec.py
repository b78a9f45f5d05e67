"""The V2 codec: round trips for every datatype, the spec's byte layout, and every malformed body."""

from __future__ import annotations

import json
import struct
import tracemalloc

import numpy as np
import pytest

from services.contracts import codec
from services.contracts.dtypes import DATATYPES, NUMPY_DTYPES, datatype_of
from services.contracts.errors import MalformedBody, TensorMismatch


def sample(datatype: str, shape: tuple[int, ...] = (2, 3)) -> np.ndarray:
    rng = np.random.default_rng(len(datatype))
    count = int(np.prod(shape))
    if datatype == "BYTES":
        return np.array([f"item-{i}-é".encode() for i in range(count)], dtype=np.object_).reshape(shape)
    if datatype == "BOOL":
        return rng.integers(0, 2, count).astype(bool).reshape(shape)
    dtype = NUMPY_DTYPES[datatype]
    if dtype.kind == "f":
        return rng.normal(size=shape).astype(dtype)
    info = np.iinfo(dtype.str)
    return rng.integers(info.min, info.max, count, dtype=dtype, endpoint=True).reshape(shape)


def assert_same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    if a.dtype == np.object_:
        assert [bytes(x) if not isinstance(x, str) else x.encode() for x in a.ravel()] == [
            bytes(x) if not isinstance(x, str) else x.encode() for x in b.ravel()
        ]
    else:
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("datatype", DATATYPES)
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_request_round_trip_every_datatype(datatype: str, binary: bool) -> None:
    tensor = sample(datatype)
    encoded = codec.encode_request(
        {"t": tensor, "scalar": np.array(2.5, dtype=np.float32)},
        binary=binary,
        parameters={"placement": "M-E", "exit_threshold": 0.5},
        request_id="r1",
    )
    decoded = codec.decode_request(encoded.body(), encoded.header_length)
    assert decoded.id == "r1"
    assert decoded.parameters["placement"] == "M-E"
    assert datatype_of(decoded.inputs["t"]) == datatype
    assert_same(tensor, decoded.inputs["t"])
    assert decoded.inputs["scalar"].shape == ()


@pytest.mark.parametrize("datatype", ["FP16", "INT8", "BOOL", "FP32", "BYTES"])
def test_response_round_trip_mixed_binary_and_json(datatype: str) -> None:
    outputs = {"a": sample(datatype, (3,)), "b": sample("INT64", (2, 2))}
    encoded = codec.encode_response("m", outputs, binary=[True, False], parameters={"hops": 1}, request_id="x")
    assert encoded.header_length is not None
    decoded = codec.decode_response(encoded.body(), encoded.header_length)
    assert decoded.model_name == "m" and decoded.id == "x" and decoded.parameters == {"hops": 1}
    for name, array in outputs.items():
        assert_same(array, decoded.outputs[name])


@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64"])
def test_non_finite_floats_round_trip_through_json(datatype: str) -> None:
    logits = np.array([np.nan, np.inf, -np.inf, 1.5], dtype=NUMPY_DTYPES[datatype])
    encoded = codec.encode_response("m", {"y": logits}, binary=[False])
    assert json.loads(encoded.body())["outputs"][0]["data"] == ["NaN", "Infinity", "-Infinity", 1.5]
    decoded = codec.decode_response(encoded.body(), encoded.header_length).outputs["y"]
    np.testing.assert_array_equal(decoded, logits)  # NaN equals NaN here
    with pytest.raises(TensorMismatch, match="numbers"):
        codec.decode_request(json.dumps({"inputs": [{"name": "x", "datatype": datatype, "shape": [1],
                                                     "data": ["nan-ish"]}]}).encode(), None)  # fmt: skip


@pytest.mark.parametrize(("datatype", "value"), [("FP16", 65520), ("FP32", 1e300), ("INT8", 300), ("UINT8", -1)])
def test_json_values_out_of_a_datatypes_range_are_the_clients_error(datatype: str, value: float) -> None:
    body = json.dumps({"inputs": [{"name": "x", "datatype": datatype, "shape": [1], "data": [value]}]}).encode()
    with pytest.raises(TensorMismatch, match="cannot be read as"):
        codec.decode_request(body, None)


def test_all_json_response_has_no_header_length() -> None:
    encoded = codec.encode_response("m", {"y": np.ones(2, np.float32)}, binary=[False])
    assert encoded.header_length is None
    assert encoded.content_type == codec.JSON_CONTENT_TYPE
    assert json.loads(encoded.body())["outputs"][0]["data"] == [1.0, 1.0]


def test_binary_layout_follows_the_spec_byte_for_byte() -> None:
    """Header JSON, then each tensor's raw little-endian bytes in listed order; BYTES length-prefixed."""
    floats = np.array([[1.0, -2.0]], dtype=np.float32)
    strings = np.array([b"ab", b""], dtype=np.object_)
    encoded = codec.encode_request({"f": floats, "s": strings}, binary_output_default=False)
    body = encoded.body()
    header = json.loads(body[: encoded.header_length])
    assert header == {
        "inputs": [
            {"name": "f", "datatype": "FP32", "shape": [1, 2], "parameters": {"binary_data_size": 8}},
            {"name": "s", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 10}},
        ]
    }
    assert body[encoded.header_length :] == struct.pack("<2f", 1.0, -2.0) + struct.pack("<I", 2) + b"ab" + struct.pack(
        "<I", 0
    )
    assert (
        encoded.header_length is not None and encoded.header_length % 8 == 0
    )  # padded with spaces so the first tensor is aligned
    assert encoded.http_headers()[codec.HEADER_LENGTH_HTTP_HEADER] == str(encoded.header_length)


def test_hand_made_spec_request_decodes() -> None:
    header = json.dumps(
        {
            "id": "42",
            "inputs": [{"name": "x", "shape": [2], "datatype": "INT32", "parameters": {"binary_data_size": 8}}],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
        }
    ).encode()
    request = codec.decode_request(header + struct.pack("<2i", 7, -9), len(header))
    np.testing.assert_array_equal(request.inputs["x"], [7, -9])
    assert request.wants_binary("y") and not request.wants_binary("z")


def test_decode_is_zero_copy() -> None:
    tensor = np.arange(1 << 16, dtype=np.float32)
    encoded = codec.encode_request({"x": tensor})
    body = bytearray(encoded.body())
    decoded = codec.decode_request(body, encoded.header_length).inputs["x"]
    body[-4:] = struct.pack("<f", 123.0)  # the decoded array is a view on the body
    assert decoded[-1] == 123.0


def test_encode_handles_big_endian_and_non_contiguous_arrays() -> None:
    big = np.arange(6, dtype=">i4").reshape(2, 3).T
    encoded = codec.encode_request({"x": big})
    decoded = codec.decode_request(encoded.body(), encoded.header_length).inputs["x"]
    np.testing.assert_array_equal(decoded, big)


def test_binary_output_defaults_follow_triton() -> None:
    body = json.dumps(
        {
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}],
            "parameters": {"binary_data_output": True},
            "outputs": [{"name": "a", "parameters": {"binary_data": False}}, {"name": "b"}],
        }
    ).encode()
    request = codec.decode_request(body, None)
    assert not request.wants_binary("a")
    assert request.wants_binary("b")


def _binary_body(header: dict[str, object], payload: bytes) -> tuple[bytes, int]:
    raw = json.dumps(header).encode()
    return raw + payload, len(raw)


def _one_input(**entry: object) -> dict[str, object]:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], **entry}]}


@pytest.mark.parametrize(
    ("body", "header_length", "error", "words"),
    [
        (b"", None, MalformedBody, "empty"),
        (b"{not json", None, MalformedBody, "not valid JSON"),
        (b"[1, 2]", None, MalformedBody, "must be an object"),
        (b'{"inputs": []}', None, MalformedBody, "inputs"),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP8", "shape": [1], "data": [1]}]}',
            None,
            MalformedBody,
            "datatype",
        ),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "data": [1]}]}', None, MalformedBody, "shape"),
        (*_binary_body(_one_input(), b""), MalformedBody, "neither 'data'"),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "data": [1, 2]}]}',
            None,
            TensorMismatch,
            "needs 3",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [-2], "data": []}]}',
            None,
            TensorMismatch,
            "negative",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": ["a"]}]}',
            None,
            TensorMismatch,
            "integers",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "BOOL", "shape": [1], "data": [3]}]}',
            None,
            TensorMismatch,
            "true/false",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}, '
            b'{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}',
            None,
            MalformedBody,
            "listed twice",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}',
            999,
            MalformedBody,
            "exceeds",
        ),
        (
            *_binary_body(_one_input(parameters={"binary_data_size": 8}), b"\0" * 4),
            MalformedBody,
            "runs past",
        ),
        (*_binary_body(_one_input(parameters={"binary_data_size": 4}), b"\0" * 4), TensorMismatch, "needs 8"),
        (
            *_binary_body(_one_input(parameters={"binary_data_size": 8}), b"\0" * 12),
            MalformedBody,
            "no tensor",
        ),
        (*_binary_body(_one_input(parameters={"binary_data_size": -1}), b""), MalformedBody, "non-negative"),
        (
            *_binary_body(
                {
                    "inputs": [
                        {
                            "name": "s",
                            "datatype": "BYTES",
                            "shape": [1],
                            "parameters": {"binary_data_size": 6},
                        }
                    ]
                },
                struct.pack("<I", 9) + b"ab",
            ),
            MalformedBody,
            "runs past",
        ),
        (
            *_binary_body(
                {
                    "inputs": [
                        {
                            "name": "s",
                            "datatype": "BYTES",
                            "shape": [2],
                            "parameters": {"binary_data_size": 6},
                        }
                    ]
                },
                struct.pack("<I", 2) + b"ab",
            ),
            MalformedBody,
            "length prefix",
        ),
        (
            *_binary_body(
                {
                    "inputs": [
                        {
                            "name": "s",
                            "datatype": "BYTES",
                            "shape": [1],
                            "parameters": {"binary_data_size": 7},
                        }
                    ]
                },
                struct.pack("<I", 2) + b"abc",
            ),
            MalformedBody,
            "left over",
        ),
        (
            b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}], "parameters": '
            b'{"binary_data_output": 3}}',
            None,
            MalformedBody,
            "true or false",
        ),
    ],
)
def test_malformed_requests_name_the_problem(
    body: bytes, header_length: int | None, error: type[Exception], words: str
) -> None:
    with pytest.raises(error, match=words):
        codec.decode_request(body, header_length)


def test_header_length_must_be_an_integer() -> None:
    with pytest.raises(MalformedBody, match="integer"):
        codec.parse_header_length("12a")
    assert codec.parse_header_length(None) is None


def test_datatype_of_rejects_what_v2_cannot_carry() -> None:
    with pytest.raises(TypeError, match="no Open Inference Protocol datatype"):
        datatype_of(np.zeros(1, dtype=np.complex64))


@pytest.mark.parametrize(
    ("datatype", "element"), [("FP32", "0.0"), ("FP32", "1e0"), ("FP64", "0.5"), ("INT32", "7"), ("INT64", "1000"),
                              ("BOOL", "true"), ("UINT8", "0")],
)  # fmt: skip
def test_json_decoding_peaks_within_the_factor_a_tier_charges_for_it(datatype: str, element: str) -> None:
    """The shortest text each kind of element can have, a million of them: the decode's peak allocation
    stays within ``JSON_DECODE_PEAK_FACTOR`` × the document (what the body budget is charged)."""
    count = 1_000_000
    data = "[" + ",".join([element] * count) + "]"
    document = (f'{{"inputs":[{{"name":"x","datatype":"{datatype}","shape":[{count}],"data":{data}}}]}}').encode()
    tracemalloc.start()
    try:
        codec.decode_request(document, None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= codec.JSON_DECODE_PEAK_FACTOR * len(document), peak / len(document)


@pytest.mark.parametrize("shape", [[0, 2**63], [2**40, 2**40, 0], [-1, 2]])
def test_a_shape_no_array_can_have_is_the_clients_error(shape: list[int]) -> None:
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": shape,
                                     "parameters": {"binary_data_size": 0}}]}).encode()  # fmt: skip
    with pytest.raises(TensorMismatch):
        codec.decode_request(header, len(header))
