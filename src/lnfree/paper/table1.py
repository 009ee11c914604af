"""Table 1: held-out cross-entropy as the paper evaluates it (eval_pile.py, pile_eval.py, prepare_dataset.py)."""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int

from lnfree._checks import check_tokens, model_id, model_label, positive_int
from lnfree._results import Result, result
from lnfree.evaluation import cross_entropy
from lnfree.model import as_lnfree
from lnfree.stats import Estimate

#: pile_eval.py:75, prepare_dataset.py:41-44: evaluation sequences are 1024-token chunks.
BLOCK_SIZE = 1024
#: eval_pile.py:20 default batch size; pile_eval.py:116-117 drops an incomplete last batch.
PAPER_BATCH = 8
#: Hugging Face dataset ids per Table 1 name (pile_eval.py:32-46, prepare_dataset.py:14).
DATASETS = {
    "pile-apollo-luca": "lucabaroni/apollo-pile-filtered-10k",
    "pile-apollo": "apollo-research/monology-pile-uncopyrighted-tokenizer-gpt2",
    "pile-10k": "NeelNanda/pile-10k",
    "openwebtext": "openwebtext",
}


@result
class PaperCE(Result):
    """Cross-entropy (nats / token) the paper's way: mean over every next-token prediction of the
    sequences in complete batches, EOT targets included (the masking is a TODO, pile_eval.py:164-169).

    ce: that mean, with lnfree's bootstrap CI over sequences; n_sequences: sequences counted;
    n_dropped: sequences of the incomplete last batch the paper skips.
    """

    ce: Estimate
    per_sequence: torch.Tensor
    n_sequences: int
    n_dropped: int
    batch_size: int
    labels: tuple[str, ...]
    model_name: str = ""
    model_id: str = ""

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"sequence": list(self.labels), "ce": self.per_sequence.numpy()})

    def plot(self):
        import plotly.graph_objects as go

        fig = go.Figure(go.Histogram(x=self.per_sequence.numpy()))
        fig.update_layout(title=f"{self.model_name}: CE per sequence (mean {self.ce})", xaxis_title="CE (nats/token)",
                          yaxis_title="sequences")
        return fig


def table1_ce(model, tokens: Int[torch.Tensor, "sequence pos"], *, batch_size: int = PAPER_BATCH, n_boot: int = 1000,
              seed: int = 0) -> PaperCE:
    """The paper's Table 1 number on `tokens` (e.g. from `paper_eval_tokens`, [n, 1024] chunks).

    The incomplete last batch of `batch_size` is skipped, as evaluate_model_on_pile does
    (pile_eval.py:116-117); every other prediction counts, EOT targets included. Weight
    processing does not change log-probs, so the unprocessed model is used, via
    `lnfree.cross_entropy`.

    Example:
        >>> import lnfree
        >>> res = table1_ce(lnfree.load("tiny-ln", device="cpu"), lnfree.zoo.heldout("persuasion")[:10, :64])
        >>> res.n_sequences, res.n_dropped                    # the incomplete second batch of 8 is skipped
        (8, 2)
    """
    model = as_lnfree(model)
    tokens = check_tokens(model, tokens, min_pos=2)
    batch_size = positive_int(batch_size, "batch_size")
    n = (tokens.shape[0] // batch_size) * batch_size
    if n == 0:
        raise ValueError(f"tokens: the paper's evaluation skips incomplete batches of {batch_size}; "
                         f"{tokens.shape[0]} sequences leave none (pass batch_size=)")
    res = cross_entropy(model, tokens[:n], batch_size=batch_size, n_boot=n_boot, seed=seed)
    return PaperCE(ce=res.mean, per_sequence=res.per_sequence, n_sequences=n, n_dropped=tokens.shape[0] - n,
                   batch_size=batch_size, labels=tuple(f"seq{i}" for i in range(n)), model_name=model_label(model),
                   model_id=model_id(model))


def pack_documents(docs: Iterable[Sequence[int]], *, eot_id: Optional[int] = None,
                   block_size: int = BLOCK_SIZE) -> Int[torch.Tensor, "chunk block"]:
    """Concatenate documents (each followed by EOT when `eot_id` is given, as for text datasets,
    pile_eval.py:70) and cut complete `block_size` chunks, dropping the remainder (pile_eval.py:74-83)."""
    block_size = positive_int(block_size, "block_size")
    stream: list[int] = []
    for d in docs:
        stream.extend(int(t) for t in d)
        if eot_id is not None:
            stream.append(int(eot_id))
    n = len(stream) // block_size
    return torch.tensor(stream[: n * block_size], dtype=torch.long).reshape(n, block_size)


def paper_eval_tokens(name: str, tokenizer, *, num_samples: int = 10000) -> Int[torch.Tensor, "chunk block"]:
    """Table 1's evaluation chunks for a dataset name (`DATASETS`), from the Hugging Face hub.

    pile-apollo-luca / pile-10k: ``shuffle(seed=42).select(range(num_samples))``, shuffled again with
    seed 42, pre-tokenized ids concatenated as they are (pile-apollo-luca) or text + EOT tokenized
    with the OpenWebText2 / Books3 / BookCorpus2 subsets dropped (pile-10k), 1024-token chunks
    (pile_eval.py:15-92). The paper then shuffles the chunks with an unseeded ``random.shuffle``;
    order matters only for which chunks fall in the skipped last batch. openwebtext:
    ``train_test_split(test_size=0.0005, seed=2357)``'s test split, text + EOT, packed per map batch
    of 512 documents (prepare_dataset.py:14-45). Needs the `datasets` package and the hub.
    """
    if name not in DATASETS:
        raise ValueError(f"name must be one of {sorted(DATASETS)}, got {name!r}")
    try:
        import datasets
    except ImportError as e:
        raise ImportError("paper_eval_tokens needs the `datasets` package: pip install datasets") from e
    eot = tokenizer.eos_token_id
    if name == "openwebtext":
        split = datasets.load_dataset("openwebtext", trust_remote_code=True)["train"].train_test_split(
            test_size=0.0005, seed=2357, shuffle=True)["test"]
        docs = [tokenizer(t)["input_ids"] for t in split["text"]]
        chunks = [pack_documents(docs[i:i + 512], eot_id=eot) for i in range(0, len(docs), 512)]
        return torch.cat(chunks)
    ds = datasets.load_dataset(DATASETS[name], split="train")
    if num_samples < len(ds):
        ds = ds.shuffle(seed=42).select(range(num_samples))
    ds = ds.shuffle(seed=42)
    if name == "pile-apollo-luca":
        return pack_documents((ex["input_ids"] for ex in ds), eot_id=None)[:num_samples]
    drop = {"OpenWebText2", "Books3", "BookCorpus2"}
    docs = (tokenizer(ex["text"])["input_ids"] for ex in ds if (ex.get("meta") or {}).get("pile_set_name") not in drop)
    return pack_documents(docs, eot_id=eot)[:num_samples]
