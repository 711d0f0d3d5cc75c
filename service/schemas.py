"""The HTTP contract as pydantic models, and the conversion of request payloads to one DataFrame.

Record values are typed `Any` for speed (pydantic checks the JSON shape); cell values are then
checked column-wise on the DataFrame, and each model's own input schema coerces the columns.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pandas as pd
from pandas.api.types import infer_dtype
from pydantic import BaseModel, ConfigDict, Field, model_validator

from modeling.errors import DataError

Record = dict[str, Any]
SCALAR_TYPES = (str, int, float, bool, type(None))
CLEAN_OBJECT_KINDS = {"string", "empty", "boolean"}
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
V2_DATATYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                "FP16", "FP32", "FP64", "BYTES")
V2_FOR_INPUT_TYPE = {"int": "INT64", "float": "FP64", "bool": "BOOL", "str": "BYTES", "id": "BYTES",
                     "date": "BYTES"}


class ErrorItem(BaseModel):
    record: int | None = Field(None, description="0-based record index, when the error is in a record")
    field: str | None = Field(None, description="the offending field or column")
    msg: str


class ErrorResponse(BaseModel):
    detail: list[ErrorItem] | str
    request_id: str | None = None


class InputError(DataError):
    """A request payload problem that maps to 422 with itemised details."""

    def __init__(self, items: list[ErrorItem]) -> None:
        self.items = items
        super().__init__("; ".join(i.msg for i in items[:5]))

    @classmethod
    def one(cls, msg: str, field: str | None = None, record: int | None = None) -> InputError:
        return cls([ErrorItem(record=record, field=field, msg=msg)])


# ---------------------------------------------------------------- v1
class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    records: list[Record] = Field(description="Raw input rows; see GET /v1/models for each model's columns.")


class PredictResponse(BaseModel):
    model: str
    version: str | None
    predictions: list[float | None]


class InputFieldInfo(BaseModel):
    name: str
    type: str
    required: bool = True
    allowed: list[str] | None = None
    description: str = ""


class ModelInfo(BaseModel):
    name: str
    version: str | None
    uri: str
    kind: str
    inputs: list[InputFieldInfo]
    run_id: str | None = None
    loaded_at: float | None = None


class RecommendedItem(BaseModel):
    item: str
    score: float
    title: str | None = None


class RecommendationsResponse(BaseModel):
    user: str
    cold_start: bool
    items: list[RecommendedItem]


class SimilarItem(BaseModel):
    item: str
    similarity: float
    title: str | None = None


class SimilarResponse(BaseModel):
    item: str
    items: list[SimilarItem]


class ReloadEntry(BaseModel):
    name: str
    uri: str
    status: Literal["loaded", "unchanged", "failed"]
    version: str | None = None
    previous_version: str | None = None
    error: str | None = None


class ReloadResponse(BaseModel):
    ok: bool
    ready: bool
    models: list[ReloadEntry]


class ModelState(BaseModel):
    uri: str
    loaded: bool
    version: str | None = None
    error: str | None = None


class ReadyResponse(BaseModel):
    status: Literal["ready", "not ready"]
    models: dict[str, ModelState]


# ---------------------------------------------------------------- MLflow scoring protocol
class DataFrameSplit(BaseModel):
    columns: list[str]
    data: list[list[Any]]
    index: list[Any] | None = None


class InvocationsRequest(BaseModel):
    """Exactly one of the four MLflow input formats."""

    dataframe_split: DataFrameSplit | None = None
    dataframe_records: list[Record] | None = None
    instances: list[Record] | dict[str, list[Any]] | None = None
    inputs: list[Record] | dict[str, list[Any]] | None = None
    params: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> InvocationsRequest:
        given = [k for k in ("dataframe_split", "dataframe_records", "instances", "inputs")
                 if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of dataframe_split, dataframe_records, instances, inputs "
                             f"(got {given or 'none'})")
        return self


class InvocationsResponse(BaseModel):
    predictions: list[float | None]


# ---------------------------------------------------------------- Open Inference Protocol v2
class V2Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[Any]
    parameters: dict[str, Any] | None = None


class V2RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class V2InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[V2Tensor]
    outputs: list[V2RequestedOutput] | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[V2Tensor]


class V2TensorMeta(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMeta]
    outputs: list[V2TensorMeta]


# ---------------------------------------------------------------- payload -> DataFrame
def records_frame(records: list[Record]) -> pd.DataFrame:
    """One DataFrame from a list of JSON objects (missing keys become missing values)."""
    df = pd.DataFrame.from_records(records) if records else pd.DataFrame()
    if len(df) != len(records):  # all records empty objects: keep one row per record
        df = pd.DataFrame(index=pd.RangeIndex(len(records)))
    check_cells(df)
    return df


def split_frame(split: DataFrameSplit) -> pd.DataFrame:
    """MLflow dataframe_split -> DataFrame; every row must have one value per column."""
    n_cols = len(split.columns)
    if len(set(split.columns)) != n_cols:
        raise InputError.one("duplicate column names", field="columns")
    lengths = np.fromiter(map(len, split.data), dtype=np.int64, count=len(split.data))
    bad = np.flatnonzero(lengths != n_cols)
    if len(bad):
        raise InputError([ErrorItem(record=int(i), field=None,
                                    msg=f"row has {lengths[i]} values for {n_cols} columns") for i in bad[:5]])
    df = pd.DataFrame(split.data, columns=split.columns) if split.data else pd.DataFrame(columns=split.columns)
    check_cells(df)
    return df


def columns_frame(columns: dict[str, list[Any]]) -> pd.DataFrame:
    """Columnar input ({"col": [...], ...}); all columns must have the same length."""
    lengths = {k: len(v) for k, v in columns.items()}
    if len(set(lengths.values())) > 1:
        raise InputError.one(f"columns have different lengths: {lengths}", field="inputs")
    df = pd.DataFrame(columns)
    check_cells(df)
    return df


def tensors_frame(inputs: list[V2Tensor]) -> pd.DataFrame:
    """Open Inference Protocol columnar inputs: each tensor is one column of shape [n] or [n, 1]."""
    errors: list[ErrorItem] = []
    columns: dict[str, np.ndarray] = {}
    for i, t in enumerate(inputs):
        where = f"inputs[{i}]"
        if t.datatype.upper() not in V2_DATATYPES:
            errors.append(ErrorItem(field=f"{where}.datatype", msg=f"unknown datatype {t.datatype!r}"))
            continue
        if t.name in columns:
            errors.append(ErrorItem(field=f"{where}.name", msg=f"input {t.name!r} given twice"))
            continue
        if len(t.shape) not in (1, 2) or (len(t.shape) == 2 and t.shape[1] != 1) or min(t.shape) < 0:
            errors.append(ErrorItem(field=f"{where}.shape", msg=f"shape must be [n] or [n, 1], got {t.shape}"))
            continue
        try:
            flat = np.asarray(t.data, dtype=object).reshape(-1)
        except ValueError:
            flat = None
        if flat is None or len(flat) != t.shape[0]:
            errors.append(ErrorItem(field=f"{where}.data", msg=f"data does not match shape {t.shape}"))
            continue
        columns[t.name] = flat
    if not errors and len({len(c) for c in columns.values()}) > 1:
        errors.append(ErrorItem(field="inputs", msg="all inputs must have the same first dimension"))
    if errors:
        raise InputError(errors)
    df = pd.DataFrame({k: pd.Series(v, dtype=object).infer_objects() for k, v in columns.items()})
    check_cells(df)
    return df


def check_cells(df: pd.DataFrame, max_items: int = 10) -> None:
    """Reject cells that are not JSON scalars, infinite numbers or integers beyond int64.

    Column-wise: typed columns are checked with numpy; only object columns that are not plain
    strings get a per-cell type map.
    """
    errors: list[ErrorItem] = []
    for name in df.columns:
        col = df[name]
        if col.dtype.kind == "f":
            bad = np.isinf(col.to_numpy())
        elif col.dtype.kind == "u":
            bad = col.to_numpy() > INT64_MAX
        elif col.dtype.kind == "O" and infer_dtype(col, skipna=True) not in CLEAN_OBJECT_KINDS:
            bad = _bad_object_cells(col)
        else:
            continue
        for i in np.flatnonzero(bad)[:max_items]:
            errors.append(ErrorItem(record=int(i), field=str(name), msg=_cell_message(col.iloc[i])))
    if errors:
        errors.sort(key=lambda e: (e.record or 0, e.field or ""))
        raise InputError(errors[:max_items])


def _bad_object_cells(col: pd.Series) -> np.ndarray:
    types = col.map(type)
    bad = ~types.isin(SCALAR_TYPES).to_numpy()
    is_int = types.isin([int]).to_numpy()
    if is_int.any():
        ints = col[is_int]
        try:
            ints.to_numpy().astype(np.int64)
        except OverflowError:  # rare: locate the out-of-range ones
            bad[is_int] = ~ints.map(lambda v: INT64_MIN <= v <= INT64_MAX).to_numpy(dtype=bool)
    is_float = types.isin([float]).to_numpy()
    if is_float.any():
        bad[is_float] = np.isinf(col[is_float].to_numpy(dtype=np.float64))
    return bad


def _cell_message(value: Any) -> str:
    if isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_):
        return f"integer {_short(value)} out of range (int64)"
    return f"value {_short(value)} is not a finite number, string, boolean or null"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
