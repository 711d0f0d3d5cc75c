"""Random forests as plain arrays: export a fitted scikit-learn regression forest, predict with numpy.

What a bundle needs to give a per-row spread (std of the trees' predictions) without pickle and
without scikit-learn at predict time. The trees of a forest are concatenated node arrays,
as scikit-learn's ``tree_`` holds them, plus ``offsets`` (tree t owns nodes
``offsets[t]:offsets[t + 1]``; child indices are local to their tree, -1 at leaves):

    children_left, children_right  int32   local node index of each child, -1 at a leaf
    feature                        int32   column tested at an internal node, -2 at a leaf
    threshold                      float64 go left when x <= threshold
    missing_left                   uint8   1: a NaN goes left (scikit-learn's missing_go_to_left)
    value                          float64 the node's prediction (used at leaves)
    offsets                        int64   [n_trees + 1]

`ForestArrays.predict_trees` walks every (tree, row) pair at once, one numpy step per tree
level (no per-row Python), and reproduces ``estimators_[t].predict`` exactly: rows are cast to
float32 first and compared with the float64 thresholds, as scikit-learn does. This module imports
neither scikit-learn nor torch, so serving does not pay for them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from modeling.errors import DataError

FIELDS = ("children_left", "children_right", "feature", "threshold", "missing_left", "value", "offsets")
_DTYPES = {"children_left": np.int32, "children_right": np.int32, "feature": np.int32,
           "threshold": np.float64, "missing_left": np.uint8, "value": np.float64, "offsets": np.int64}
_PAIRS_PER_STEP = 1 << 21  # (tree, row) pairs walked at once: bounds memory to ~100 MB


@dataclass
class ForestArrays:
    """The trees of a single-output regression forest as concatenated node arrays."""

    children_left: np.ndarray
    children_right: np.ndarray
    feature: np.ndarray
    threshold: np.ndarray
    missing_left: np.ndarray
    value: np.ndarray
    offsets: np.ndarray
    n_features: int
    _walk: tuple[np.ndarray, ...] | None = field(default=None, init=False, repr=False, compare=False)

    # ------------------------------------------------------------------ building

    @classmethod
    def from_sklearn(cls, model: Any) -> ForestArrays:
        """Export a fitted RandomForestRegressor / ExtraTreesRegressor (one output)."""
        trees = getattr(model, "estimators_", None)
        if not trees:
            raise ValueError("export needs a fitted forest with `estimators_`")
        if getattr(model, "n_outputs_", 1) != 1:
            raise ValueError("only single-output regression forests can be exported")
        parts: dict[str, list[np.ndarray]] = {k: [] for k in FIELDS if k != "offsets"}
        sizes = []
        for est in trees:
            t = est.tree_
            if t.value.shape[1:] != (1, 1):
                raise ValueError(f"only regression trees can be exported (value shape {t.value.shape})")
            parts["children_left"].append(t.children_left)
            parts["children_right"].append(t.children_right)
            parts["feature"].append(t.feature)
            parts["threshold"].append(t.threshold)
            leaf = t.children_left < 0
            parts["missing_left"].append(np.where(leaf, 0, t.missing_go_to_left))
            parts["value"].append(t.value[:, 0, 0])
            sizes.append(t.node_count)
        arrays = {k: np.concatenate(v).astype(_DTYPES[k]) for k, v in parts.items()}
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        return cls(**arrays, offsets=offsets, n_features=int(model.n_features_in_)).validated()

    def to_arrays(self, prefix: str = "forest_") -> dict[str, np.ndarray]:
        """Plain arrays under `prefix + field` (for a bundle's safetensors extras)."""
        return {prefix + k: np.ascontiguousarray(getattr(self, k), dtype=_DTYPES[k]) for k in FIELDS}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], n_features: int, prefix: str = "forest_") -> ForestArrays:
        """Rebuild from `to_arrays` output (numpy arrays or torch tensors); checks the structure."""
        missing = [prefix + k for k in FIELDS if prefix + k not in arrays]
        if missing:
            raise DataError(f"forest arrays incomplete: missing {missing}")
        values = {k: np.asarray(_numpy(arrays[prefix + k])).astype(_DTYPES[k], copy=False).reshape(-1)
                  for k in FIELDS}
        return cls(**values, n_features=int(n_features)).validated()

    def validated(self) -> ForestArrays:
        """Raise DataError unless the arrays form well-founded trees (every child after its parent)."""
        n = len(self.value)
        for k in FIELDS[:-1]:
            if len(getattr(self, k)) != n:
                raise DataError(f"forest arrays: {k} has {len(getattr(self, k))} nodes, value has {n}")
        off = self.offsets
        if len(off) < 2 or off[0] != 0 or off[-1] != n or np.any(np.diff(off) < 1):
            raise DataError(f"forest arrays: bad offsets (first {off[:3].tolist()}, last {off[-1:].tolist()}, "
                            f"{n} nodes)")
        tree = np.repeat(np.arange(len(off) - 1), np.diff(off))
        local = np.arange(n) - off[tree]
        size = np.diff(off)[tree]
        leaf = self.children_left < 0
        if np.any((self.children_right < 0) != leaf):
            raise DataError("forest arrays: a node has exactly one child")
        internal = ~leaf
        for name, child in (("children_left", self.children_left), ("children_right", self.children_right)):
            c = child[internal]
            if np.any(c <= local[internal]) or np.any(c >= size[internal]):
                raise DataError(f"forest arrays: {name} points outside its tree or back to an ancestor")
        f = self.feature[internal]
        if np.any(f < 0) or np.any(f >= self.n_features):
            raise DataError(f"forest arrays: feature index outside [0, {self.n_features})")
        if not np.all(np.isfinite(self.value[leaf])):
            raise DataError("forest arrays: a leaf value is not finite")
        return self

    # ------------------------------------------------------------------ facts

    @property
    def n_trees(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_nodes(self) -> int:
        return len(self.value)

    @property
    def nbytes(self) -> int:
        return int(sum(getattr(self, k).nbytes for k in FIELDS))

    def depths(self) -> np.ndarray:
        """Depth of every node (root 0), one numpy step per level."""
        left, right, _, leaf = self._global()
        depth = np.zeros(self.n_nodes, dtype=np.int64)
        frontier = self.offsets[:-1]
        d = 0
        while len(frontier):
            depth[frontier] = d
            frontier = frontier[~leaf[frontier]]
            frontier = np.concatenate([left[frontier], right[frontier]])
            d += 1
        return depth

    # ------------------------------------------------------------------ predicting

    def _global(self) -> tuple[np.ndarray, ...]:
        """(left, right, feature, is_leaf) with global child indices; leaves point at themselves."""
        if self._walk is None:
            tree = np.repeat(np.arange(self.n_trees), np.diff(self.offsets))
            own = np.arange(self.n_nodes, dtype=np.int64)
            leaf = self.children_left < 0
            base = self.offsets[tree]
            left = np.where(leaf, own, self.children_left.astype(np.int64) + base)
            right = np.where(leaf, own, self.children_right.astype(np.int64) + base)
            feat = np.where(leaf, 0, self.feature).astype(np.int64)
            self._walk = (left, right, feat, leaf)
        return self._walk

    def predict_trees(self, X: Any) -> np.ndarray:
        """Each tree's prediction for each row: float64 [n_trees, n_rows]."""
        x = np.ascontiguousarray(np.asarray(X, dtype=np.float32))
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise DataError(f"forest expects {self.n_features} feature columns, got shape {x.shape}")
        n = len(x)
        out = np.empty((self.n_trees, n), dtype=np.float64)
        if n == 0:
            return out
        step = max(1, _PAIRS_PER_STEP // self.n_trees)
        for start in range(0, n, step):
            chunk = x[start : start + step]
            out[:, start : start + len(chunk)] = self._leaf_values(chunk)
        return out

    def _leaf_values(self, x: np.ndarray) -> np.ndarray:
        left, right, feat, leaf = self._global()
        n, n_feat = x.shape
        flat = x.reshape(-1)
        has_nan = bool(np.isnan(flat).any())
        node = np.repeat(self.offsets[:-1], n)  # tree-major (tree, row) pairs
        row_base = np.tile(np.arange(n, dtype=np.int64) * n_feat, self.n_trees)
        pos = np.flatnonzero(~leaf[node])  # pairs still walking
        cur, base = node[pos], row_base[pos]
        while len(pos):
            v = flat[base + feat[cur]]
            go_left = v <= self.threshold[cur]  # float32 value vs float64 threshold, as scikit-learn
            if has_nan:
                go_left |= np.isnan(v) & (self.missing_left[cur] != 0)
            cur = np.where(go_left, left[cur], right[cur])
            done = leaf[cur]
            if done.any():
                node[pos[done]] = cur[done]
                walking = ~done
                pos, cur, base = pos[walking], cur[walking], base[walking]
        return self.value[node].reshape(self.n_trees, n)

    def predict(self, X: Any) -> np.ndarray:
        """Mean over the trees (the forest's prediction)."""
        return self.predict_trees(X).mean(axis=0)

    def spread(self, X: Any) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) over the trees per row; std with ddof=0, as `modeling.forest.tree_confidence`."""
        preds = self.predict_trees(X)
        return preds.mean(axis=0), preds.std(axis=0)


def _numpy(a: Any) -> np.ndarray:
    return a.numpy() if hasattr(a, "numpy") and not isinstance(a, np.ndarray) else np.asarray(a)
