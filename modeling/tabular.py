"""Entity-embedding MLP for tabular regression/classification."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from modeling.dropout import SparseDropout

EMB_INIT_STD = 0.01


def sigmoid_range(x: Tensor, low: float, high: float) -> Tensor:
    """Squash to [low, high]; the clamp guards float rounding at the saturated ends."""
    return (torch.sigmoid(x) * (high - low) + low).clamp(min=low, max=high)


def default_y_range(y: Any, pad: float = 0.05) -> tuple[float, float]:
    """A y_range just wider than the observed targets, so extremes stay reachable by a sigmoid."""
    arr = y.detach().cpu().numpy() if isinstance(y, Tensor) else np.asarray(y)
    arr = np.asarray(arr, dtype=np.float64).ravel()
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        raise ValueError("default_y_range needs at least one finite target value")
    lo, hi = float(arr.min()), float(arr.max())
    span = hi - lo
    if span == 0:
        span = max(abs(hi), 1.0)
    return lo - pad * span, hi + pad * span


def init_embedding(emb: nn.Embedding, std: float = EMB_INIT_STD) -> None:
    """Small truncated-normal start so untrained (and unknown-token) rows contribute ~0."""
    with torch.no_grad():
        nn.init.trunc_normal_(emb.weight, mean=0.0, std=std, a=-2 * std, b=2 * std)


DEFAULT_PS = (0.001, 0.01)


def _expand_ps(ps: Sequence[float] | float, n: int) -> list[float]:
    """One dropout per hidden layer: a float is broadcast; the untouched default adapts to n."""
    if isinstance(ps, int | float):
        return [float(ps)] * n
    if ps is DEFAULT_PS and n != len(DEFAULT_PS):
        return [DEFAULT_PS[0]] * (n - 1) + [DEFAULT_PS[1]] if n else []
    ps = [float(p) for p in ps]
    if len(ps) != n:
        raise ValueError(f"ps has {len(ps)} dropout values but there are {n} hidden layers")
    return ps


def mlp_blocks(
    n_in: int, layers: Sequence[int], ps: Sequence[float], use_bn: bool
) -> nn.Sequential:
    """Linear -> ReLU -> [BatchNorm1d] -> [Dropout] per hidden layer, kaiming-initialised."""
    blocks: list[nn.Module] = []
    for n_out, p in zip(layers, ps, strict=True):
        lin = nn.Linear(n_in, int(n_out))
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        nn.init.zeros_(lin.bias)
        parts: list[nn.Module] = [lin, nn.ReLU()]
        if use_bn:
            parts.append(nn.BatchNorm1d(int(n_out)))
        if p > 0:
            parts.append(SparseDropout(p))
        blocks.append(nn.Sequential(*parts))
        n_in = int(n_out)
    return nn.Sequential(*blocks)


class TabularModel(nn.Module):
    """Embeddings for categorical codes + (batch-normed) continuous inputs -> MLP -> output."""

    def __init__(
        self,
        emb_szs: Sequence[tuple[int, int]],
        n_cont: int,
        out_sz: int = 1,
        layers: Sequence[int] = (1000, 500),
        ps: Sequence[float] | float = DEFAULT_PS,
        embed_p: float = 0.04,
        y_range: tuple[float, float] | None = None,
        use_bn: bool = True,
        bn_cont: bool = True,
    ) -> None:
        super().__init__()
        self.emb_szs = [(int(n), int(d)) for n, d in emb_szs]
        self.n_cont, self.out_sz = int(n_cont), int(out_sz)
        self.layer_sizes = [int(n) for n in layers]
        self.ps = _expand_ps(ps, len(self.layer_sizes))
        self.embed_p = float(embed_p)
        self.y_range = None if y_range is None else (float(y_range[0]), float(y_range[1]))
        self.use_bn, self.use_bn_cont = bool(use_bn), bool(bn_cont)
        if self.y_range is not None and not self.y_range[0] < self.y_range[1]:
            raise ValueError(f"y_range must be (low, high) with low < high, got {y_range}")
        n_emb = sum(d for _, d in self.emb_szs)
        if n_emb + self.n_cont == 0:
            raise ValueError("TabularModel needs at least one categorical or continuous input")

        self.embeds = nn.ModuleList(nn.Embedding(n, d) for n, d in self.emb_szs)
        for emb in self.embeds:
            init_embedding(emb)
        self.emb_drop = SparseDropout(self.embed_p)
        self.bn_cont = nn.BatchNorm1d(self.n_cont) if self.n_cont > 0 and bn_cont else None
        self.layers = mlp_blocks(n_emb + self.n_cont, self.layer_sizes, self.ps, self.use_bn)
        n_last = self.layer_sizes[-1] if self.layer_sizes else n_emb + self.n_cont
        self.head = nn.Linear(n_last, self.out_sz)

    def forward(self, x_cat: Tensor, x_cont: Tensor) -> Tensor:
        parts: list[Tensor] = []
        if self.embeds:
            if x_cat.dim() != 2 or x_cat.shape[1] != len(self.embeds):
                raise ValueError(f"x_cat must be [n, {len(self.embeds)}], got {tuple(x_cat.shape)}")
            embs = [emb(x_cat[:, i]) for i, emb in enumerate(self.embeds)]
            parts.append(self.emb_drop(torch.cat(embs, dim=1)))
        if self.n_cont:
            if x_cont.dim() != 2 or x_cont.shape[1] != self.n_cont:
                raise ValueError(f"x_cont must be [n, {self.n_cont}], got {tuple(x_cont.shape)}")
            xc = x_cont.float()
            parts.append(self.bn_cont(xc) if self.bn_cont is not None else xc)
        h = self.layers(torch.cat(parts, dim=1))
        if torch.is_autocast_enabled(h.device.type):  # bf16 hidden layers, a float32 output layer:
            with torch.autocast(h.device.type, enabled=False):  # bf16 would round log(Sales) ~9 to 0.03
                x = self.head(h.float())
        else:
            x = self.head(h)
        if self.y_range is not None:
            x = sigmoid_range(x, *self.y_range)
        return x.squeeze(-1) if self.out_sz == 1 else x

    def init_output_bias(self, target_mean: float) -> None:
        """Start predictions at the target mean, so early loss reflects signal, not offset.

        Without it a sigmoid-ranged head starts mid-range, the first steps only shift the
        output, and the lr finder's curve keeps falling up to absurd learning rates.
        """
        with torch.no_grad():
            if self.y_range is None:
                self.head.bias.fill_(float(target_mean))
                return
            low, high = self.y_range
            frac = min(max((float(target_mean) - low) / (high - low), 1e-4), 1 - 1e-4)
            self.head.bias.fill_(float(np.log(frac / (1 - frac))))

    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor kwargs."""
        return {
            "emb_szs": [[n, d] for n, d in self.emb_szs],
            "n_cont": self.n_cont,
            "out_sz": self.out_sz,
            "layers": list(self.layer_sizes),
            "ps": list(self.ps),
            "embed_p": self.embed_p,
            "y_range": None if self.y_range is None else list(self.y_range),
            "use_bn": self.use_bn,
            "bn_cont": self.use_bn_cont,
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> TabularModel:
        cfg = dict(cfg)
        cfg["emb_szs"] = [(int(n), int(d)) for n, d in cfg["emb_szs"]]
        if cfg.get("y_range") is not None:
            cfg["y_range"] = tuple(cfg["y_range"])
        return cls(**cfg)

    def param_groups(self) -> list[list[nn.Parameter]]:
        """[embeddings, body (bn_cont + hidden blocks), head]; the first may be empty."""
        body = list(self.bn_cont.parameters()) if self.bn_cont is not None else []
        body += list(self.layers.parameters())
        return [list(self.embeds.parameters()), body, list(self.head.parameters())]


def new_tabular_model(emb_szs: Sequence[tuple[int, int]], n_cont: int, layers: Sequence[int], ps: Sequence[float],
                      embed_p: float, y_range: tuple[float, float] | None, target_mean: float) -> TabularModel:
    """A freshly initialised TabularModel (draws from the global torch generator) with its output
    started at `target_mean`: a module-level builder that `functools.partial` can bind, so a worker
    process can build the same network (`modeling.training.background`)."""
    model = TabularModel(emb_szs, n_cont, layers=layers, ps=ps, embed_p=embed_p, y_range=y_range)
    model.init_output_bias(target_mean)
    return model
