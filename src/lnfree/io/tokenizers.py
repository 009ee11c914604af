"""Tokenizers saved beside weights: finding, reading and writing them, for every reader and writer.

    >>> tok = load_saved_tokenizer("runs/zoo/tokenizer.json")   # doctest: +SKIP
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

EOT = "<|endoftext|>"


def dir_tokenizer(folder: Path, d_vocab: int, tokenizer):
    """The tokenizer to attach to a model read from an HF `folder` (with add_bos_token=True), or None.

    `tokenizer`: False attaches none, a tokenizer is used as it is, None reads the folder's files
    (else GPT-2's for a 50257-token vocabulary, else none with a warning).
    """
    if tokenizer is False:
        return None
    if tokenizer is not None:
        return with_bos(tokenizer)
    if any((folder / n).is_file() for n in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, add_bos_token=True)
        except Exception as e:  # any failure here only costs the tokenizer, never the weights
            warnings.warn(f"could not load the tokenizer in {folder} ({type(e).__name__}: {e})", stacklevel=4)
        else:
            if len(tok) > d_vocab:
                warnings.warn(f"the tokenizer in {folder} has {len(tok)} tokens but the model only {d_vocab}: "
                              f"ids >= {d_vocab} will fail", stacklevel=4)
            return tok
    if d_vocab == 50257:
        from lnfree.tokenizer import gpt2_tokenizer

        return gpt2_tokenizer(add_bos_token=True)
    warnings.warn(
        f"no tokenizer in {folder} and the vocabulary ({d_vocab} tokens) is not GPT-2's: loading without a "
        f"tokenizer (pass tokenizer= to attach one; model.to_tokens needs it)", stacklevel=4,
    )
    return None


def with_bos(tokenizer):
    """A copy that prepends BOS, so TransformerLens does not try to re-load it by name."""
    if tokenizer is None or getattr(tokenizer, "add_bos_token", False) or tokenizer.bos_token is None:
        return tokenizer
    tokenizer = copy.deepcopy(tokenizer)
    try:
        tokenizer.add_bos_token = True
    except (AttributeError, ValueError):
        return tokenizer
    tokenizer.init_kwargs["add_bos_token"] = True  # what TransformerLens reads
    tokenizer.init_kwargs.setdefault("name_or_path", tokenizer.name_or_path)
    return tokenizer


def load_tokenizer(path: str | os.PathLike):
    """Load a zoo-style ``tokenizer.json`` as a ``transformers.PreTrainedTokenizerFast``.

    bos/eos/unk/pad are all ``<|endoftext|>`` (TransformerLens needs bos and pad).
    ``path`` may be the JSON file or a directory containing it.

    >>> tok = load_tokenizer("runs/zoo/tokenizer.json")   # doctest: +SKIP
    >>> tok.decode(tok.encode("Hello world"))             # doctest: +SKIP
    'Hello world'
    """
    from transformers import PreTrainedTokenizerFast

    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    # Like GPT-2: ``encode`` adds no BOS. ``name_or_path`` = the folder holding
    # tokenizer.json, which TransformerLens reloads with add_bos_token=True (it needs it).
    return PreTrainedTokenizerFast(
        tokenizer_file=str(p), bos_token=EOT, eos_token=EOT, unk_token=EOT,
        pad_token=EOT, model_max_length=1 << 30, add_bos_token=False,
        name_or_path=str(p.parent),
    )


def load_saved_tokenizer(path: str | os.PathLike, *, name: str = "tokenizer"):
    """A tokenizer saved with a model: an HF tokenizer directory, or a ``tokenizer.json`` (file or its folder).

    A ``tokenizer.json`` with GPT-2's ``<|endoftext|>`` (the zoo's) gets it as bos/eos/pad (TransformerLens
    needs both) and no automatic BOS, like GPT-2 (`load_tokenizer`). ``name`` is what errors call the argument.

    Example:
        >>> tok = load_saved_tokenizer("runs/zoo/tokenizer.json")   # doctest: +SKIP
    """
    p = Path(path)
    if p.is_dir() and (p / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(p))
    from transformers import PreTrainedTokenizerFast

    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.exists():
        raise FileNotFoundError(f"{name} {path}: no tokenizer.json there")
    if EOT in file.read_text(encoding="utf-8"):
        return load_tokenizer(file)
    return PreTrainedTokenizerFast(tokenizer_file=str(file), name_or_path=str(file.parent), model_max_length=1 << 30)


def find_tokenizer(folder: Path, levels: int = 2):
    """The tokenizer saved with a run: ``tokenizer/`` (HF) or ``tokenizer.json``, in `folder` or up to
    `levels` folders above it; None when there is none."""
    for d in [folder, *folder.parents][: levels + 1]:
        if (d / "tokenizer" / "tokenizer_config.json").is_file() or (d / "tokenizer.json").is_file():
            return load_saved_tokenizer(d / "tokenizer" if (d / "tokenizer").is_dir() else d / "tokenizer.json")
    return None


def save_plain_tokenizer(tokenizer, out: Path) -> None:
    """Save without automatic BOS, the way GPT-2 tokenizers are stored on the hub.

    The flag is switched off for the save and restored after (a deepcopy of a fast tokenizer
    costs seconds).
    """
    had_bos = getattr(tokenizer, "add_bos_token", False)
    saved_kwarg = tokenizer.init_kwargs.get("add_bos_token", None)
    if had_bos:
        try:
            tokenizer.add_bos_token = False
        except (AttributeError, ValueError):  # a tokenizer without the switch is saved as it is
            had_bos = False
    try:
        if had_bos:
            tokenizer.init_kwargs["add_bos_token"] = False
        tokenizer.save_pretrained(str(out))
    finally:
        if had_bos:
            tokenizer.add_bos_token = True
            if saved_kwarg is None:
                tokenizer.init_kwargs.pop("add_bos_token", None)
            else:
                tokenizer.init_kwargs["add_bos_token"] = saved_kwarg

