"""Collaborative-filtering models (dot product + biases, embedding MLP) and ranking helpers.

User and item codes follow the processor convention: index 0 is the unknown token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from modeling.embeddings import emb_sz_rule
from modeling.tabular import _expand_ps, init_embedding, mlp_blocks, sigmoid_range


def _y_range(y_range: Sequence[float] | None) -> tuple[float, float] | None:
    if y_range is None:
        return None
    low, high = float(y_range[0]), float(y_range[1])
    if not low < high:
        raise ValueError(f"y_range must be (low, high) with low < high, got {y_range}")
    return low, high


def _squash(x: Tensor, y_range: tuple[float, float] | None) -> Tensor:
    return x if y_range is None else sigmoid_range(x, *y_range)


class DotProductBias(nn.Module):
    """rating = sigmoid_range(user . item + user_bias + item_bias).

    With y_range=None the raw score is the output: the ranking head (a DotProductBias trained
    with a ranking loss from `modeling.ranking`) uses it so, scores being logits."""

    def __init__(
        self,
        n_users: int,
        n_items: int,
        n_factors: int = 50,
        y_range: tuple[float, float] | None = (0.0, 5.5),
    ) -> None:
        super().__init__()
        self.n_users, self.n_items, self.n_factors = int(n_users), int(n_items), int(n_factors)
        self.y_range = _y_range(y_range)
        self.user_emb = nn.Embedding(self.n_users, self.n_factors)
        self.item_emb = nn.Embedding(self.n_items, self.n_factors)
        self.user_bias = nn.Embedding(self.n_users, 1)
        self.item_bias = nn.Embedding(self.n_items, 1)
        init_embedding(self.user_emb)
        init_embedding(self.item_emb)
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.item_bias.weight)

    def forward(self, users: Tensor, items: Tensor | None = None) -> Tensor:
        """Scores of (user, item) pairs: items [m] -> [m]; items [m, c] (c candidates per user)
        -> [m, c]; no items -> every item, [m, n_items] in one matmul (what a catalogue-wide
        ranking loss trains on, through this forward so DistributedDataParallel sees it)."""
        if items is None:
            raw = self.user_emb(users) @ self.item_emb.weight.T
            return _squash(raw + self.user_bias(users) + self.item_bias.weight.T, self.y_range)
        u, ub = self.user_emb(users), self.user_bias(users)  # [m, d], [m, 1]
        if items.dim() == 2:  # c candidates per user
            dot = (u.unsqueeze(1) * self.item_emb(items)).sum(dim=-1)
            return _squash(dot + ub + self.item_bias(items).squeeze(-1), self.y_range)
        dot = (u * self.item_emb(items)).sum(dim=1)
        return _squash(dot + ub.squeeze(1) + self.item_bias(items).squeeze(1), self.y_range)

    def score_all(self, users: Tensor) -> Tensor:
        """[m, n_items] scores in one matmul."""
        return self(users)

    def config(self) -> dict[str, Any]:
        return {
            "n_users": self.n_users,
            "n_items": self.n_items,
            "n_factors": self.n_factors,
            "y_range": None if self.y_range is None else list(self.y_range),
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> DotProductBias:
        return cls(**cfg)

    def param_groups(self) -> list[list[nn.Parameter]]:
        """[factors, biases]."""
        return [
            [self.user_emb.weight, self.item_emb.weight],
            [self.user_bias.weight, self.item_bias.weight],
        ]


class EmbeddingNN(nn.Module):
    """rating = sigmoid_range(MLP(concat(user embedding, item embedding)))."""

    def __init__(
        self,
        n_users: int,
        n_items: int,
        user_sz: int | None = None,
        item_sz: int | None = None,
        layers: Sequence[int] = (100,),
        ps: Sequence[float] | float = 0.1,
        embed_p: float = 0.0,
        y_range: tuple[float, float] | None = (0.0, 5.5),
        use_bn: bool = False,
    ) -> None:
        super().__init__()
        self.n_users, self.n_items = int(n_users), int(n_items)
        self.user_sz = int(user_sz) if user_sz is not None else emb_sz_rule(self.n_users)
        self.item_sz = int(item_sz) if item_sz is not None else emb_sz_rule(self.n_items)
        self.layer_sizes = [int(n) for n in layers]
        self.ps = _expand_ps(ps, len(self.layer_sizes))
        self.embed_p = float(embed_p)
        self.y_range = _y_range(y_range)
        self.use_bn = bool(use_bn)
        self.user_emb = nn.Embedding(self.n_users, self.user_sz)
        self.item_emb = nn.Embedding(self.n_items, self.item_sz)
        init_embedding(self.user_emb)
        init_embedding(self.item_emb)
        self.emb_drop = nn.Dropout(self.embed_p)
        n_in = self.user_sz + self.item_sz
        self.layers = mlp_blocks(n_in, self.layer_sizes, self.ps, self.use_bn)
        self.head = nn.Linear(self.layer_sizes[-1] if self.layer_sizes else n_in, 1)

    def forward(self, users: Tensor, items: Tensor) -> Tensor:
        x = self.emb_drop(torch.cat([self.user_emb(users), self.item_emb(items)], dim=1))
        return _squash(self.head(self.layers(x)).squeeze(-1), self.y_range)

    def config(self) -> dict[str, Any]:
        return {
            "n_users": self.n_users,
            "n_items": self.n_items,
            "user_sz": self.user_sz,
            "item_sz": self.item_sz,
            "layers": list(self.layer_sizes),
            "ps": list(self.ps),
            "embed_p": self.embed_p,
            "y_range": None if self.y_range is None else list(self.y_range),
            "use_bn": self.use_bn,
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> EmbeddingNN:
        return cls(**cfg)

    def param_groups(self) -> list[list[nn.Parameter]]:
        """[embeddings, body, head]."""
        embs = [self.user_emb.weight, self.item_emb.weight]
        return [embs, list(self.layers.parameters()), list(self.head.parameters())]


CollabModel = DotProductBias | EmbeddingNN

# Bound on (user, item) pairs per EmbeddingNN forward pass when scoring all items.
MAX_PAIRS_PER_PASS = 1 << 20


def score_all_items(model: nn.Module, users: Tensor, chunk: int = 1024) -> Tensor:
    """Scores [m, n_items] of every item (index 0 included) for each user code.

    DotProductBias uses one matmul. EmbeddingNN runs the network on user x item pairs for at
    most `chunk` users per pass (fewer when n_items is large, so a pass stays under
    MAX_PAIRS_PER_PASS pairs). Runs under no_grad in eval mode; the model's mode is restored.
    """
    if not isinstance(model, DotProductBias | EmbeddingNN):
        raise TypeError(f"score_all_items supports DotProductBias/EmbeddingNN, got {type(model)}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    device = next(model.parameters()).device
    users = torch.as_tensor(users, dtype=torch.long, device=device).reshape(-1)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if isinstance(model, DotProductBias):
                return model.score_all(users)
            return _score_all_nn(model, users, chunk)
    finally:
        model.train(was_training)


def _score_all_nn(model: EmbeddingNN, users: Tensor, chunk: int) -> Tensor:
    n_items = model.n_items
    step = max(1, min(chunk, MAX_PAIRS_PER_PASS // max(n_items, 1)))
    all_items = torch.arange(n_items, device=users.device)
    out = torch.empty(len(users), n_items, device=users.device)
    for start in range(0, len(users), step):
        u = users[start : start + step]
        pair_users = u.repeat_interleave(n_items)
        pair_items = all_items.repeat(len(u))
        out[start : start + len(u)] = model(pair_users, pair_items).view(len(u), n_items)
    return out


def _sortable_keys(scores: np.ndarray) -> np.ndarray:
    """uint64 keys, one per (row, item), unique within a row: order by score desc, then index asc.

    The float32 score is mapped to order-preserving uint32 bits in the high word; the low word
    holds (n_items - 1 - index). Key 0 is never produced for a real item (reserved: excluded).
    """
    s = np.ascontiguousarray(scores, dtype=np.float32) + np.float32(0.0)  # -0.0 -> +0.0
    s = np.where(np.isnan(s), np.float32(-np.inf), s)
    bits = s.view(np.uint32)
    neg = (bits & np.uint32(0x80000000)) != 0
    ordered = np.where(neg, ~bits, bits | np.uint32(0x80000000)).astype(np.uint64)
    n = s.shape[1]
    low = (n - 1 - np.arange(n, dtype=np.uint64))[None, :]
    return (ordered << np.uint64(32)) | low


def exclusion_mask(
    m: int, n_items: int, exclude_indptr: np.ndarray | None, exclude_indices: np.ndarray | None
) -> np.ndarray:
    """Boolean [m, n_items], True where an item is excluded (item 0 always)."""
    mask = np.zeros((m, n_items), dtype=bool)
    mask[:, 0] = True
    if exclude_indptr is None and exclude_indices is None:
        return mask
    if exclude_indptr is None or exclude_indices is None:
        raise ValueError("exclude_indptr and exclude_indices must be given together")
    indptr = np.asarray(exclude_indptr, dtype=np.int64)
    indices = np.asarray(exclude_indices, dtype=np.int64)
    if indptr.shape != (m + 1,) or indptr[0] != 0 or indptr[-1] != len(indices):
        raise ValueError(f"exclude_indptr must have {m + 1} entries from 0 to len(indices)")
    if np.any(np.diff(indptr) < 0):
        raise ValueError("exclude_indptr must be non-decreasing")
    if len(indices) and (indices.min() < 0 or indices.max() >= n_items):
        raise ValueError(f"exclude_indices must lie in [0, {n_items})")
    rows = np.repeat(np.arange(m), np.diff(indptr))
    mask[rows, indices] = True
    return mask


def top_k(
    scores: Tensor,
    k: int,
    exclude_indptr: np.ndarray | None = None,
    exclude_indices: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Best k items per row: (indices int64 [m, k], scores float32 [m, k]).

    Item 0 (unknown) is always excluded, and row r also excludes
    exclude_indices[exclude_indptr[r]:exclude_indptr[r + 1]] (CSR). Order: higher score first,
    ties by lower item index. NaN scores rank below every number. When fewer than k items
    remain, the tail is padded with index -1 and score NaN.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    s = scores.detach().to("cpu", torch.float32).numpy() if isinstance(scores, Tensor) else scores
    s = np.asarray(s, dtype=np.float32)
    if s.ndim != 2:
        raise ValueError(f"scores must be [m, n_items], got shape {s.shape}")
    m, n = s.shape
    keys = _sortable_keys(s)
    keys[exclusion_mask(m, n, exclude_indptr, exclude_indices)] = 0
    kk = min(k, n)
    if kk == 0:
        cand = np.empty((m, 0), dtype=np.int64)
    elif kk < n:
        cand = np.argpartition(keys, n - kk, axis=1)[:, n - kk :]
    else:
        cand = np.broadcast_to(np.arange(n), (m, n))
    cand_keys = np.take_along_axis(keys, cand, axis=1)
    order = np.argsort(cand_keys, axis=1)[:, ::-1]  # keys are unique per row except the 0s
    idx = np.take_along_axis(cand, order, axis=1).astype(np.int64)
    valid = np.take_along_axis(cand_keys, order, axis=1) != 0
    out_scores = np.take_along_axis(s, idx, axis=1).astype(np.float32)
    idx = np.where(valid, idx, -1)
    out_scores = np.where(valid, out_scores, np.float32(np.nan))
    if kk < k:
        idx = np.pad(idx, ((0, 0), (0, k - kk)), constant_values=-1)
        out_scores = np.pad(out_scores, ((0, 0), (0, k - kk)), constant_values=np.nan)
    return idx, out_scores


def csr_from_pairs(rows: np.ndarray, cols: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(indptr, indices) of a CSR matrix with a 1 at each (row, col) pair, columns sorted per row."""
    order = np.lexsort((cols, rows))
    counts = np.bincount(rows, minlength=n_rows)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return indptr, cols[order].astype(np.int64)


def csr_rows(indptr: np.ndarray, indices: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CSR rows `rows` of (indptr, indices), as a new CSR (vectorized gather, no per-row Python)."""
    starts, ends = indptr[rows], indptr[rows + 1]
    lengths = ends - starts
    new_ptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    gather = np.repeat(starts - new_ptr[:-1], lengths) + np.arange(new_ptr[-1])
    return new_ptr, indices[gather]


def top_k_for_users(
    model: nn.Module,
    users: np.ndarray,
    k: int,
    exclude: tuple[np.ndarray, np.ndarray] | None = None,
    chunk: int = 2048,
) -> tuple[np.ndarray, np.ndarray]:
    """Best k items for each user code (all known, > 0): (indices [m, k], scores [m, k]).

    Scores every item per chunk of users and takes the top k, skipping for user u the items of
    CSR row u of `exclude` (e.g. the items seen in training); -1 / NaN pad short lists."""
    users = np.asarray(users, dtype=np.int64)
    idx = np.full((len(users), k), -1, dtype=np.int64)
    sc = np.full((len(users), k), np.nan, dtype=np.float32)
    for start in range(0, len(users), chunk):
        part = users[start : start + chunk]
        scores = score_all_items(model, torch.from_numpy(part))
        if exclude is not None:
            ptr, ind = csr_rows(exclude[0], exclude[1], part)
            idx[start : start + len(part)], sc[start : start + len(part)] = top_k(scores, k, ptr, ind)
        else:
            idx[start : start + len(part)], sc[start : start + len(part)] = top_k(scores, k)
    return idx, sc


def item_factors(model: nn.Module) -> Tensor:
    """Item embedding matrix [n_items, d] (detached)."""
    if not isinstance(model, DotProductBias | EmbeddingNN):
        raise TypeError(f"expected DotProductBias or EmbeddingNN, got {type(model)}")
    return model.item_emb.weight.detach()


def item_biases(model: nn.Module) -> Tensor | None:
    """Item bias vector [n_items] for DotProductBias; None for EmbeddingNN (it has none)."""
    if isinstance(model, DotProductBias):
        return model.item_bias.weight.detach().squeeze(1)
    if isinstance(model, EmbeddingNN):
        return None
    raise TypeError(f"expected DotProductBias or EmbeddingNN, got {type(model)}")


def similar_items(emb: Tensor, items: Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cosine nearest neighbours: (indices [m, k], similarities [m, k]), self and item 0 excluded."""
    emb = emb.detach().to(torch.float32)
    items_np = np.asarray(torch.as_tensor(items).reshape(-1).cpu().numpy(), dtype=np.int64)
    unit = emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12)
    sims = unit[torch.as_tensor(items_np, device=emb.device)] @ unit.T
    indptr = np.arange(len(items_np) + 1, dtype=np.int64)
    return top_k(sims, k, exclude_indptr=indptr, exclude_indices=items_np)
