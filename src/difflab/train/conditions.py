"""The conditions a training batch carries (labels, or captions as text), with condition dropout, and
the fixed conditions of the preview grids. Unconditional runs draw no random numbers here, so their
training randomness is what it was before conditioning existed."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from difflab.conditioning import Cond, CondConfig, drop
from difflab.data.labels import Labels
from difflab.devices import to_device
from difflab.errors import ConfigError


def add_text_noise(cond: Cond, scale: float, generator: torch.Generator) -> Cond:
    """Conditioning augmentation: Gaussian noise on every given text vector (the pooled ``text`` rows
    that are not all zero, the ``text_tokens`` under ``text_mask``), ``scale`` times that vector's RMS.
    Null conditions stay exactly null, so guidance still pairs with the true unconditional model."""
    out = dict(cond)
    for key in ("text", "text_tokens"):
        if key not in cond:
            continue
        v = cond[key]
        given = (v != 0).any(-1, keepdim=True) if key == "text" else cond["text_mask"][..., None]
        rms = v.pow(2).mean(-1, keepdim=True).sqrt()
        noise = torch.randn(v.shape, generator=generator, dtype=v.dtype)
        out[key] = torch.where(given, v + scale * rms * noise, v)
    return out


class TrainingConditions:
    """``batch(indices, generator)`` -> the condition keywords of those training images (dropped at
    rate ``cond_dropout``); ``preview(n)`` -> fixed conditions for the sample grids (one class per
    grid row for one attribute; rows spread over the data for several)."""

    def __init__(self, cond: CondConfig, labels: Labels | None, cond_dropout: float, device: torch.device,
                 *, progress: bool = True) -> None:
        schema = cond.schema
        self.device, self.p, self.noise = device, cond_dropout, float(cond.text_noise)
        self.labels = None if schema is None or labels is None else labels.in_schema(schema)
        if schema is not None and labels is None:
            raise ConfigError("the run is conditioned on labels but the data came without them (data.labels)")
        self.bank = None
        if schema is not None and cond.captions:
            from difflab.captions import CaptionBank

            self.bank = CaptionBank(schema, cond.templates, cond.text_mode, cond.text_encoder,
                                    variants=cond.caption_variants, progress=progress)

    @property
    def active(self) -> bool:
        return self.labels is not None

    def _to_cond(self, labels: torch.Tensor, template: torch.Tensor) -> Cond:
        if self.bank is None:
            return {"labels": to_device(labels, self.device)}
        return {k: to_device(v, self.device) for k, v in self.bank.lookup(labels, template).items()}

    def batch(self, indices: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator]) -> Cond:
        """The conditions of the training images ``indices``; ``generator`` may be one per image (each
        image's dropout, template and text noise then come from its own)."""
        if self.labels is None:
            return {}
        if not isinstance(generator, torch.Generator):
            rows = [self.batch(indices[i:i + 1], g) for i, g in enumerate(generator)]
            return {key: torch.cat([row[key] for row in rows]) for key in rows[0]}
        labels = drop({"labels": self.labels[indices]}, self.p, generator)["labels"]
        template = torch.zeros(len(indices), dtype=torch.long)
        if self.bank is None:
            return self._to_cond(labels, template)
        template = torch.randint(0, len(self.bank.templates), (len(indices),), generator=generator)
        cond = self.bank.lookup(labels, template)
        if self.noise:
            cond = add_text_noise(cond, self.noise, generator)
        return {k: to_device(v, self.device) for k, v in cond.items()}

    def preview(self, n: int) -> Cond:
        if self.labels is None:
            return {}
        if self.labels.shape[1] == 1:  # one class per row of the (square) grid
            k, per_row = int(self.labels.max()) + 1, max(1, math.ceil(math.sqrt(n)))
            rows = (torch.arange(n) // per_row % k)[:, None]
        else:
            rows = self.labels[torch.linspace(0, len(self.labels) - 1, n).long()]
        return self._to_cond(rows, torch.zeros(n, dtype=torch.long))
