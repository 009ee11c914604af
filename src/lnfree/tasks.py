"""Tasks for circuit analyses: the IOI prompt generator and its metrics.

IOI (indirect object identification, Wang et al. 2022) in the BABA form the paper patches:

    clean:   "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to"   -> " [A]"
    corrupt: "Then, [A] and [B] went to the [PLACE]. [A] gave a [OBJECT] to"   -> " [B]"

A is the indirect object (IO, the answer), B the subject (S, the wrong answer); the corrupted
prompt swaps IO and S, so the clean logit difference logit(IO) - logit(S) flips sign there.
Every name, place and object is a single token (with its leading space) for the tokenizer used,
so all prompts have the same length and the answer is predicted at the last position.

A *metric* is a callable ``logits[batch, pos, vocab] -> tensor[batch]`` (one value per prompt);
the patching functions average it over prompts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from jaxtyping import Float, Int

Metric = Callable[[torch.Tensor], torch.Tensor]

TEMPLATE = "Then, {B} and {A} went to the {PLACE}. {B} gave a {OBJECT} to"

# ~100 common English first names; only those that are one token (with a leading space) are used.
NAMES = (
    "Mary John Michael David James Robert William Richard Thomas Charles Daniel Matthew Anthony Mark "
    "Paul Steven Andrew Kenneth Joshua Kevin Brian George Edward Ronald Timothy Jason Jeffrey Ryan "
    "Jacob Gary Nicholas Eric Jonathan Stephen Larry Justin Scott Brandon Frank Benjamin Gregory "
    "Samuel Raymond Patrick Alexander Jack Dennis Jerry Tyler Aaron Jose Adam Henry Nathan Peter "
    "Zachary Kyle Walter Harold Carl Jeremy Keith Roger Arthur Lawrence Sean Christian Albert Joe "
    "Ethan Austin Jesse Willie Billy Bryan Bruce Jordan Ralph Roy Noah Dylan Eugene Wayne Alan Juan "
    "Louis Russell Gabriel Randy Philip Harry Vincent Bobby Johnny Logan Patricia Jennifer Linda "
    "Elizabeth Barbara Susan Jessica Sarah Karen Nancy Lisa Betty Margaret Sandra Ashley Kimberly "
    "Emily Donna Michelle Dorothy Carol Amanda Melissa Deborah Stephanie Rebecca Laura Sharon Cynthia "
    "Kathleen Amy Shirley Angela Helen Anna Brenda Pamela Nicole Emma Samantha Katherine Christine "
    "Debra Rachel Catherine Carolyn Janet Ruth Maria Heather Diane Virginia Julie Joyce Victoria "
    "Kelly Christina Lauren Joan Evelyn Olivia Judith Megan Cheryl Martha Andrea Frances Hannah "
    "Jacqueline Ann Gloria Jean Kathryn Alice Teresa Sara Janice Doris Madison Julia Grace Judy "
    "Abigail Marie Denise Beverly Amber Theresa Marilyn Danielle Diana Brittany Natalie Sophia Rose "
    "Isabella Alexis Kayla Charlotte"
).split()
PLACES = (
    "store garden restaurant school hospital office house station park church market library bank "
    "beach farm hotel museum airport lake river"
).split()
OBJECTS = (
    "ring bone book computer necklace drink snack basketball ball bottle letter hat bag pen cake "
    "flower key card gift phone"
).split()

_BOS_STRINGS = ("<|endoftext|>", "<s>", "<bos>", "[BOS]", "<|begin_of_text|>")
MIN_NAMES = 4


# ---- tokenizer adapter ---------------------------------------------------------------------
def _tokenizer_adapter(tokenizer) -> tuple[Callable[[str], list[int]], Callable[[list[int]], str], Optional[int]]:
    """(encode without special tokens, decode, BOS id or None) for HF, `tokenizers`, tiktoken."""
    try:
        from transformers import PreTrainedTokenizerBase
    except ImportError:  # pragma: no cover - transformers is a dependency
        PreTrainedTokenizerBase = ()
    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return (lambda s: list(tokenizer.encode(s, add_special_tokens=False))), tokenizer.decode, tokenizer.bos_token_id
    try:
        import tokenizers

        if isinstance(tokenizer, tokenizers.Tokenizer):
            bos = next((tokenizer.token_to_id(t) for t in _BOS_STRINGS if tokenizer.token_to_id(t) is not None), None)
            return (lambda s: list(tokenizer.encode(s, add_special_tokens=False).ids)), tokenizer.decode, bos
    except ImportError:  # pragma: no cover
        pass
    if hasattr(tokenizer, "encode_ordinary") and hasattr(tokenizer, "eot_token"):  # tiktoken.Encoding
        return (lambda s: list(tokenizer.encode_ordinary(s))), tokenizer.decode, tokenizer.eot_token
    if callable(getattr(tokenizer, "encode", None)) and callable(getattr(tokenizer, "decode", None)):

        def encode(s: str) -> list[int]:
            out = tokenizer.encode(s)
            return list(getattr(out, "ids", out))

        return encode, tokenizer.decode, getattr(tokenizer, "bos_token_id", None)
    raise TypeError(
        f"tokenizer must be a Hugging Face tokenizer, a tokenizers.Tokenizer, a tiktoken Encoding or have "
        f".encode(text) and .decode(ids); got {type(tokenizer).__name__}"
    )


def _single_tokens(encode, decode, words: Sequence[str]) -> list[str]:
    """Words that are one token with a leading space, and not an unknown-token stand-in."""
    out = []
    for w in words:
        ids = encode(" " + w)
        if len(ids) == 1 and decode(ids).strip() == w:
            out.append(w)
    return out


def single_token_words(tokenizer, words: Sequence[str]) -> list[str]:
    """The words that encode (with a leading space) to exactly one token.

    Example:
        >>> from lnfree.tokenizer import gpt2_tokenizer  # doctest: +SKIP
        >>> single_token_words(gpt2_tokenizer(), ["Mary", "Xylophonia"])  # doctest: +SKIP
        ['Mary']
    """
    encode, decode, _ = _tokenizer_adapter(tokenizer)
    return _single_tokens(encode, decode, words)


# ---- the batch -----------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class IOIBatch:
    """Clean and corrupted IOI prompts of one fixed length.

    Attributes:
        clean, corrupt: Int[batch, pos] token ids (BOS first if the tokenizer has one).
        answer: Int[batch] the IO name's token (correct on the clean prompt).
        wrong: Int[batch] the S name's token.
        prompts, corrupt_prompts: the texts (without BOS).
        io_names, s_names, places, objects: what was sampled for each prompt.
    """

    clean: Int[torch.Tensor, "batch pos"]
    corrupt: Int[torch.Tensor, "batch pos"]
    answer: Int[torch.Tensor, "batch"]
    wrong: Int[torch.Tensor, "batch"]
    prompts: tuple[str, ...]
    corrupt_prompts: tuple[str, ...]
    io_names: tuple[str, ...]
    s_names: tuple[str, ...]
    places: tuple[str, ...]
    objects: tuple[str, ...]
    template: str = TEMPLATE
    seed: int = 0

    def __len__(self) -> int:
        return int(self.clean.shape[0])

    @property
    def n_pos(self) -> int:
        return int(self.clean.shape[1])

    def to(self, device) -> "IOIBatch":
        """A copy with the token tensors on `device`."""
        from dataclasses import replace

        return replace(self, clean=self.clean.to(device), corrupt=self.corrupt.to(device),
                       answer=self.answer.to(device), wrong=self.wrong.to(device))

    def to_frame(self):
        """One row per prompt: texts, names, answer/wrong token ids."""
        import pandas as pd

        return pd.DataFrame({
            "prompt": self.prompts, "corrupt_prompt": self.corrupt_prompts, "io": self.io_names,
            "s": self.s_names, "place": self.places, "object": self.objects,
            "answer_id": self.answer.tolist(), "wrong_id": self.wrong.tolist(),
        })

    def metric(self, kind: str = "logit_diff", model=None) -> "IOIMetric":
        """Shorthand for `make_metric(self, kind, model)`."""
        return make_metric(self, kind, model)


def ioi(tokenizer, n_prompts: int, seed: int = 0, prepend_bos: Optional[bool] = None) -> IOIBatch:
    """Sample `n_prompts` BABA IOI prompts and their IO/S-swapped corruptions.

    Names, places and objects are restricted to single tokens (with a leading space) of
    `tokenizer`, so every prompt has the same length. BOS is prepended when the tokenizer has
    one (TransformerLens's default); `prepend_bos` overrides that.

    Example:
        >>> from lnfree.tokenizer import gpt2_tokenizer  # doctest: +SKIP
        >>> batch = ioi(gpt2_tokenizer(), 8, seed=0)      # doctest: +SKIP
        >>> batch.clean.shape == batch.corrupt.shape      # doctest: +SKIP
        True
    """
    if isinstance(n_prompts, bool) or not isinstance(n_prompts, int) or n_prompts < 1:
        raise ValueError(f"n_prompts must be a positive integer, got {n_prompts!r}")
    encode, decode, bos = _tokenizer_adapter(tokenizer)
    if prepend_bos is None:
        prepend_bos = bos is not None
    if prepend_bos and bos is None:
        raise ValueError("prepend_bos=True but the tokenizer has no BOS token")

    names = _single_tokens(encode, decode, NAMES)
    if len(names) < MIN_NAMES:
        raise ValueError(
            f"IOI needs at least {MIN_NAMES} names that are single tokens (with a leading space) for this "
            f"tokenizer; found {len(names)} ({names}) among {len(NAMES)} common first names"
        )
    places = _single_tokens(encode, decode, PLACES)
    objects = _single_tokens(encode, decode, OBJECTS)
    if not places or not objects:
        raise ValueError(
            f"IOI needs single-token places and objects for this tokenizer; found places={places}, "
            f"objects={objects}"
        )

    rng = random.Random(seed)
    rows = []
    for _ in range(n_prompts):
        io, s = rng.sample(names, 2)
        place, obj = rng.choice(places), rng.choice(objects)
        clean = TEMPLATE.format(A=io, B=s, PLACE=place, OBJECT=obj)
        corrupt = TEMPLATE.format(A=s, B=io, PLACE=place, OBJECT=obj)
        rows.append((io, s, place, obj, clean, corrupt))

    prefix = [bos] if prepend_bos else []
    clean_ids = [prefix + encode(r[4]) for r in rows]
    corrupt_ids = [prefix + encode(r[5]) for r in rows]
    lengths = {len(t) for t in clean_ids + corrupt_ids}
    if len(lengths) != 1:
        raise ValueError(
            f"IOI prompts tokenized to different lengths {sorted(lengths)} with this tokenizer (it merges "
            "tokens across word boundaries); all prompts must have the same length"
        )
    answer = [encode(" " + r[0])[0] for r in rows]
    wrong = [encode(" " + r[1])[0] for r in rows]
    for ids, a, w in zip(clean_ids, answer, wrong):
        if a not in ids or w not in ids:  # a name tokenized differently inside the sentence
            raise ValueError("IOI names tokenize differently inside the prompt than alone for this tokenizer")
    return IOIBatch(
        clean=torch.tensor(clean_ids), corrupt=torch.tensor(corrupt_ids),
        answer=torch.tensor(answer), wrong=torch.tensor(wrong),
        prompts=tuple(r[4] for r in rows), corrupt_prompts=tuple(r[5] for r in rows),
        io_names=tuple(r[0] for r in rows), s_names=tuple(r[1] for r in rows),
        places=tuple(r[2] for r in rows), objects=tuple(r[3] for r in rows), seed=seed,
    )


# ---- metrics -------------------------------------------------------------------------------
def _final_logits(logits: torch.Tensor, batch: IOIBatch) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.ndim != 3:
        raise ValueError(
            f"logits must be a tensor [batch, pos, vocab], got "
            f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}"
        )
    if logits.shape[0] != len(batch):
        raise ValueError(f"logits have batch size {logits.shape[0]} but the IOI batch has {len(batch)} prompts")
    return logits[:, -1, :]


def _gather(final: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return final.gather(-1, ids.to(final.device)[:, None])[:, 0]


def logit_diff(logits: Float[torch.Tensor, "batch pos vocab"], batch: IOIBatch) -> Float[torch.Tensor, "batch"]:
    """logit(IO) - logit(S) at the last position, per prompt.

    Example:
        >>> logit_diff(model(batch.clean), batch).shape  # doctest: +SKIP
        torch.Size([8])
    """
    final = _final_logits(logits, batch)
    return _gather(final, batch.answer) - _gather(final, batch.wrong)


def answer_prob(logits: Float[torch.Tensor, "batch pos vocab"], batch: IOIBatch) -> Float[torch.Tensor, "batch"]:
    """Probability of the IO token at the last position, per prompt."""
    return _gather(_final_logits(logits, batch).float().softmax(-1), batch.answer)


def answer_loss(logits: Float[torch.Tensor, "batch pos vocab"], batch: IOIBatch) -> Float[torch.Tensor, "batch"]:
    """Cross-entropy -log p(IO) at the last position, per prompt."""
    return -_gather(_final_logits(logits, batch).float().log_softmax(-1), batch.answer)


def normalized_logit_diff(
    logits: Float[torch.Tensor, "batch pos vocab"], batch: IOIBatch, clean_ld: float, corrupt_ld: float
) -> Float[torch.Tensor, "batch"]:
    """(LD - corrupt_ld) / (clean_ld - corrupt_ld): 0 at the corrupted baseline, 1 at the clean one."""
    if abs(clean_ld - corrupt_ld) < 1e-8:
        raise ValueError(f"clean and corrupted logit differences are equal ({clean_ld}); cannot normalise")
    return (logit_diff(logits, batch) - corrupt_ld) / (clean_ld - corrupt_ld)


METRIC_KINDS = ("logit_diff", "normalized_logit_diff", "prob", "loss")


@dataclass(frozen=True, eq=False)
class IOIMetric:
    """A per-prompt IOI metric: ``metric(logits) -> tensor[batch]`` (see `make_metric`)."""

    batch: IOIBatch
    kind: str = "logit_diff"
    clean_ld: Optional[float] = None
    corrupt_ld: Optional[float] = None

    def __call__(self, logits: Float[torch.Tensor, "batch pos vocab"]) -> Float[torch.Tensor, "batch"]:
        if self.kind == "logit_diff":
            return logit_diff(logits, self.batch)
        if self.kind == "normalized_logit_diff":
            return normalized_logit_diff(logits, self.batch, self.clean_ld, self.corrupt_ld)
        if self.kind == "prob":
            return answer_prob(logits, self.batch)
        return answer_loss(logits, self.batch)

    def __repr__(self) -> str:
        return f"IOIMetric(kind={self.kind!r}, n_prompts={len(self.batch)})"


def make_metric(batch: IOIBatch, kind: str = "logit_diff", model=None) -> IOIMetric:
    """A metric callable for the patching functions.

    `kind`: "logit_diff", "normalized_logit_diff" (needs `model`: its mean clean and corrupted
    logit differences are the 1 and 0 points), "prob" (of the IO token) or "loss" (-log p(IO)).

    Example:
        >>> metric = make_metric(batch, "normalized_logit_diff", model)  # doctest: +SKIP
        >>> float(metric(model(batch.clean)).mean())                     # doctest: +SKIP
        1.0
    """
    if not isinstance(batch, IOIBatch):
        raise TypeError(f"batch must be an IOIBatch (from lnfree.tasks.ioi), got {type(batch).__name__}")
    if kind not in METRIC_KINDS:
        raise ValueError(f"kind must be one of {METRIC_KINDS}, got {kind!r}")
    if kind != "normalized_logit_diff":
        return IOIMetric(batch, kind)
    if model is None:
        raise ValueError("kind='normalized_logit_diff' needs model= to compute the clean and corrupted baselines")
    device = next(model.parameters()).device
    with torch.no_grad():
        clean_ld = float(logit_diff(model(batch.clean.to(device)), batch).mean())
        corrupt_ld = float(logit_diff(model(batch.corrupt.to(device)), batch).mean())
    if abs(clean_ld - corrupt_ld) < 1e-8:
        raise ValueError(f"the model's clean and corrupted logit differences are equal ({clean_ld}); cannot normalise")
    return IOIMetric(batch, kind, clean_ld, corrupt_ld)
