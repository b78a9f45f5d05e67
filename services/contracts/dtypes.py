"""Open Inference Protocol tensor datatypes and their numpy / ONNX equivalents.

The V2 protocol names datatypes as strings (``FP32``, ``INT8``, ``BYTES``…); numpy and ONNX have their
own names. This table is the one place that maps between them.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

Datatype = Literal[
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
]

DATATYPES: tuple[str, ...] = get_args(Datatype)

NUMPY_DTYPES: dict[str, np.dtype[np.generic]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}

# byte order does not change the datatype: key by kind and size
_BY_KIND_AND_SIZE = {(d.kind, d.itemsize): name for name, d in NUMPY_DTYPES.items() if name != "BYTES"}

# ONNX TensorProto element types (onnx.TensorProto.FLOAT == 1, …), spelled out so this leaf needs no onnx.
ONNX_ELEM_TYPES: dict[int, str] = {
    1: "FP32",
    2: "UINT8",
    3: "INT8",
    4: "UINT16",
    5: "INT16",
    6: "INT32",
    7: "INT64",
    8: "BYTES",
    9: "BOOL",
    10: "FP16",
    11: "FP64",
    12: "UINT32",
    13: "UINT64",
}

# onnxruntime reports input types as "tensor(float)" etc.
ORT_TYPE_NAMES: dict[str, str] = {
    "tensor(float)": "FP32",
    "tensor(uint8)": "UINT8",
    "tensor(int8)": "INT8",
    "tensor(uint16)": "UINT16",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(string)": "BYTES",
    "tensor(bool)": "BOOL",
    "tensor(float16)": "FP16",
    "tensor(double)": "FP64",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
}


def datatype_of(array: np.ndarray) -> str:
    """The V2 datatype of a numpy array; strings and bytes arrays are ``BYTES``."""
    kind = array.dtype.kind
    if kind in "OSU":
        return "BYTES"
    name = _BY_KIND_AND_SIZE.get((kind, array.dtype.itemsize))
    if name is None:
        raise TypeError(f"numpy dtype {array.dtype} has no Open Inference Protocol datatype")
    return name
