"""What a model is conditioned on: :class:`CondConfig` (saved with the run: attribute and class names,
text options) and the conditions a network takes, as keyword arguments of ``network(x, t, **cond)``:

| key           | shape          | meaning                                                        |
| ------------- | -------------- | -------------------------------------------------------------- |
| ``labels``    | (B, A) int64   | one class index per attribute; -1 = that attribute not given   |
| ``text``      | (B, D) float   | pooled text embedding; an all-zero row = no text               |
| ``text_tokens``, ``text_mask`` | (B, L, D), (B, L) bool | token embeddings for cross-attention; mask False = no token |

Every per-image condition has the batch first, so a sample set of N images carries N rows and a
batch takes its slice (:func:`take`). The helpers here give the null condition (what classifier-free
guidance pairs each conditional call with), join two conditions into one batch, and drop conditions
at random during training so one model learns both the conditional and the unconditional denoiser.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from difflab.data.labels import LabelSchema
from difflab.errors import ConfigError, parse_choice

Cond = dict[str, Tensor]


class TextMode(str, Enum):
    """How a caption's embedding reaches the UNet (``cond.text_mode``)."""

    POOLED = "pooled"  # the sentence vector, added to the time embedding
    TOKENS = "tokens"  # the token embeddings, through cross-attention at the low resolutions
    BOTH = "both"


# Captions built from a row of labels: {list} = "blue hair, red eyes", {and} = "blue hair and red eyes",
# {and_reversed} = "red eyes and blue hair" (one attribute: its value alone, e.g. "Trouser"), and each
# attribute by name, {hair} = "blue" (difflab.captions.caption).
DEFAULT_TEMPLATES = ("{list}", "a girl with {and}", "anime face, {list}", "{and_reversed}",
                     "a character with {and}", "a drawing of {and}")


@dataclass(frozen=True)
class CondConfig:
    """The run's conditioning, filled in from the data when the config is resolved (``--labels``).

    ``attributes``/``classes`` name the label columns and their values (so ``sample`` takes names);
    ``captions`` conditions on text instead: each training image gets a caption built from its labels
    and one of ``templates`` (drawn per step), embedded once per distinct caption by ``text_encoder``.
    """

    attributes: tuple[str, ...] = ()
    classes: tuple[tuple[str, ...], ...] = ()
    captions: bool = False
    text_encoder: str = "all-MiniLM-L6-v2"
    text_mode: TextMode = TextMode.BOTH  # measured: cross-attention binds colours to hair/eyes, pooled cannot
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    # Training-time augmentations of the text condition (sampling ignores them): caption_variants extra
    # copies of every template with one to three random words of the encoder's vocabulary inserted
    # between its words (so the network learns to ignore words it was never taught), and text_noise,
    # Gaussian noise added to given text embeddings, as a fraction of each vector's RMS (StackGAN's
    # conditioning augmentation, fixed instead of learned), so nearby unseen sentences map nearby.
    caption_variants: int = 0
    text_noise: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "text_mode", parse_choice(TextMode, self.text_mode, "cond.text_mode"))
        if isinstance(self.caption_variants, bool) or not isinstance(self.caption_variants, int) or self.caption_variants < 0:
            raise ConfigError(f"cond.caption_variants must be an integer >= 0, got {self.caption_variants!r}")
        if isinstance(self.text_noise, bool) or not isinstance(self.text_noise, (int, float)) or not 0 <= self.text_noise < 10:
            raise ConfigError(f"cond.text_noise must be a number in [0, 10), got {self.text_noise!r}")
        if self.attributes or self.classes:
            LabelSchema(self.attributes, self.classes)  # checks names and lengths
        if self.captions and not self.templates:
            raise ConfigError("cond.templates must hold at least one caption template")

    @property
    def schema(self) -> LabelSchema | None:
        return LabelSchema(self.attributes, self.classes) if self.attributes else None

KEYS = ("labels", "text", "text_tokens", "text_mask")


def null_condition(cond: Cond) -> Cond:
    """The same keys, with nothing given: labels -1, zero text, no tokens."""
    out: Cond = {}
    for key, value in cond.items():
        if key == "labels":
            out[key] = torch.full_like(value, -1)
        elif key == "text_mask":
            out[key] = torch.zeros_like(value)
        else:
            out[key] = torch.zeros_like(value)
    return out


def is_null(cond: Cond) -> bool:
    """True when no condition is given for any example (guidance would change nothing)."""
    for key, value in cond.items():
        if key == "labels" and bool((value >= 0).any()):
            return False
        if key in ("text", "text_mask") and bool(value.bool().any()):
            return False
    return True


def concat(a: Cond, b: Cond) -> Cond:
    """One batch holding ``a``'s examples, then ``b``'s (same keys)."""
    if a.keys() != b.keys():
        raise ValueError(f"cannot join conditions with keys {sorted(a)} and {sorted(b)}")
    return {key: torch.cat([a[key], b[key].to(a[key].device)]) for key in a}


def take(cond: Cond, rows: slice, n: int) -> Cond:
    """The rows of a per-image condition for one batch: tensors with ``n`` rows (one per image of the
    sample set) are sliced; tensors with one row apply to every image and are expanded."""
    batch = len(range(n)[rows])
    out: Cond = {}
    for key, value in cond.items():
        if value.shape[0] == n:
            out[key] = value[rows]
        elif value.shape[0] == 1:
            out[key] = value.expand(batch, *value.shape[1:])
        else:
            raise ValueError(f"condition {key!r} has {value.shape[0]} rows for {n} images (give 1 or {n})")
    return out


def drop(cond: Cond, p: float, generator: torch.Generator) -> Cond:
    """Training-time condition dropout (Ho & Salimans 2022): each example loses its whole condition
    with probability ``p``; with several label attributes, each attribute is also dropped on its own
    with probability ``p`` (so ``--label hair=blue`` alone, eyes not given, is something the model has
    seen). Draws from ``generator`` only when there is a condition and ``p > 0``."""
    if not cond or p <= 0:
        return cond
    first = next(iter(cond.values()))
    n = first.shape[0]
    gone = torch.rand(n, generator=generator) < p
    out = dict(cond)
    for key, value in cond.items():
        mask = gone.to(value.device).reshape(-1, *[1] * (value.ndim - 1))
        if key == "labels":
            if value.ndim == 2 and value.shape[1] > 1:
                mask = mask | (torch.rand(value.shape, generator=generator) < p).to(value.device)
            out[key] = torch.where(mask, torch.full_like(value, -1), value)
        else:
            out[key] = torch.where(mask, torch.zeros_like(value), value)
    return out
