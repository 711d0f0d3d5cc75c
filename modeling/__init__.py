"""tabrec modeling core: framework-level code with no knowledge of any one data set.

Public API (imported lazily so `import modeling.errors` stays light):
`emb_sz_rule`, `TabularProcessor`, `TabularModel`, `DotProductBias`, `EmbeddingNN`,
`Trainer`, `fit`, `lr_find`.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "emb_sz_rule": "modeling.embeddings",
    "get_emb_szs": "modeling.embeddings",
    "TabularProcessor": "modeling.processor",
    "TabularModel": "modeling.tabular",
    "sigmoid_range": "modeling.tabular",
    "DotProductBias": "modeling.collab",
    "EmbeddingNN": "modeling.collab",
    "Trainer": "modeling.training",
    "fit": "modeling.training",
    "lr_find": "modeling.training",
    "TensorData": "modeling.training",
    "load_predictor": "modeling.predictors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'modeling' has no attribute {name!r}")
