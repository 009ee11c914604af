"""IOI prompts and the per-layer error of attribution vs activation patching on resid_pre, as the paper
builds and measures them (mech_interp/attribution_patching/: ioi_dataset.py, ioi_utils.py,
attr_vs_act_patching_(per_prompt).py; the error: branch attribution_vs_activation_patching,
mech_interp/experiments/attribution_patching/final_patching_analysis_new_version.py:491-497)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int

from lnfree._checks import check_tokens, model_id, model_label, positive_int
from lnfree._results import Result, result
from lnfree.analysis.patching import activation_patching, attribution_patching
from lnfree.paper._process import paper_processed
from lnfree.stats import Estimate, bootstrap

# ioi_dataset.py:15-109 (NAMES), :129-130 (BABA_TEMPLATES[0], the only template with nb_templates=1),
# :212-231 (PLACES, OBJECTS). Every entry is one GPT-2 token after a space.
NAMES = (
    "Michael", "Christopher", "Jessica", "Matthew", "Ashley", "Jennifer", "Joshua", "Amanda",
    "Daniel", "David", "James", "Robert", "John", "Joseph", "Andrew", "Ryan", "Brandon", "Jason",
    "Justin", "Sarah", "William", "Jonathan", "Stephanie", "Brian", "Nicole", "Nicholas", "Anthony",
    "Heather", "Eric", "Elizabeth", "Adam", "Megan", "Melissa", "Kevin", "Steven", "Thomas",
    "Timothy", "Christina", "Kyle", "Rachel", "Laura", "Lauren", "Amber", "Brittany", "Danielle",
    "Richard", "Kimberly", "Jeffrey", "Amy", "Crystal", "Michelle", "Tiffany", "Jeremy", "Benjamin",
    "Mark", "Emily", "Aaron", "Charles", "Rebecca", "Jacob", "Stephen", "Patrick", "Sean", "Erin",
    "Jamie", "Kelly", "Samantha", "Nathan", "Sara", "Dustin", "Paul", "Angela", "Tyler", "Scott",
    "Katherine", "Andrea", "Gregory", "Erica", "Mary", "Travis", "Lisa", "Kenneth", "Bryan",
    "Lindsey", "Kristen", "Jose", "Alexander", "Jesse", "Katie", "Lindsay", "Shannon", "Vanessa",
    "Courtney", "Christine", "Alicia", "Cody", "Allison", "Bradley", "Samuel",
)
PLACES = (
    "store", "garden", "restaurant", "school", "hospital", "office", "house", "station",
)
OBJECTS = (
    "ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack",
)
TEMPLATE = "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]"


@dataclass(frozen=True)
class IOIPrompts:
    """Paired IOI prompts: clean[i] and corrupt[i] differ only at S2 (corrupt[i] = clean[i ^ 1]).

    clean, corrupt: [prompt, pos] with BOS prepended; io_ids, s_ids: [prompt] the clean prompt's
    indirect-object / subject token (its answer and the wrong answer); prompts, answers: strings.
    """

    clean: Int[torch.Tensor, "prompt pos"]
    corrupt: Int[torch.Tensor, "prompt pos"]
    io_ids: Int[torch.Tensor, "prompt"]
    s_ids: Int[torch.Tensor, "prompt"]
    prompts: tuple[str, ...]
    answers: tuple[tuple[str, str], ...]
    seed: int


def _gen_pairs(rng: random.Random, n_pairs: int) -> list[dict]:
    """gen_prompt_uniform (ioi_dataset.py:280-335) with symmetric=True, one template, no prefixes:
    the same sequence of draws from `rng` as the paper's from Python's global `random`."""
    templates = [TEMPLATE]
    out = []
    for _ in range(n_pairs):
        temp = rng.choice(templates)
        n1 = n2 = n3 = ""
        while len({n1, n2, n3}) < 3:
            n1, n2, n3 = rng.choice(NAMES), rng.choice(NAMES), rng.choice(NAMES)
        place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
        base = temp.replace("[PLACE]", place).replace("[OBJECT]", obj)
        out.append({"text": base.replace("[A]", n1).replace("[B]", n2), "IO": n1, "S": n2})
        out.append({"text": base.replace("[A]", n2).replace("[B]", n1), "IO": n2, "S": n1})
    return out


def _swap_io_s1(p: dict) -> dict:
    """gen_flipped_prompts with flip=("IO", "S1") (ioi_dataset.py:381-388): swap the first IO and
    the first S word; the labels IO and S stay."""
    t = p["text"].split(" ")
    i, j = t.index(p["IO"]), t.index(p["S"])
    t[i], t[j] = t[j], t[i]
    return {**p, "text": " ".join(t)}


def ioi_prompts(tokenizer, n: int = 16, seed: int = 0) -> IOIPrompts:
    """The paper's IOI prompts (ioi_utils.py:17-30, attr_vs_act_patching_(per_prompt).py:138-148).

    n/2 BABA prompts in symmetric pairs, each also with IO and S1 swapped (ABBA), interleaved and
    reordered in groups of four to BABA, ABBA, ABBA, BABA, the final IO dropped; BOS prepended;
    corrupt[i] = clean[i + 1] for even i, clean[i - 1] for odd i (they differ only at S2). The
    paper draws from Python's unseeded global `random`; here `random.Random(seed)`, which makes
    the same draws the paper made after ``random.seed(seed)``. Its 30 prompt sets of 16 were drawn
    in one stream: ``ioi_prompts(tok, n=480, seed=s)`` equals them concatenated.

    Example:
        >>> import lnfree
        >>> p = ioi_prompts(lnfree.gpt2_tokenizer(), n=4)
        >>> p.prompts[0]
        'Then, Benjamin and Bradley went to the hospital. Benjamin gave a snack to'
        >>> (p.clean != p.corrupt).sum(1).tolist()
        [1, 1, 1, 1]
    """
    n = positive_int(n, "n")
    if n % 4:
        raise ValueError(f"n must be a multiple of 4 (the paper's groups of BABA, ABBA, ABBA, BABA), got {n}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    d1 = _gen_pairs(random.Random(seed), n // 4)
    d2 = [_swap_io_s1(p) for p in d1]
    c = [p for pair in zip(d1, d2) for p in pair]
    order = [0, 3, 1, 2]
    c = [c[g + j] for g in range(0, len(c), 4) for j in order]
    prompts = tuple(p["text"].rsplit(" ", 1)[0] for p in c)
    answers = tuple((" " + p["IO"], " " + p["S"]) for p in c)
    bos = tokenizer.bos_token_id
    rows = [[bos] + list(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in prompts]
    if len({len(r) for r in rows}) != 1:
        raise ValueError("this tokenizer splits some IOI names, places or objects into several tokens; the paper's "
                         "prompts need GPT-2's tokenizer (every entry one token)")
    clean = torch.tensor(rows)
    corrupt = clean[[i + 1 if i % 2 == 0 else i - 1 for i in range(n)]]

    def single(word):
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"answer {word!r} is not one token for this tokenizer")
        return ids[0]

    io_ids = torch.tensor([single(a) for a, _ in answers])
    s_ids = torch.tensor([single(b) for _, b in answers])
    return IOIPrompts(clean, corrupt, io_ids, s_ids, prompts, answers, seed)


# ---- attribution vs activation patching on resid_pre --------------------------------------------
@result
class IOIAtPError(Result):
    """Per-layer error of attribution patching against activation patching on resid_pre.

    act, attr: [prompt, layer, pos] effects normalised by each prompt's activation-patching effect
    at (layer 0, S2); norm_factor: [prompt] that effect (= LD_clean - LD_corrupt); per_prompt:
    [prompt, layer] sum over positions of |act - attr|; error: [layer] its mean over prompts.
    """

    act: Float[torch.Tensor, "prompt layer pos"]
    attr: Float[torch.Tensor, "prompt layer pos"]
    norm_factor: Float[torch.Tensor, "prompt"]
    per_prompt: Float[torch.Tensor, "prompt layer"]
    labels: tuple[str, ...]
    n_boot: int
    level: float
    seed: int
    model_name: str = ""
    model_id: str = ""
    _headline = ("mean_error",)

    @property
    def error(self) -> Float[torch.Tensor, "layer"]:
        return self.per_prompt.mean(0)

    @property
    def mean_over_layers(self) -> float:
        return float(self.error.mean())

    @property
    def sd_over_layers(self) -> float:
        """torch's (unbiased) std over layers of the per-layer error."""
        return float(self.error.std())

    def mean_error(self) -> Estimate:
        """Mean over layers of the error, with a bootstrap CI over prompts (lnfree's addition)."""
        return bootstrap(self.per_prompt.mean(1), n_boot=self.n_boot, level=self.level, seed=self.seed)

    def to_frame(self) -> pd.DataFrame:
        """One row per (prompt, layer): the summed |act - attr| error."""
        P, L = self.per_prompt.shape
        return pd.DataFrame({"prompt": np.repeat(np.arange(P), L), "layer": np.tile(np.arange(L), P),
                             "error": self.per_prompt.flatten().numpy()})

    def top(self, k: int = 10) -> pd.DataFrame:
        """The k layers with the largest mean error."""
        k = positive_int(k, "k")
        f = pd.DataFrame({"layer": list(self.labels), "error": self.error.numpy()})
        return f.sort_values("error", ascending=False).head(k).reset_index(drop=True)

    def plot(self):
        """Per-layer error (mean over prompts, with its sd over prompts)."""
        import plotly.graph_objects as go

        fig = go.Figure(go.Scatter(x=list(range(len(self.labels))), y=self.error.numpy(), mode="lines+markers",
                                   error_y=dict(type="data", array=self.per_prompt.std(0).numpy()), name=self.model_name))
        fig.update_layout(title=f"{self.model_name}: |activation - attribution patching| on resid_pre",
                          xaxis_title="layer", yaxis_title="sum over positions of |act - attr| (normalised)")
        return fig


def _metric(io: int, s: int):
    def metric(logits):  # ioi_utils.get_logit_diff: last position, IO minus S
        return logits[:, -1, io] - logits[:, -1, s]
    return metric


def ioi_atp_error(model, clean: Int[torch.Tensor, "prompt pos"], corrupt: Int[torch.Tensor, "prompt pos"],
                  io_ids: Int[torch.Tensor, "prompt"], s_ids: Int[torch.Tensor, "prompt"], *,
                  s2_pos: Optional[Int[torch.Tensor, "prompt"]] = None, n_boot: int = 1000, level: float = 0.95,
                  seed: int = 0, progress: bool = False) -> IOIAtPError:
    """The paper's per-layer AtP error on resid_pre (denoising, logit difference IO - S at the last position).

    Per prompt, on the paper-processed copy: activation patching of resid_pre at every (layer, pos)
    (clean into corrupt, minus the corrupted logit difference) and AtP (gradient at the corrupted
    run times clean - corrupt), via `lnfree.activation_patching` / `attribution_patching`; both
    divided by the prompt's activation-patching effect at (layer 0, S2); error[l] = mean over
    prompts of sum over positions |act - attr| (final_patching_analysis_new_version.py:491-497).
    The paper indexes that normaliser at position 11, S2 of its template with BOS
    (analysis_attr_vs_act_patching_(per_prompt).py:138); `s2_pos` defaults to the position where
    clean and corrupt differ, which is 11 for `ioi_prompts`.

    Example:
        >>> import lnfree
        >>> gpt2 = lnfree.load("gpt2")                                                      # doctest: +SKIP
        >>> p = ioi_prompts(gpt2.tokenizer, n=16)                                            # doctest: +SKIP
        >>> res = ioi_atp_error(gpt2, p.clean, p.corrupt, p.io_ids, p.s_ids)                 # doctest: +SKIP
        >>> res.mean_over_layers, res.sd_over_layers                                        # doctest: +SKIP
    """
    proc = paper_processed(model)
    clean = check_tokens(proc, clean, name="clean")
    corrupt = check_tokens(proc, corrupt, name="corrupt")
    if clean.shape != corrupt.shape:
        raise ValueError(f"clean and corrupt must have the same shape, got {tuple(clean.shape)} and {tuple(corrupt.shape)}")
    n = clean.shape[0]
    io_ids, s_ids = (torch.as_tensor(x).long().flatten() for x in (io_ids, s_ids))
    for name, x in (("io_ids", io_ids), ("s_ids", s_ids)):
        if x.numel() != n:
            raise ValueError(f"{name} needs one token id per prompt ({n}), got {x.numel()}")
    if s2_pos is None:
        diff = clean != corrupt
        if not bool((diff.sum(1) == 1).all()):
            raise ValueError("each clean/corrupt pair must differ at exactly one position (S2), or pass s2_pos=")
        s2_pos = diff.int().argmax(1)
    s2_pos = torch.as_tensor(s2_pos).long().flatten()
    acts, attrs = [], []
    for i in range(n):
        metric = _metric(int(io_ids[i]), int(s_ids[i]))
        c, k = clean[i:i + 1], corrupt[i:i + 1]
        acts.append(activation_patching(proc, c, k, metric, site="resid_pre", by_pos=True, direction="denoise").scores)
        attrs.append(attribution_patching(proc, c, k, metric, site="resid_pre", by_pos=True, method="atp",
                                          direction="denoise").scores)
    act, attr = torch.stack(acts).double(), torch.stack(attrs).double()
    norm = act[torch.arange(n), 0, s2_pos]
    act, attr = act / norm[:, None, None], attr / norm[:, None, None]
    per_prompt = (act - attr).abs().sum(-1)
    return IOIAtPError(act=act, attr=attr, norm_factor=norm, per_prompt=per_prompt,
                       labels=tuple(f"{l}_resid_pre" for l in range(act.shape[1])), n_boot=n_boot, level=level,
                       seed=seed, model_name=model_label(model), model_id=model_id(model))


@result
class IOIAtPComparison(Result):
    """`ioi_atp_error` of several models on the same prompts (the paper: original, vanilla FT, LN-free FT)."""

    results: tuple[IOIAtPError, ...]
    names: tuple[str, ...]

    @property
    def labels(self) -> tuple[str, ...]:
        return self.names

    def table(self) -> pd.DataFrame:
        """One row per model: mean and sd over layers of the per-layer error."""
        return pd.DataFrame({"model": list(self.names), "mean_over_layers": [r.mean_over_layers for r in self.results],
                             "sd_over_layers": [r.sd_over_layers for r in self.results]})

    def to_frame(self) -> pd.DataFrame:
        """Long format: model, layer, error (mean over prompts)."""
        return pd.concat([pd.DataFrame({"model": name, "layer": np.arange(len(r.error)), "error": r.error.numpy()})
                          for name, r in zip(self.names, self.results)], ignore_index=True)

    def difference(self) -> pd.Series:
        """Per-layer error of each model minus the first's."""
        base = self.results[0].error
        return pd.Series({n: float((r.error - base).mean()) for n, r in zip(self.names[1:], self.results[1:])},
                         name="mean error difference vs " + self.names[0])

    def plot(self):
        import plotly.graph_objects as go

        fig = go.Figure()
        for name, r in zip(self.names, self.results):
            fig.add_trace(go.Scatter(x=list(range(len(r.error))), y=r.error.numpy(), mode="lines+markers", name=name))
        fig.update_layout(title="Attribution vs activation patching on resid_pre (IOI)", xaxis_title="layer",
                          yaxis_title="mean over prompts of sum |act - attr|")
        return fig


def compare_ioi_atp(models: Mapping[str, object], prompts: IOIPrompts, **kwargs) -> IOIAtPComparison:
    """`ioi_atp_error` for each named model on the same `prompts` (kwargs go to it).

    Example:
        >>> cmp = compare_ioi_atp({"original": gpt2, "LN-free": lnfree_gpt2}, prompts)   # doctest: +SKIP
        >>> cmp.table()                                                                   # doctest: +SKIP
    """
    if not isinstance(models, Mapping) or len(models) < 1:
        raise TypeError("models must be a non-empty mapping {name: model}")
    res = tuple(ioi_atp_error(m, prompts.clean, prompts.corrupt, prompts.io_ids, prompts.s_ids, **kwargs)
                for m in models.values())
    return IOIAtPComparison(results=res, names=tuple(str(k) for k in models))
