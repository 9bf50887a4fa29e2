"""How a condition enters the UNet's embedding: class/attribute labels and a pooled text vector.

The UNet adds ``ConditionEmbedding(labels, text)`` to its time embedding (Ho & Salimans 2022's
class-conditional DDPM does the same with one label; a pooled sentence embedding goes in the same
way, as in GLIDE's and Imagen's pooled text conditioning). Token embeddings for cross-attention are
handled by :class:`difflab.models.layers.CrossAttention`.

Absent conditions are part of the model, so one network is both conditional and unconditional
(classifier-free guidance): a label of -1 means "not given" and selects a learned null embedding of
that attribute (index 0 of its table); an all-zero text vector means "no text".
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from difflab.errors import DifflabError


class ConditionEmbedding(nn.Module):
    """``labels`` (B, A) or (B,) int64 in -1 .. size-1 -> sum of one embedding per attribute; ``text``
    (B, text_dim) -> a linear map; the sum, shape (B, emb_dim), or None when the model takes neither."""

    def __init__(self, label_sizes: Sequence[int], text_dim: int, emb_dim: int):
        super().__init__()
        self.label_sizes = tuple(label_sizes)
        self.labels = nn.ModuleList(nn.Embedding(size + 1, emb_dim) for size in self.label_sizes)
        self.text = nn.Linear(text_dim, emb_dim) if text_dim else None

    @property
    def active(self) -> bool:
        return bool(self.label_sizes) or self.text is not None

    def _check_labels(self, labels: torch.Tensor, batch: int) -> torch.Tensor:
        if labels.ndim == 1:
            labels = labels[:, None]
        a = len(self.label_sizes)
        if labels.shape != (batch, a) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise DifflabError(f"UNet: labels must be integers of shape ({batch}, {a}) (-1 = not given), "
                               f"got {labels.dtype} of shape {tuple(labels.shape)}")
        sizes = torch.tensor(self.label_sizes, device=labels.device)
        if bool(((labels < -1) | (labels >= sizes)).any()):
            raise DifflabError(f"UNet: labels must lie in -1 .. size-1 for sizes {list(self.label_sizes)}")
        return labels.long()

    def forward(self, batch: int, device: torch.device, labels: torch.Tensor | None = None,
                text: torch.Tensor | None = None) -> torch.Tensor | None:
        if labels is not None and not self.label_sizes:
            raise DifflabError("UNet: labels given, but this model takes none (label_sizes is empty)")
        if text is not None and self.text is None:
            raise DifflabError("UNet: text given, but this model takes none (text_dim=0)")
        out: torch.Tensor | None = None
        if self.label_sizes:
            idx = (self._check_labels(labels.to(device), batch) if labels is not None
                   else torch.full((batch, len(self.label_sizes)), -1, dtype=torch.long, device=device))
            for a, table in enumerate(self.labels):
                e = table(idx[:, a] + 1)
                out = e if out is None else out + e
        if self.text is not None:
            dim = self.text.in_features
            if text is None:
                text = torch.zeros(batch, dim, device=device)
            elif text.shape != (batch, dim):
                raise DifflabError(f"UNet: text must have shape ({batch}, {dim}), got {tuple(text.shape)}")
            e = self.text(text.to(device=device, dtype=self.text.weight.dtype))
            out = e if out is None else out + e
        return out
