"""The wire codec: Open Inference Protocol (V2) REST bodies, JSON and the binary tensor extension.

A V2 body is a JSON header, optionally followed by raw tensor bytes. With the binary tensor extension the
HTTP header ``Inference-Header-Content-Length`` gives the JSON header's length, each binary tensor has
``"parameters": {"binary_data_size": N}`` and its bytes follow the header in the order the tensors are
listed. Numbers are little-endian; a ``BYTES`` element is a 4-byte little-endian length then its bytes.

Encoding returns :class:`Encoded` — the header and zero-copy views of the arrays — so the sender decides
whether to join them; decoding returns arrays that are ``np.frombuffer`` views on the received body
(no copy), read-only. Every malformed input raises :class:`~services.contracts.errors.MalformedBody` or
:class:`~services.contracts.errors.TensorMismatch` with a message that names the tensor and the problem.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.contracts.dtypes import NUMPY_DTYPES, Datatype, datatype_of
from services.contracts.errors import MalformedBody, TensorMismatch

HEADER_LENGTH_HTTP_HEADER = "Inference-Header-Content-Length"
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"

ParamValue = bool | int | float | str
Parameters = dict[str, ParamValue]
Buffer = bytes | bytearray | memoryview

_LENGTH_PREFIX = struct.Struct("<I")
_BINARY_ALIGNMENT = 8
_M = TypeVar("_M", bound=BaseModel)
# Python types a JSON tensor element may have, by numpy dtype kind (bool is not a number here)
_JSON_ELEMENT_TYPES: dict[str, tuple[type, ...]] = {
    "b": (bool,),
    "i": (int,),
    "u": (int,),
    "f": (int, float),
    "O": (str, bytes),
}
_JSON_ELEMENT_WORDS = {"b": "true/false", "i": "integers", "u": "integers", "f": "numbers", "O": "strings"}
# JSON has no NaN or infinity: floats that are not finite travel as these strings (protobuf's JSON mapping)
_NON_FINITE = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class TensorEntry(_Strict):
    """One tensor as listed in a V2 JSON header (request input or response output)."""

    name: str = Field(min_length=1)
    datatype: Datatype
    shape: list[int]
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    data: Any = None


class RequestedOutputEntry(_Strict):
    name: str = Field(min_length=1)
    parameters: dict[str, ParamValue] = Field(default_factory=dict)


class InferRequestHeader(_Strict):
    id: str | None = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    inputs: list[TensorEntry] = Field(min_length=1)
    outputs: list[RequestedOutputEntry] = Field(default_factory=list)


class InferResponseHeader(_Strict):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    outputs: list[TensorEntry]


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    """An output the client asked for; ``binary`` None means "as the request's default says"."""

    name: str
    binary: bool | None = None


@dataclass(frozen=True, slots=True)
class InferRequest:
    inputs: dict[str, np.ndarray]
    parameters: Parameters = field(default_factory=dict)
    id: str | None = None
    outputs: tuple[RequestedOutput, ...] = ()
    binary_output_default: bool = False

    def wants_binary(self, output_name: str) -> bool:
        """Whether ``output_name`` should be answered as binary data (Triton's rules)."""
        for requested in self.outputs:
            if requested.name == output_name and requested.binary is not None:
                return requested.binary
        return self.binary_output_default


@dataclass(frozen=True, slots=True)
class InferResponse:
    model_name: str
    outputs: dict[str, np.ndarray]
    parameters: Parameters = field(default_factory=dict)
    id: str | None = None
    model_version: str | None = None


@dataclass(frozen=True, slots=True)
class Encoded:
    """An encoded body: ``chunks`` concatenated; ``header_length`` set when binary data follows."""

    chunks: tuple[Buffer, ...]
    header_length: int | None

    @property
    def size_bytes(self) -> int:
        return sum(_nbytes(c) for c in self.chunks)

    @property
    def content_type(self) -> str:
        return JSON_CONTENT_TYPE if self.header_length is None else BINARY_CONTENT_TYPE

    def http_headers(self) -> dict[str, str]:
        headers = {"Content-Type": self.content_type}
        if self.header_length is not None:
            headers[HEADER_LENGTH_HTTP_HEADER] = str(self.header_length)
        return headers

    def body(self) -> bytes:
        """The chunks joined into one buffer (one copy, unless there is a single bytes chunk)."""
        first = self.chunks[0]
        if len(self.chunks) == 1 and isinstance(first, bytes):
            return first
        return b"".join(self.chunks)


# ---------------------------------------------------------------------------------------------- encode


def _nbytes(buffer: Buffer) -> int:
    return buffer.nbytes if isinstance(buffer, memoryview) else len(buffer)


def _raw_view(array: np.ndarray) -> memoryview:
    """The array's bytes, little-endian and C-ordered, without a copy when it already is."""
    little = array.dtype.newbyteorder("<")
    contiguous = np.ascontiguousarray(array, dtype=little)
    return contiguous.reshape(-1).data.cast("B")


def _bytes_elements(array: np.ndarray) -> list[bytes]:
    return [e if isinstance(e, bytes) else str(e).encode() for e in array.reshape(-1).tolist()]


def _serialize_bytes(array: np.ndarray) -> bytes:
    parts: list[bytes] = []
    for element in _bytes_elements(array):
        parts.append(_LENGTH_PREFIX.pack(len(element)))
        parts.append(element)
    return b"".join(parts)


def _non_finite_word(value: float) -> str:
    return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"


def _json_data(array: np.ndarray) -> list[Any]:
    if array.dtype.kind in "OSU":
        return [e.decode() if isinstance(e, bytes) else str(e) for e in array.reshape(-1).tolist()]
    flat: list[Any] = array.reshape(-1).tolist()
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        return [v if math.isfinite(v) else _non_finite_word(v) for v in flat]
    return flat


def _encode_tensors(
    arrays: Mapping[str, np.ndarray], binary: Iterable[bool]
) -> tuple[list[dict[str, Any]], list[Buffer]]:
    entries: list[dict[str, Any]] = []
    payload: list[Buffer] = []
    for (name, array), as_binary in zip(arrays.items(), binary, strict=True):
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(array), "shape": list(array.shape)}
        if as_binary:
            raw: Buffer = _serialize_bytes(array) if entry["datatype"] == "BYTES" else _raw_view(array)
            entry["parameters"] = {"binary_data_size": _nbytes(raw)}
            payload.append(raw)
        else:
            entry["data"] = _json_data(array)
        entries.append(entry)
    return entries, payload


def _finish(header: dict[str, Any], payload: list[Buffer]) -> Encoded:
    header_bytes = orjson.dumps(header)
    if not payload:
        return Encoded((header_bytes,), None)
    # JSON allows trailing spaces: pad so the first tensor lands 8-byte aligned, and np.frombuffer on the
    # receiving side gives an aligned array onnxruntime can use without copying
    header_bytes += b" " * (-len(header_bytes) % _BINARY_ALIGNMENT)
    return Encoded((header_bytes, *payload), len(header_bytes))


def encode_request(
    inputs: Mapping[str, np.ndarray],
    *,
    parameters: Parameters | None = None,
    request_id: str | None = None,
    binary: bool = True,
    outputs: Sequence[RequestedOutput] = (),
    binary_output_default: bool = True,
) -> Encoded:
    """Encode an infer request; inputs go as binary data unless ``binary`` is False."""
    entries, payload = _encode_tensors(inputs, [binary] * len(inputs))
    params: dict[str, Any] = dict(parameters or {})
    if binary_output_default:
        params["binary_data_output"] = True
    header: dict[str, Any] = {"inputs": entries}
    if request_id is not None:
        header["id"] = request_id
    if params:
        header["parameters"] = params
    if outputs:
        header["outputs"] = [
            {"name": o.name, **({"parameters": {"binary_data": o.binary}} if o.binary is not None else {})}
            for o in outputs
        ]
    return _finish(header, payload)


def encode_response(
    model_name: str,
    outputs: Mapping[str, np.ndarray],
    *,
    binary: Iterable[bool],
    parameters: Parameters | None = None,
    request_id: str | None = None,
    model_version: str | None = None,
) -> Encoded:
    """Encode an infer response; ``binary`` says, per output in order, whether it goes as binary data."""
    entries, payload = _encode_tensors(outputs, binary)
    header: dict[str, Any] = {"model_name": model_name, "outputs": entries}
    if model_version is not None:
        header["model_version"] = model_version
    if request_id is not None:
        header["id"] = request_id
    if parameters:
        header["parameters"] = parameters
    return _finish(header, payload)


# ---------------------------------------------------------------------------------------------- decode


def _split_header(body: Buffer, header_length: int | None) -> tuple[memoryview, memoryview]:
    view = memoryview(body).cast("B") if isinstance(body, memoryview) else memoryview(body)
    if header_length is None:
        return view, view[len(view) :]
    if header_length < 0 or header_length > len(view):
        raise MalformedBody(f"{HEADER_LENGTH_HTTP_HEADER} is {header_length}, which exceeds the {len(view)}-byte body")
    return view[:header_length], view[header_length:]


def parse_header_length(value: str | None) -> int | None:
    """Parse the ``Inference-Header-Content-Length`` HTTP header value (None when absent)."""
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise MalformedBody(f"{HEADER_LENGTH_HTTP_HEADER} must be an integer, got {value!r}") from None


def _load_header(model: type[_M], raw: memoryview, what: str) -> _M:
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedBody(f"{what} JSON header is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise MalformedBody(f"{what} JSON header must be an object, got {type(document).__name__}")
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(root)"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise MalformedBody(f"{what} JSON header: {where}: {first['msg']}{more}") from None


# decoding a JSON document of tensors holds up to this many times its size at the peak: a Python object per
# element (~80 bytes for a float) against as few as 4 bytes of text ("0.0,": 20.0x); measured, for the shortest
# elements of each kind, in tests/unit/test_codec.py. A tier charges a decode this much of its body budget.
JSON_DECODE_PEAK_FACTOR = 24

# numpy's arrays address their elements with signed 64-bit sizes: a shape whose dimensions multiply past
# that cannot be made, even with a zero among them
_MAX_ELEMENTS = 2**62


def _element_count(entry: TensorEntry) -> int:
    if any(d < 0 for d in entry.shape):
        raise TensorMismatch(f"tensor '{entry.name}': shape {entry.shape} has a negative dimension")
    if math.prod(max(d, 1) for d in entry.shape) > _MAX_ELEMENTS:
        raise TensorMismatch(f"tensor '{entry.name}': shape {entry.shape} is larger than any array can be")
    return math.prod(entry.shape)


def _deserialize_bytes(raw: memoryview, count: int, name: str) -> np.ndarray:
    elements: list[bytes] = []
    offset = 0
    for _ in range(count):
        if offset + 4 > len(raw):
            raise MalformedBody(f"tensor '{name}': BYTES data ends inside an element length prefix")
        (size,) = _LENGTH_PREFIX.unpack_from(raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise MalformedBody(f"tensor '{name}': BYTES element of {size} bytes runs past its data")
        elements.append(bytes(raw[offset : offset + size]))
        offset += size
    if offset != len(raw):
        raise MalformedBody(f"tensor '{name}': {len(raw) - offset} bytes left over after {count} BYTES elements")
    array = np.empty(count, dtype=np.object_)
    array[:] = elements
    return array


def _from_binary(entry: TensorEntry, raw: memoryview) -> np.ndarray:
    count = _element_count(entry)
    if entry.datatype == "BYTES":
        return _deserialize_bytes(raw, count, entry.name).reshape(entry.shape)
    dtype = NUMPY_DTYPES[entry.datatype].newbyteorder("<")
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise TensorMismatch(
            f"tensor '{entry.name}': binary_data_size is {len(raw)} bytes but {entry.datatype} "
            f"shape {entry.shape} needs {expected}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(entry.shape)


def _from_json(entry: TensorEntry) -> np.ndarray:
    count = _element_count(entry)
    if entry.data is None:
        raise MalformedBody(f"tensor '{entry.name}' has neither 'data' nor a 'binary_data_size' parameter")
    dtype = NUMPY_DTYPES[entry.datatype]
    try:
        # via Python objects: exact for 64-bit integers, and each element's JSON type can be checked
        flat = np.array(entry.data, dtype=np.object_).reshape(-1)
        if dtype.kind == "f":
            flat = np.array([_NON_FINITE.get(v, v) if isinstance(v, str) else v for v in flat.tolist()], dtype=object)
        allowed = _JSON_ELEMENT_TYPES[dtype.kind]
        wrong = {type(v).__name__ for v in flat.tolist()} - {t.__name__ for t in allowed}
        if wrong:
            raise TypeError(f"{entry.datatype} data must be {_JSON_ELEMENT_WORDS[dtype.kind]}, got {sorted(wrong)}")
        if flat.size != count:
            raise TensorMismatch(
                f"tensor '{entry.name}': shape {entry.shape} needs {count} elements, data has {flat.size}"
            )
        with np.errstate(over="raise", invalid="raise"):  # 65520 as FP16: out of range, not a silent inf
            return flat.astype(dtype).reshape(entry.shape)
    except (TypeError, ValueError, OverflowError, FloatingPointError) as exc:
        raise TensorMismatch(f"tensor '{entry.name}': data cannot be read as {entry.datatype}: {exc}") from None


def _decode_tensors(entries: Sequence[TensorEntry], binary: memoryview, what: str) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for entry in entries:
        if entry.name in arrays:
            raise MalformedBody(f"{what} '{entry.name}' is listed twice")
        size = entry.parameters.get("binary_data_size")
        if size is None:
            arrays[entry.name] = _from_json(entry)
            continue
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise MalformedBody(f"{what} '{entry.name}': binary_data_size must be a non-negative integer")
        if offset + size > len(binary):
            raise MalformedBody(
                f"{what} '{entry.name}': binary_data_size {size} at offset {offset} runs past the "
                f"{len(binary)} bytes of binary data"
            )
        arrays[entry.name] = _from_binary(entry, binary[offset : offset + size])
        offset += size
    if offset != len(binary):
        raise MalformedBody(
            f"body has {len(binary) - offset} bytes of binary data that no tensor's binary_data_size claims"
        )
    return arrays


def decode_request(body: Buffer, header_length: int | None) -> InferRequest:
    """Decode an infer request body; ``header_length`` is the Inference-Header-Content-Length value."""
    if not len(body):
        raise MalformedBody("request body is empty; expected a V2 inference request")
    raw_header, binary = _split_header(body, header_length)
    header = _load_header(InferRequestHeader, raw_header, "request")
    inputs = _decode_tensors(header.inputs, binary, "input")
    requested = tuple(
        RequestedOutput(o.name, _optional_bool(o.parameters.get("binary_data"), f"output '{o.name}' binary_data"))
        for o in header.outputs
    )
    default = _optional_bool(header.parameters.get("binary_data_output"), "binary_data_output") or False
    return InferRequest(inputs, dict(header.parameters), header.id, requested, default)


def decode_response(body: Buffer, header_length: int | None) -> InferResponse:
    """Decode an infer response body (what a client or a forwarding tier receives)."""
    raw_header, binary = _split_header(body, header_length)
    header = _load_header(InferResponseHeader, raw_header, "response")
    outputs = _decode_tensors(header.outputs, binary, "output")
    return InferResponse(header.model_name, outputs, dict(header.parameters), header.id, header.model_version)


def _optional_bool(value: ParamValue | None, what: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise MalformedBody(f"{what} must be true or false, got {value!r}")
