"""Captions from labels, the table of their embeddings that text-conditioned training draws from, and
the conditions asked for at sampling time (``--class``, ``--label``, ``--prompt``).

A row of labels (one value per attribute, -1 = not given) and a template give a caption:
``{list}`` = "blue hair, red eyes", ``{and}`` = "blue hair and red eyes", ``{and_reversed}`` = "red eyes
and blue hair" (:data:`difflab.conditioning.DEFAULT_TEMPLATES`). With several attributes each part
reads "<value> <attribute>"; a one-attribute schema (e.g. Fashion-MNIST's classes) uses the value
alone. :class:`CaptionBank` embeds every caption the training can ask for once (every combination
of given/not-given attributes times every template, cached on disk by
:class:`~difflab.text.EmbeddingCache`) and looks rows up per batch, so training never runs the text
encoder.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from difflab.conditioning import Cond, CondConfig, TextMode
from difflab.data.labels import LabelSchema
from difflab.errors import ConfigError


def caption(schema: LabelSchema, row: Sequence[int], template: str) -> str:
    """The caption of one label row under ``template`` ('' when no attribute is given).

    Fields: ``{list}`` = "blue hair, red eyes", ``{and}`` = "blue hair and red eyes", ``{and_reversed}``
    = "red eyes and blue hair", and each attribute by name (``{hair}`` = "blue"), so templates can
    phrase an attribute freely ("{hair}-haired girl with {eyes} eyes"). A template naming an
    attribute the row leaves out (condition dropout drops attributes one by one) gives ``{list}``."""
    names = schema.names(row)
    parts = [value if len(schema.attributes) == 1 else f"{value} {attribute}"
             for attribute, value in names.items() if value is not None]
    if not parts:
        return ""
    joined = " and ".join(parts) if len(parts) < 3 else ", ".join(parts[:-1]) + " and " + parts[-1]
    reverse = list(reversed(parts))
    joined_rev = " and ".join(reverse) if len(reverse) < 3 else ", ".join(reverse[:-1]) + " and " + reverse[-1]
    given = {a: v for a, v in names.items() if v is not None}
    fields = {**given, "list": ", ".join(parts), "and": joined, "and_reversed": joined_rev}
    try:
        return template.format(**fields)
    except (KeyError, IndexError, ValueError) as e:
        if isinstance(e, KeyError) and e.args and e.args[0] in names:  # an attribute this row does not give
            return fields["list"]
        allowed = ", ".join("{" + f + "}" for f in ("list", "and", "and_reversed", *names))
        raise ConfigError(f"caption template {template!r}: use only {allowed} ({e})") from None


def filler_vocabulary(words: Sequence[str], schema: LabelSchema) -> list[str]:
    """The words :func:`template_variants` may insert: whole alphabetic words of three letters or more
    (no word pieces), none of them an attribute or value name, sorted (so variants do not depend on
    the tokenizer's dictionary order)."""
    banned = {w.lower() for a, vs in zip(schema.attributes, schema.classes) for w in (a, *vs)}
    return sorted({w for w in words if w.isascii() and w.isalpha() and len(w) >= 3 and w.lower() not in banned})


def explicit_fields(template: str, schema: LabelSchema) -> str:
    """``template`` with {list}, {and} and {and_reversed} written out per attribute ("{list}" ->
    "{hair} hair, {eyes} eyes"), the same captions for rows that give every attribute, but with word
    boundaries between each value and its attribute name, where :func:`template_variants` may insert
    words ("blue hair" -> "blue shiny hair"), so the network cannot read a colour off the position
    just before "hair". One-attribute schemas are left as they are (the value stands alone)."""
    if len(schema.attributes) < 2:
        return template
    parts = [f"{{{a}}} {a}" for a in schema.attributes]
    rev = list(reversed(parts))

    def joined(ps: list[str]) -> str:
        return " and ".join(ps) if len(ps) < 3 else ", ".join(ps[:-1]) + " and " + ps[-1]

    return template.replace("{list}", ", ".join(parts)).replace("{and_reversed}", joined(rev)).replace("{and}", joined(parts))


def template_variants(templates: Sequence[str], variants: int, vocabulary: Sequence[str], seed: int = 0,
                      accept: Callable[[str], bool] = lambda text: True) -> list[str]:
    """``templates`` followed by ``variants`` copies of each with one to three words of ``vocabulary``
    inserted at random word boundaries (fields such as ``{list}`` stay whole), drawn from ``seed``:
    "a girl with {and}" -> "a girl quietly with {and} harbour". Duplicates, and variants ``accept``
    rejects (e.g. too long for the encoder's token window), are left out; a template with no
    acceptable variant in ``100 * variants`` draws gets fewer."""
    if variants and not vocabulary:
        raise ConfigError("cond.caption_variants: the text encoder's vocabulary has no usable filler words")
    g = torch.Generator().manual_seed(seed)
    out, seen = list(templates), set(templates)
    for template in templates:
        made, tries = 0, 0
        while made < variants and tries < 100 * variants:
            tries += 1
            words = template.split(" ")
            for _ in range(int(torch.randint(1, 4, (), generator=g))):
                at = int(torch.randint(0, len(words) + 1, (), generator=g))
                words.insert(at, vocabulary[int(torch.randint(0, len(vocabulary), (), generator=g))])
            text = " ".join(words)
            if text not in seen and accept(text):
                seen.add(text)
                out.append(text)
                made += 1
    return out


class CaptionBank:
    """Every caption training may use, embedded once: ``lookup(labels, template_index)`` gives the
    ``text`` (and ``text_tokens``/``text_mask``) conditions of a batch; rows with no attribute given
    get the null text (zeros, no tokens)."""

    def __init__(self, schema: LabelSchema, templates: Sequence[str], mode: TextMode, encoder: str,
                 *, variants: int = 0, progress: bool = True) -> None:
        from difflab.text import EmbeddingCache, TextEncoder

        text_encoder = TextEncoder(encoder)
        if variants:
            tokenizer = text_encoder.model.tokenizer
            rows = [r for r in itertools.product(*[range(n) for n in schema.sizes])]

            def fits(template: str) -> bool:  # every caption keeps all its words within the token window
                return max(len(tokenizer.tokenize(caption(schema, r, template))) for r in rows) + 2 <= text_encoder.max_tokens

            vocab = filler_vocabulary(tokenizer.get_vocab(), schema)
            extra = template_variants([explicit_fields(t, schema) for t in templates], variants, vocab, accept=fits)
            templates = [*templates, *extra[len(templates):]]
        self.schema, self.templates, self.mode = schema, tuple(templates), mode
        # every combination of "value or not given" over the attributes, all-not-given excluded
        self.rows = [r for r in itertools.product(*[range(-1, n) for n in schema.sizes]) if any(v >= 0 for v in r)]
        self._index = {row: i for i, row in enumerate(self.rows)}
        texts = [caption(schema, row, t) for row in self.rows for t in self.templates]
        emb = EmbeddingCache().get(text_encoder, texts)
        n, k = len(self.rows), len(self.templates)
        self.pooled = emb.pooled.reshape(n, k, -1)
        self.tokens = emb.tokens.reshape(n, k, *emb.tokens.shape[1:])
        self.mask = emb.mask.reshape(n, k, -1)
        self.dim = self.pooled.shape[-1]

    def lookup(self, labels: Tensor, template: Tensor) -> Cond:
        """Conditions for label rows (B, A) (-1 = not given) and template indices (B,)."""
        labels, template = labels.cpu(), template.cpu()
        rows = [self._index.get(tuple(r), -1) for r in labels.tolist()]
        idx = torch.tensor(rows)
        given = idx >= 0
        safe = idx.clamp(min=0)
        cond: Cond = {}
        if self.mode is not TextMode.TOKENS:
            cond["text"] = torch.where(given[:, None], self.pooled[safe, template], torch.zeros(()))
        if self.mode is not TextMode.POOLED:
            cond["text_tokens"] = torch.where(given[:, None, None], self.tokens[safe, template], torch.zeros(()))
            cond["text_mask"] = self.mask[safe, template] & given[:, None]
        return cond


@dataclass(frozen=True)
class Request:
    """One condition asked for at sampling time: label indices (-1 = not given) or a prompt."""

    description: str
    labels: tuple[int, ...] | None = None
    prompt: str | None = None


def requests(cond: CondConfig, classes: str | None = None, labels: Sequence[str] = (),
             prompts: Sequence[str] = ()) -> list[Request]:
    """The requests of ``--class A,B|all``, ``--label hair=blue,eyes=red`` (repeatable) and ``--prompt``
    (repeatable), checked against what the run was trained on; [] means unconditional."""
    schema = cond.schema
    if (classes or labels) and schema is None:
        raise ConfigError("--class/--label: this run was trained without labels (train with --labels)")
    if prompts and not cond.captions:
        raise ConfigError("--prompt: this run was not trained on captions (train with --labels FILE --captions)")
    out: list[Request] = []
    if classes:
        assert schema is not None
        if len(schema.attributes) != 1:
            raise ConfigError(f"--class is for runs with one label attribute; this run has {', '.join(schema.attributes)}: "
                              "use --label attribute=value,...")
        names = schema.classes[0] if classes.strip().lower() == "all" else [c.strip() for c in classes.split(",")]
        for name in names:
            try:
                row = schema.parse(name)
            except ConfigError as e:
                raise ConfigError(str(e).replace("--label", "--class", 1)) from None
            out.append(Request(schema.describe(row), labels=tuple(row)))
    for text in labels:
        assert schema is not None
        row = schema.parse(text)
        out.append(Request(schema.describe(row), labels=tuple(row)))
    for prompt in prompts:
        if not prompt.strip():
            raise ConfigError("--prompt must not be empty (leave it out to sample unconditionally)")
        out.append(Request(f"prompt {prompt!r}", prompt=prompt))
    return out


def condition_rows(cond: CondConfig, reqs: Sequence[Request], n: int) -> Cond:
    """Per-image conditions for ``n`` images of each request, request after request (the keywords of
    :func:`difflab.samplers.sample_batches`). Label requests on a caption-trained run become the
    caption of the run's first template; prompts go through the run's text encoder."""
    if not reqs:
        return {}
    if not cond.captions:
        return {"labels": torch.tensor([r.labels for r in reqs]).repeat_interleave(n, 0)}
    from difflab.text import EmbeddingCache, TextEncoder

    schema = cond.schema
    assert schema is not None
    texts = [r.prompt if r.prompt is not None else caption(schema, r.labels or (), cond.templates[0]) for r in reqs]
    emb = EmbeddingCache().get(TextEncoder(cond.text_encoder), texts)
    out: Cond = {}
    if cond.text_mode is not TextMode.TOKENS:
        out["text"] = emb.pooled.repeat_interleave(n, 0)
    if cond.text_mode is not TextMode.POOLED:
        out["text_tokens"] = emb.tokens.repeat_interleave(n, 0)
        out["text_mask"] = emb.mask.repeat_interleave(n, 0)
    return out
