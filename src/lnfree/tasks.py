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

from lnfree._results import Result, result
from lnfree.tokenizer import Tokens, tokens_tokenizer, with_tokenizer

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
@result
class IOIBatch(Result):
    """Clean and corrupted IOI prompts of one fixed length (the task object).

    Attributes:
        clean, corrupt: Int[batch, pos] token ids (BOS first if the tokenizer has one); `Tokens` that
            remember their tokenizer (`tokenizer_id`), so analyses of a model with another refuse them.
        answer: Int[batch] the IO name's token (correct on the clean prompt).
        wrong: Int[batch] the S name's token.
        prompts, corrupt_prompts: the texts (without BOS).
        io_names, s_names, places, objects: what was sampled for each prompt.
        labels: one per prompt, ``"0: Mary vs John"`` (IO vs S).
        attention_mask: Int[batch, pos] when the rows are padded (1 = real token), else None;
            the metrics read each row's last real token.
        model_name, model_id: the model whose tokenizer wrote the prompts ("" / None when a bare
            tokenizer was given).
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
    n_prompts: int = 0
    labels: tuple[str, ...] = ()
    attention_mask: Optional[Int[torch.Tensor, "batch pos"]] = None
    model_name: str = ""
    model_id: Optional[str] = None

    def __post_init__(self):
        # derived fields, filled in when the batch is built by hand (e.g. tests' fake batches)
        n = int(self.clean.shape[0])
        object.__setattr__(self, "n_prompts", n)
        if not self.labels:
            object.__setattr__(self, "labels", tuple(f"{i}: {a} vs {b}" for i, (a, b) in
                                                     enumerate(zip(self.io_names, self.s_names))))

    def settings(self) -> dict[str, str]:
        """What the short repr shows: the size and the sampling seed (the names are in to_frame())."""
        return {"n_prompts": str(self.n_prompts), "n_pos": str(self.n_pos), "seed": str(self.seed),
                "padded": str(self.attention_mask is not None)}

    def __len__(self) -> int:
        return int(self.clean.shape[0])

    @property
    def n_pos(self) -> int:
        return int(self.clean.shape[1])

    @property
    def tokenizer_id(self):
        """The identity of the tokenizer that wrote the prompts (None for hand-built plain tensors)."""
        return tokens_tokenizer(self.clean)

    def to(self, device) -> "IOIBatch":
        """A copy with the token tensors on `device`."""
        from dataclasses import replace

        mask = None if self.attention_mask is None else self.attention_mask.to(device)
        return replace(self, clean=self.clean.to(device), corrupt=self.corrupt.to(device),
                       answer=self.answer.to(device), wrong=self.wrong.to(device), attention_mask=mask)

    def to_frame(self):
        """One row per prompt: texts, names, answer/wrong token ids."""
        import pandas as pd

        return pd.DataFrame({
            "label": self.labels, "prompt": self.prompts, "corrupt_prompt": self.corrupt_prompts,
            "io": self.io_names, "s": self.s_names, "place": self.places, "object": self.objects,
            "answer_id": self.answer.tolist(), "wrong_id": self.wrong.tolist(),
        })

    def logit_diffs(self, model) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-prompt logit difference logit(IO) - logit(S) of `model` on the clean and corrupted prompts."""
        from lnfree._checks import check_tokens, forward_kwargs

        check_tokens(model, self.clean, name="the IOI prompts")
        device = next(model.parameters()).device
        b = self.to(device)
        with torch.no_grad():
            kw = forward_kwargs(model, b.clean, b.attention_mask)
            return logit_diff(model(b.clean, **kw), b).cpu(), logit_diff(model(b.corrupt, **kw), b).cpu()

    def plot(self, model, title: Optional[str] = None):
        """Per-prompt logit difference of `model` on the clean and corrupted prompts (bars)."""
        import plotly.graph_objects as go

        from lnfree._checks import model_label

        clean, corrupt = self.logit_diffs(model)
        fig = go.Figure([go.Bar(x=list(self.labels), y=clean.numpy(), name="clean"),
                         go.Bar(x=list(self.labels), y=corrupt.numpy(), name="corrupt")])
        fig.update_layout(barmode="group", xaxis_title="prompt (IO vs S)", yaxis_title="logit(IO) - logit(S)",
                          title=title or f"IOI logit difference, {model_label(model)}")
        return fig

    def metric(self, kind: str = "logit_diff", model=None) -> "IOIMetric":
        """Shorthand for `make_metric(self, kind, model)`."""
        return make_metric(self, kind, model)


def _tokenizer_of(model_or_tokenizer):
    """(tokenizer, model or None): a model brings its tokenizer; None is refused with the reason."""
    if model_or_tokenizer is None:
        raise ValueError("ioi got None for the tokenizer: the model has no tokenizer attached (model.tokenizer is "
                         "None). Pass a tokenizer (e.g. lnfree.gpt2_tokenizer()) or set model.tokenizer first")
    if hasattr(model_or_tokenizer, "cfg") and hasattr(model_or_tokenizer, "W_E"):  # a HookedTransformer
        tok = getattr(model_or_tokenizer, "tokenizer", None)
        if tok is None:
            raise ValueError("ioi: the model has no tokenizer attached (model.tokenizer is None); pass a tokenizer "
                             "or set model.tokenizer first")
        return tok, model_or_tokenizer
    return model_or_tokenizer, None


def ioi(model_or_tokenizer, n_prompts: int, *, seed: int = 0, prepend_bos: Optional[bool] = None) -> IOIBatch:
    """Sample `n_prompts` BABA IOI prompts and their IO/S-swapped corruptions.

    `model_or_tokenizer`: a model (its tokenizer is used, and its name recorded) or a tokenizer.
    Names, places and objects are restricted to single tokens (with a leading space), so every
    prompt has the same length. BOS is prepended when the model prepends one by default
    (``cfg.default_prepend_bos``) or, for a bare tokenizer, when it has one; `prepend_bos`
    overrides that.

    Example:
        >>> from lnfree.tokenizer import gpt2_tokenizer
        >>> batch = ioi(gpt2_tokenizer(), 8, seed=0)
        >>> batch.clean.shape == batch.corrupt.shape
        True
    """
    from lnfree._checks import model_id, model_label, positive_int, tokenizer_label

    tokenizer, model = _tokenizer_of(model_or_tokenizer)
    n_prompts = positive_int(n_prompts, "n_prompts")
    encode, decode, bos = _tokenizer_adapter(tokenizer)
    if prepend_bos is None:
        prepend_bos = bos is not None and (model is None or bool(getattr(model.cfg, "default_prepend_bos", True)))
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
    label = tokenizer_label(model) if model is not None else None
    ids = [with_tokenizer(torch.tensor(x), tokenizer, label) for x in (clean_ids, corrupt_ids, answer, wrong)]
    return IOIBatch(
        clean=ids[0], corrupt=ids[1], answer=ids[2], wrong=ids[3],
        prompts=tuple(r[4] for r in rows), corrupt_prompts=tuple(r[5] for r in rows),
        io_names=tuple(r[0] for r in rows), s_names=tuple(r[1] for r in rows),
        places=tuple(r[2] for r in rows), objects=tuple(r[3] for r in rows), seed=seed,
        model_name=model_label(model) if model is not None else "",
        model_id=model_id(model) if model is not None else None,
    )


# ---- metrics -------------------------------------------------------------------------------
def _final_logits(logits: torch.Tensor, n: int, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Logits at each row's last real token [batch, vocab]."""
    if not isinstance(logits, torch.Tensor) or logits.ndim != 3:
        raise ValueError(
            f"logits must be a tensor [batch, pos, vocab], got "
            f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}"
        )
    if logits.shape[0] != n:
        raise ValueError(f"logits have batch size {logits.shape[0]} but the IOI batch has {n} prompts")
    if mask is None:
        return logits[:, -1, :]
    if tuple(mask.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"logits [batch, pos] {tuple(logits.shape[:2])} do not match the attention mask "
                         f"{tuple(mask.shape)}")
    from lnfree._checks import last_positions

    last = last_positions(mask.bool().to(logits.device), logits.shape[1])
    return logits[torch.arange(n, device=logits.device), last]


def _gather(final: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return final.gather(-1, ids.to(final.device)[:, None])[:, 0]


def logit_diff(logits: Float[torch.Tensor, "batch pos vocab"], batch: IOIBatch) -> Float[torch.Tensor, "batch"]:
    """logit(IO) - logit(S) at each prompt's last (real) position, per prompt.

    Example:
        >>> logit_diff(model(batch.clean), batch).shape  # doctest: +SKIP
        torch.Size([8])
    """
    final = _final_logits(logits, len(batch), batch.attention_mask)
    return _gather(final, batch.answer) - _gather(final, batch.wrong)


def answer_prob(logits: Float[torch.Tensor, "batch pos vocab"], batch: IOIBatch) -> Float[torch.Tensor, "batch"]:
    """Probability of the IO token at the last (real) position, per prompt."""
    return _gather(_final_logits(logits, len(batch), batch.attention_mask).float().softmax(-1), batch.answer)


def answer_loss(logits: Float[torch.Tensor, "batch pos vocab"], batch: IOIBatch) -> Float[torch.Tensor, "batch"]:
    """Cross-entropy -log p(IO) at the last (real) position, per prompt."""
    return -_gather(_final_logits(logits, len(batch), batch.attention_mask).float().log_softmax(-1), batch.answer)


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

    @property
    def tokenizer_id(self):
        """The tokenizer that wrote the batch (its answer ids): patching refuses a model with another."""
        return self.batch.tokenizer_id

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
    from lnfree._checks import check_choice

    if not isinstance(batch, IOIBatch):
        raise TypeError(f"batch must be an IOIBatch (from lnfree.tasks.ioi), got {type(batch).__name__}")
    check_choice(kind, METRIC_KINDS, "kind")
    if kind != "normalized_logit_diff":
        return IOIMetric(batch, kind)
    if model is None:
        raise ValueError("kind='normalized_logit_diff' needs model= to compute the clean and corrupted baselines")
    clean, corrupt = batch.logit_diffs(model)
    clean_ld, corrupt_ld = float(clean.mean()), float(corrupt.mean())
    if abs(clean_ld - corrupt_ld) < 1e-8:
        raise ValueError(f"the model's clean and corrupted logit differences are equal ({clean_ld}); cannot normalise")
    return IOIMetric(batch, kind, clean_ld, corrupt_ld)


@dataclass(frozen=True, eq=False)
class LogitDiff:
    """logit(answer) - logit(wrong) at each row's last real token: a metric for any prompt pairs."""

    answer: torch.Tensor
    wrong: torch.Tensor
    attention_mask: Optional[torch.Tensor] = None
    kind: str = "logit_diff"

    def __call__(self, logits: Float[torch.Tensor, "batch pos vocab"]) -> Float[torch.Tensor, "batch"]:
        final = _final_logits(logits, len(self.answer), self.attention_mask)
        return _gather(final, self.answer) - _gather(final, self.wrong)

    @property
    def tokenizer_id(self):
        """The tokenizer that wrote `answer` when it is a `Tokens` tensor, else None."""
        return tokens_tokenizer(self.answer)

    def __repr__(self) -> str:
        return f"LogitDiff(n_prompts={len(self.answer)}, padded={self.attention_mask is not None})"


def logit_diff_metric(answer, wrong, *, attention_mask=None) -> LogitDiff:
    """A per-prompt metric logit(answer) - logit(wrong) read at each row's last real token.

    `answer`, `wrong`: Int[batch] token ids; `attention_mask` ([batch, pos], 1 = real) when the
    prompts are padded (a `TokenBatch`'s mask).

    Example:
        >>> import torch
        >>> m = logit_diff_metric(torch.tensor([1]), torch.tensor([2]), attention_mask=torch.tensor([[1, 1, 0]]))
        >>> logits = torch.zeros(1, 3, 4); logits[0, 1, 1] = 3.0
        >>> m(logits).tolist()
        [3.0]
    """
    source = tokens_tokenizer(answer) or tokens_tokenizer(wrong)
    answer, wrong = torch.as_tensor(answer).long().flatten(), torch.as_tensor(wrong).long().flatten()
    if source is not None:  # keep the ids' tokenizer, so patching can refuse another model's
        answer = Tokens.wrap(answer.as_subclass(torch.Tensor), source)
    if answer.shape != wrong.shape:
        raise ValueError(f"answer and wrong must have one id per prompt each, got shapes {tuple(answer.shape)} and "
                         f"{tuple(wrong.shape)}")
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask)
        if attention_mask.ndim != 2 or attention_mask.shape[0] != len(answer):
            raise ValueError(f"attention_mask must be [batch, pos] with batch = {len(answer)}, got "
                             f"{tuple(attention_mask.shape)}")
    return LogitDiff(answer, wrong, attention_mask)
