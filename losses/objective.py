"""A margin head plus weighted auxiliary terms (Range, Center, DDL, IntraLoss) as one loss module."""
from __future__ import annotations

import inspect
from collections.abc import Mapping

from torch import Tensor, nn

from .head import MarginSoftmax

__all__ = ["WithAuxiliary"]


class WithAuxiliary(nn.Module):
    """loss = head(x, y) + Σ_k weight_k · aux_k(x, y) (Range loss arXiv 1611.08976 adds its term so, as do Center
    loss and DDL).

    Auxiliary modules take the same un-normalised embeddings and labels; keyword batch fields
    (e.g. `hard` sample flags for DDL) reach only the modules whose forward names them.
    """

    def __init__(self, head: MarginSoftmax, terms: Mapping[str, tuple[float, nn.Module]]) -> None:
        super().__init__()
        self.head = head
        self.aux = nn.ModuleDict({name: module for name, (_, module) in terms.items()})
        self.weights = {name: float(weight) for name, (weight, _) in terms.items()}
        self._accepts = {name: set(inspect.signature(module.forward).parameters) for name, module in self.aux.items()}

    def parts(self, embeddings: Tensor, labels: Tensor, **batch: Tensor) -> dict[str, Tensor]:
        """Each term, unweighted: {"head": …, name: …}."""
        out = {"head": self.head(embeddings, labels)}
        for name, module in self.aux.items():
            extra = {k: v for k, v in batch.items() if k in self._accepts[name]}
            out[name] = module(embeddings, labels, **extra)
        return out

    def forward(self, embeddings: Tensor, labels: Tensor, **batch: Tensor) -> Tensor:
        """The weighted sum of the head's loss and the auxiliary terms."""
        parts = self.parts(embeddings, labels, **batch)
        return parts.pop("head") + sum(self.weights[name] * value for name, value in parts.items())

    def end_epoch(self) -> None:
        """Forward the epoch hook to the head (KappaFace)."""
        self.head.end_epoch()
