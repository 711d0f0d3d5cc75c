"""Open Inference Protocol v2 tensors <-> one DataFrame, in JSON or Triton's binary extension.

An input tensor is one column of shape [n] or [n, 1]. Its data comes either as JSON (`data`) or,
with the binary extension that stock Triton clients use by default, as raw bytes after the JSON
header (`parameters.binary_data_size`; the bytes are on the request state, split off by
service.middleware): little-endian numbers, one byte per BOOL, and for BYTES each element as a
4-byte little-endian length followed by its UTF-8 bytes.

The declared datatype must suit the model's input type (a date is BYTES, never INT64: numbers are
not dates); values are then checked by the model's own input schema, as JSON records are.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Collection
from typing import Any

import numpy as np
import pandas as pd

from service.schemas import (
    NAN_MESSAGE,
    ErrorItem,
    InputError,
    V2InferRequest,
    V2Tensor,
    check_cells,
)

INTS = ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")
FLOATS = ("FP16", "FP32", "FP64")
NUMPY_DTYPE = {"BOOL": np.dtype("?"), "INT8": np.dtype("<i1"), "INT16": np.dtype("<i2"),
               "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"), "UINT8": np.dtype("<u1"),
               "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"),
               "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8")}
V2_FOR_INPUT_TYPE = {"int": "INT64", "float": "FP64", "bool": "BOOL", "str": "BYTES", "id": "BYTES",
                     "date": "BYTES"}
"""The datatype each input type is documented with (model metadata, examples)."""
ACCEPTED = {"int": (*INTS, *FLOATS), "float": (*INTS, *FLOATS), "bool": ("BOOL", *INTS),
            "str": ("BYTES",), "id": ("BYTES", *INTS), "date": ("BYTES",)}
"""The datatypes each input type accepts (floats for ints: a column with missing values)."""


def batch_size(inputs: list[V2Tensor]) -> int:
    return max((t.shape[0] for t in inputs), default=0)


def check_tensors(inputs: list[V2Tensor], fields: list[dict[str, Any]]) -> list[np.ndarray | None]:
    """Shapes, names and datatypes, before anything is decoded or counted (a shape of 10^11 with
    one datum is a shape error, not 'too many records'). Returns each tensor's flat JSON data
    (None for binary data)."""
    errors: list[ErrorItem] = []
    flats: list[np.ndarray | None] = []
    types = {f["name"]: f["type"] for f in fields}
    seen: set[str] = set()
    for i, t in enumerate(inputs):
        where = f"inputs[{i}]"
        if t.name in seen and t.name in types:  # inputs the model does not take are ignored
            errors.append(ErrorItem(field=f"{where}.name", msg=f"input {t.name!r} given twice"))
        seen.add(t.name)
        if len(t.shape) == 2 and t.shape[1] != 1:
            errors.append(ErrorItem(field=f"{where}.shape", msg=f"shape must be [n] or [n, 1], got {t.shape}"))
        binary = "binary_data_size" in (t.parameters or {})
        flat = _flat(t.data) if t.data is not None else None
        flats.append(flat)
        if (t.data is None) != binary:
            errors.append(ErrorItem(field=f"{where}.data", msg="give either data or parameters.binary_data_size"))
        elif t.data is not None and (flat is None or len(flat) != t.shape[0]):
            errors.append(ErrorItem(field=f"{where}.data", msg=f"data does not match shape {t.shape}"))
        accepted = ACCEPTED.get(types.get(t.name, ""), ())
        if accepted and t.datatype not in accepted:
            errors.append(ErrorItem(field=f"{where}.datatype", msg=(
                f"input {t.name!r} is a {types[t.name]} field: datatype {t.datatype} is not accepted; "
                f"send {' or '.join(sorted(set(accepted), key=accepted.index)[:3])}"
                f"{' (...)' if len(accepted) > 3 else ''}")))
    if not errors and len({t.shape[0] for t in inputs}) > 1:
        errors.append(ErrorItem(field="inputs", msg="all inputs must have the same first dimension"))
    if errors:
        raise InputError(errors)
    return flats


def _flat(data: list[Any]) -> np.ndarray | None:
    """Flat data, or nested data in row-major order; None when ragged."""
    try:
        return np.asarray(data, dtype=object).reshape(-1)
    except ValueError:
        return None


def tensors_frame(inputs: list[V2Tensor], flats: list[np.ndarray | None], binary: memoryview | None,
                  nan_literals: bool = False, keep: Collection[str] | None = None) -> pd.DataFrame:
    """One column per input tensor (shapes already checked by check_tensors). `nan_literals`: the
    JSON may hold NaN literals, which are a missing value in an FP tensor and an error elsewhere."""
    columns: dict[str, Any] = {}
    offset = 0
    buffer = binary if binary is not None else memoryview(b"")
    for i, (t, flat) in enumerate(zip(inputs, flats, strict=True)):
        known = keep is None or t.name in keep  # inputs the model does not take are skipped
        if flat is not None and not known:
            continue
        if flat is not None:
            if nan_literals and t.datatype not in FLOATS:
                nan = [k for k, v in enumerate(flat) if isinstance(v, float) and v != v]
                if nan:
                    raise InputError([ErrorItem(record=k, field=t.name, msg=NAN_MESSAGE) for k in nan[:10]])
            columns[t.name] = pd.Series(flat, dtype=object).infer_objects()
            continue
        size = (t.parameters or {}).get("binary_data_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(buffer):
            raise InputError.one(f"binary_data_size {size!r} does not fit the {len(buffer) - offset} binary "
                                 "bytes left", field=f"inputs[{i}].parameters")
        raw = buffer[offset: offset + size]
        offset += size
        if known:
            columns[t.name] = decode_binary(raw, t, f"inputs[{i}]")
    if offset != len(buffer):
        raise InputError.one(f"{len(buffer) - offset} binary bytes after the last tensor", field="inputs")
    # as many rows as the tensors declare, even when the model takes none of them (then its
    # schema names the missing fields), never a silent 0-row answer
    df = pd.DataFrame(columns, index=pd.RangeIndex(inputs[0].shape[0] if inputs else 0))
    check_cells(df)
    return df


def decode_binary(raw: memoryview, t: V2Tensor, where: str) -> pd.Series:
    n = t.shape[0]
    if t.datatype == "BYTES":
        values = decode_bytes(raw, n, where)
    else:
        dtype = NUMPY_DTYPE[t.datatype]
        if len(raw) != n * dtype.itemsize:
            raise InputError.one(f"{len(raw)} binary bytes for {n} {t.datatype} values ({dtype.itemsize} bytes "
                                 "each)", field=f"{where}.parameters")
        values = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="))
        if t.datatype in FLOATS:
            values = values.astype(np.float64)
    return pd.Series(values)


def decode_bytes(raw: memoryview, n: int, where: str) -> np.ndarray:
    """n length-prefixed UTF-8 strings. When all have the same length (dates, codes) the buffer is
    one (n, 4 + width) array: no per-element Python; otherwise it is walked element by element,
    as the format's running offsets require."""
    data = bytes(raw)
    if n and len(data) >= 4:
        width = struct.unpack_from("<I", data)[0]
        if len(data) == n * (4 + width):
            table = np.frombuffer(data, dtype=np.uint8).reshape(n, 4 + width)
            if (table[:, :4].copy().view("<u4").reshape(-1) == width).all():
                try:
                    return np.char.decode(table[:, 4:].copy().view(f"S{width}").reshape(-1), "utf-8").astype(object) \
                        if width else np.full(n, "", dtype=object)
                except UnicodeDecodeError:
                    pass  # reported with its element below
    out = np.empty(n, dtype=object)
    pos = 0
    for k in range(n):
        if pos + 4 > len(data):
            raise InputError.one(f"BYTES data ends after {k} of {n} elements", field=f"{where}.parameters")
        size = struct.unpack_from("<I", data, pos)[0]
        pos += 4
        if pos + size > len(data):
            raise InputError.one(f"BYTES element {k} runs past the binary data", field=f"{where}.parameters")
        try:
            out[k] = data[pos: pos + size].decode("utf-8")
        except UnicodeDecodeError:
            raise InputError.one(f"BYTES element {k} is not UTF-8", field=f"{where}.parameters", record=k) from None
        pos += size
    if pos != len(data):
        raise InputError.one(f"{len(data) - pos} bytes after the {n} BYTES elements", field=f"{where}.parameters")
    return out


def wants_binary(body: V2InferRequest) -> bool:
    """Binary output when asked for: request parameter binary_data_output (what tritonclient sends
    when no outputs are named) or `binary_data` on the requested output."""
    flags = [("parameters.binary_data_output", (body.parameters or {}).get("binary_data_output"))]
    flags += [(f"outputs[{i}].parameters.binary_data", (o.parameters or {}).get("binary_data"))
              for i, o in enumerate(body.outputs or [])]
    for where, flag in flags:
        if flag is not None and not isinstance(flag, bool):
            raise InputError.one(f"{flag!r} is not a boolean", field=where)
    return any(flag for _, flag in flags)


def infer_body(header: dict[str, Any], preds: np.ndarray, binary: bool) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: JSON, or the JSON header plus raw little-endian FP64."""
    out: dict[str, Any] = {"name": "prediction", "datatype": "FP64", "shape": [len(preds)]}
    if not binary:
        values = preds.astype(object)
        values[~np.isfinite(preds)] = None
        out["data"] = values.tolist()
        return json.dumps({**header, "outputs": [out]}).encode(), {"content-type": "application/json"}
    raw = np.ascontiguousarray(preds, dtype="<f8").tobytes()
    out["parameters"] = {"binary_data_size": len(raw)}
    head = json.dumps({**header, "outputs": [out]}).encode()
    return head + raw, {"content-type": "application/octet-stream",
                        "inference-header-content-length": str(len(head))}
