"""The HTTP contract as pydantic models, and the conversion of request payloads to one DataFrame.

Record values are typed `Any` for speed (pydantic checks the JSON shape); cell values are then
checked column-wise on the DataFrame, and each model's own input schema coerces the columns.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
from pandas.api.types import infer_dtype
from pydantic import BaseModel, ConfigDict, Field, model_validator

from modeling.errors import DataError

Record = dict[str, Any]
SCALAR_TYPES = (str, int, float, bool, type(None))
CLEAN_OBJECT_KINDS = {"string", "empty", "boolean"}
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


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


INVOCATION_FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")


class InvocationsRequest(BaseModel):
    """Exactly one of the four MLflow input formats (and optional params); nothing else."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "oneOf": [{"required": [k]} for k in INVOCATION_FORMATS]})
    dataframe_split: DataFrameSplit | None = None
    dataframe_records: list[Record] | None = None
    instances: list[Record] | dict[str, list[Any]] | None = None
    inputs: list[Record] | dict[str, list[Any]] | None = None
    params: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> InvocationsRequest:
        given = [k for k in INVOCATION_FORMATS if k in self.model_fields_set]  # present, even as null
        if len(given) != 1:
            raise ValueError("give exactly one of dataframe_split, dataframe_records, instances, inputs "
                             f"(got {given or 'none'})")
        if getattr(self, given[0]) is None:
            raise ValueError(f"{given[0]} must not be null")
        return self


class InvocationsResponse(BaseModel):
    predictions: list[float | None]


# ---------------------------------------------------------------- Open Inference Protocol v2
V2Datatype = Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                     "FP16", "FP32", "FP64", "BYTES"]
Dim = Annotated[int, Field(ge=0, le=INT64_MAX)]


class V2Tensor(BaseModel):
    """One input column. `data` is flat (or nested `[[v], ...]` for shape [n, 1]); with Triton's
    binary extension it is absent and `parameters.binary_data_size` bytes follow the JSON."""

    name: str
    shape: list[Dim] = Field(min_length=1, max_length=2, description="[n] or [n, 1]")
    datatype: V2Datatype
    data: list[Any] | None = None
    parameters: dict[str, Any] | None = None


class V2RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = Field(None, description='{"binary_data": true} for raw bytes')


class V2InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = Field(None, description='{"binary_data_output": true} for raw bytes')
    inputs: list[V2Tensor]
    outputs: list[V2RequestedOutput] | None = None


class V2OutputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: V2Datatype
    data: list[float | None] | None = Field(None, description="absent when sent as binary data")
    parameters: dict[str, Any] | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[V2OutputTensor]


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
NAN_MESSAGE = "value NaN is not valid JSON; send null for a missing value"


def records_frame(records: list[Record], nan_literals: bool = False,
                  keep: Collection[str] | None = None) -> pd.DataFrame:
    """One DataFrame from a list of JSON objects (missing keys become missing values).

    `nan_literals`: the body may hold NaN literals (non-standard JSON, which Python's parser
    reads as float NaN): find them, since the frame can no longer tell them from missing keys.
    `keep`: the model's input columns; other keys are ignored, whatever their values."""
    df = pd.DataFrame.from_records(records) if records else pd.DataFrame()
    if len(df) != len(records):  # all records empty objects: keep one row per record
        df = pd.DataFrame(index=pd.RangeIndex(len(records)))
    df = _keep(df, keep)
    if nan_literals:
        reject_nan_literals(df, lambda i, c: records[i].get(c))
    check_cells(df)
    return df


def split_frame(split: DataFrameSplit, nan_literals: bool = False,
                keep: Collection[str] | None = None) -> pd.DataFrame:
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
    df = _keep(df, keep)
    if nan_literals:
        where = {c: j for j, c in enumerate(split.columns)}
        reject_nan_literals(df, lambda i, c: split.data[i][where[c]])
    check_cells(df)
    return df


def columns_frame(columns: dict[str, list[Any]], nan_literals: bool = False,
                  keep: Collection[str] | None = None) -> pd.DataFrame:
    """Columnar input ({"col": [...], ...}); all columns must have the same length."""
    lengths = {k: len(v) for k, v in columns.items()}
    if len(set(lengths.values())) > 1:
        raise InputError.one(f"columns have different lengths: {lengths}", field="inputs")
    df = _keep(pd.DataFrame(columns), keep)
    if nan_literals:
        reject_nan_literals(df, lambda i, c: columns[c][i])
    check_cells(df)
    return df


def _keep(df: pd.DataFrame, keep: Collection[str] | None) -> pd.DataFrame:
    if keep is None:
        return df
    wanted = [c for c in df.columns if c in keep]
    return df if len(wanted) == len(df.columns) else df[wanted]


def reject_nan_literals(df: pd.DataFrame, cell: Callable[[int, Any], Any], max_items: int = 10) -> None:
    """422 naming record and field for every NaN literal (looked up in the payload only where the
    frame has a missing value, and only for bodies that contain the bytes `NaN`)."""
    errors: list[ErrorItem] = []
    for name in df.columns:
        for i in np.flatnonzero(df[name].isna().to_numpy())[: max_items * 4]:
            value = cell(int(i), name)
            if isinstance(value, float) and value != value:
                errors.append(ErrorItem(record=int(i), field=str(name), msg=NAN_MESSAGE))
    if errors:
        errors.sort(key=lambda e: (e.record or 0, e.field or ""))
        raise InputError(errors[:max_items])


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
