"""A catalogue of misuses of the public API: each must raise a clear error, never return a number.

Every case calls one public function the wrong way and asserts the exception type AND a message
fragment naming the problem (the argument, what was given, or what is allowed). `pytest.raises`
fails the case if the call returns anything, so no misuse can silently produce a value. The
network is blocked for every case (any socket connect fails the test), so hub ids must fail fast
on their own.

Add a case by writing a function ``def name(c)`` decorated with ``@case(ExceptionType, "regex")``;
``c`` carries the fixtures (model, tokens, ln_free_model, tmp_path, monkeypatch).
"""

from __future__ import annotations

import json
import time
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformer_lens import HookedTransformerConfig

from conftest import make_model
from lnfree.loading import CheckpointError, HubUnreachableError
from lnfree.model import LNFreeTransformer

CASES: dict = {}


def case(exc, match):
    """Register a misuse: calling it must raise `exc` with a message matching `match`."""

    def register(fn):
        assert fn.__name__ not in CASES, fn.__name__
        CASES[fn.__name__] = (fn, exc, match)
        return fn

    return register


# ---- helpers ---------------------------------------------------------------------------------------
def _hf_dir(path, vocab=100, **kw):
    """A tiny GPT-2 checkpoint written by transformers (config.json + model.safetensors)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=vocab, n_positions=16,
                                    bos_token_id=None, eos_token_id=None))
    for key, fn in kw.items():
        fn(hf)
    hf.save_pretrained(path)
    return path


def _load(path, **kw):
    from lnfree.loading import load_model

    kw.setdefault("device", "cpu")
    kw.setdefault("tokenizer", False)
    return load_model(path, **kw)


def _metric(logits):  # per-prompt logit difference at the last position
    return logits[:, -1, 3] - logits[:, -1, 5]


def _fast(fn, limit_s=10.0):
    start = time.perf_counter()
    try:
        fn()
    finally:
        elapsed = time.perf_counter() - start
        assert elapsed < limit_s, f"took {elapsed:.1f} s: must fail fast"


# ---- LN / model (lnfree.model) --------------------------------------------------------------------
@case(ValueError, r"does not support models with shortformer positional embeddings")
def lnfree_transformer_on_shortformer_config(c):
    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_vocab=20, n_ctx=8,
                                  act_fn="gelu_new", positional_embedding_type="shortformer")
    LNFreeTransformer(cfg)


@case(ValueError, r"does not support models with Gemma-2-style post-norms \(use_normalization_before_and_after")
def lnfree_transformer_on_gemma2_post_norms(c):
    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_vocab=20, n_ctx=8,
                                  act_fn="gelu_new", normalization_type="RMS", use_normalization_before_and_after=True)
    LNFreeTransformer(cfg)


@case(ValueError, "LN-free .every site removed.: there are no LN scales to estimate")
def estimate_scales_on_ln_free_model(c):
    c.ln_free_model.estimate_ln_scales(c.tokens)


@case(ValueError, "LN-free .every site removed.: there are no LN scales to estimate")
def estimate_scales_on_model_built_without_ln(c):
    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_vocab=61, n_ctx=16,
                                  act_fn="gelu_new", normalization_type=None)
    LNFreeTransformer(cfg).estimate_ln_scales(c.tokens)


@case(ValueError, "float16 is unsafe .* removed LN sites")
def float16_ln_free_forward(c):
    c.ln_free_model.to(torch.float16)(c.tokens)


@case(ValueError, "float16 is unsafe")
def float16_model_built_without_ln(c):
    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_vocab=61, n_ctx=16,
                                  act_fn="gelu_new", normalization_type=None, dtype=torch.float16)
    LNFreeTransformer(cfg)(c.tokens)


@case(ValueError, r"unknown LN site 'blocks.0.ln1'; valid sites are .*ln1.qk")
def freeze_site_without_path(c):
    c.model.freeze_ln("blocks.0.ln1", scales=2.0)


@case(ValueError, r"unknown LN site 'blocks.2.ln2'.*i in 0..1")
def freeze_site_layer_out_of_range(c):
    c.model.freeze_ln("blocks.2.ln2", scales=2.0)


@case(ValueError, r"unknown LN site 'blocks.01.ln2'")
def freeze_site_non_canonical_index(c):
    c.model.freeze_ln("blocks.01.ln2", scales=2.0)


@case(ValueError, "kind must be 'scale' or 'normalized', got 'std'")
def site_hook_unknown_kind(c):
    c.model.site_hook("ln_final", "std")


@case(ValueError, r"no stored scale .*estimate_ln_scales")
def freeze_before_estimating_scales(c):
    c.model.freeze_ln()


@case(ValueError, "scale for blocks.0.ln2 must be a finite positive number, got -1.0")
def freeze_negative_scale(c):
    c.model.freeze_ln("blocks.0.ln2", scales=-1.0)


@case(ValueError, "must be a finite positive number, got nan")
def remove_ln_nan_scale(c):
    c.model.remove_ln(scales=float("nan"))


@case(ValueError, r"scales dict has no entry for sites \['blocks.0.ln2'\]")
def freeze_scales_dict_missing_site(c):
    c.model.freeze_ln(["ln_final", "blocks.0.ln2"], scales={"ln_final": 2.0})


@case(ValueError, "removed; removal is permanent")
def unfreeze_removed_site(c):
    c.ln_free_model.unfreeze_ln("ln_final")


@case(ValueError, r"are removed \(permanent\) and cannot be frozen")
def freeze_removed_site(c):
    c.ln_free_model.freeze_ln("ln_final", scales=2.0)


@case(ValueError, "LN state for ln_final has scale None: a frozen site needs a finite positive scale")
def load_ln_state_frozen_without_scale(c):
    state = c.model.ln_state()
    state["ln_final"] = {"mode": "frozen", "scale": None}
    c.model.load_ln_state(state)


@case(ValueError, "LN state has sites")
def load_ln_state_of_another_model(c):
    make_model(n_layers=1).load_ln_state(c.model.ln_state())


@case(TypeError, "tokens must be integer token ids, got dtype torch.float32")
def estimate_scales_float_tokens(c):
    c.model.estimate_ln_scales(c.tokens.float())


@case(ValueError, r"tokens must have shape \[batch, pos\] with batch, pos >= 1, got \(0, 12\)")
def estimate_scales_empty_batch(c):
    c.model.estimate_ln_scales(c.tokens[:0])


@case(ValueError, r"tokens must have shape \[batch, pos\].*got \(2, 3, 12\)")
def estimate_scales_3d_tokens(c):
    c.model.estimate_ln_scales(c.tokens[:6].reshape(2, 3, 12))


@case(ValueError, "positional must be a non-negative int, got -1")
def estimate_scales_negative_positional(c):
    c.model.estimate_ln_scales(c.tokens, positional=-1)


@case(ValueError, "batch_size must be a positive int, got 0")
def estimate_scales_batch_size_zero(c):
    c.model.estimate_ln_scales(c.tokens, batch_size=0)


@case(ValueError, "exclude_position_0=True needs sequences of at least 2 tokens")
def estimate_scales_exclude_position_0_single_token(c):
    c.model.estimate_ln_scales(c.tokens[:, :1], exclude_position_0=True)


@case(ValueError, r"token ids must lie in \[0, 61\); got min -1")
def forward_negative_token_id(c):
    c.model(torch.tensor([[3, -1, 4]]))  # the embedding would wrap -1 around to the last row


@case(ValueError, r"token ids must lie in \[0, 61\); got min \d+, max 61")
def run_with_cache_token_id_out_of_vocab(c):
    c.model.run_with_cache(torch.tensor([[3, 61]]))


@case(ValueError, "sequences of 17 tokens exceed the context length n_ctx=16")
def forward_longer_than_context(c):
    c.model(torch.zeros(1, 17, dtype=torch.long))


@case(TypeError, "from_hooked expects a HookedTransformer, got Linear")
def from_hooked_not_a_transformer(c):
    LNFreeTransformer.from_hooked(torch.nn.Linear(2, 2))


# ---- analyses: DLA, confidence, geometry --------------------------------------------------------
@case(ValueError, r"token ids must lie in \[0, 61\); got min 100, max 1\d\d")
def dla_token_ids_out_of_vocab(c):
    from lnfree import direct_logit_attribution

    direct_logit_attribution(c.model, c.tokens + 100)


@case(ValueError, r"positions must lie in \[-12, 12\).*max 12")
def dla_position_out_of_range(c):
    from lnfree import direct_logit_attribution

    direct_logit_attribution(c.model, c.tokens, targets=c.tokens[:, 0], pos=12)


@case(ValueError, r"components must be one of \('heads', 'layers', 'neurons', 'all'\), got 'head'")
def dla_unknown_component_kind(c):
    from lnfree import direct_logit_attribution

    direct_logit_attribution(c.model, c.tokens, components="head")


@case(ValueError, r"components='neurons' needs layer=")
def dla_neurons_without_layer(c):
    from lnfree import direct_logit_attribution

    direct_logit_attribution(c.model, c.tokens, components="neurons")


@case(ValueError, r"targets must have shape \(\) or \(6,\); got \(5,\)")
def dla_targets_wrong_shape(c):
    from lnfree import direct_logit_attribution

    direct_logit_attribution(c.model, c.tokens, targets=c.tokens[:5, 0])


@case(TypeError, "targets as a list of ints .* is ambiguous")
def dla_targets_list_of_two_ints(c):
    from lnfree import direct_logit_attribution

    # two prompts, targets [5, 7]: per-prompt ids or the logit difference 5 - 7? Never guessed.
    direct_logit_attribution(c.model, c.tokens[:2], targets=[5, 7])


@case(ValueError, r"attention_mask must have the tokens' shape \(6, 12\), got \(6, 11\)")
def dla_attention_mask_wrong_shape(c):
    from lnfree import direct_logit_attribution

    direct_logit_attribution(c.model, c.tokens, attention_mask=torch.ones(6, 11))


@case(ValueError, r"real tokens of rows \[0\] are not one contiguous run")
def cross_entropy_mask_with_a_hole(c):
    from lnfree import cross_entropy

    mask = torch.ones(6, 12, dtype=torch.long)
    mask[0, 5] = 0
    cross_entropy(c.model, c.tokens, attention_mask=mask)


@case(ValueError, r"TokenBatch, which carries its attention mask")
def sinks_token_batch_and_a_mask(c):
    from lnfree import TokenBatch, attention_sink_rate

    mask = torch.ones(6, 12, dtype=torch.long)
    attention_sink_rate(c.model, TokenBatch(c.tokens, mask), attention_mask=mask)


@case(ValueError, r"rows \[2\] have fewer than 2 real tokens")
def first_token_norm_row_with_one_real_token(c):
    from lnfree import first_token_norm

    mask = torch.ones(6, 12, dtype=torch.long)
    mask[2, 1:] = 0
    first_token_norm(c.model, c.tokens, attention_mask=mask)


@case(ValueError, r"different vocabularies \(d_vocab 61 vs 70\)")
def compare_dla_different_vocab(c):
    from lnfree import compare_dla

    compare_dla(c.model, make_model(d_vocab=70), c.tokens)


@case(ValueError, r"model_a and model_b have different vocabularies \(d_vocab 61 vs 70\)")
def compare_confidence_different_vocab(c):
    from lnfree import compare_confidence

    compare_confidence(c.model, make_model(d_vocab=70), c.tokens)


@case(ValueError, r"layer must be in \[-2, 1\] for a model with n_layers=2, got 2")
def entropy_neurons_layer_out_of_range(c):
    from lnfree import find_entropy_neurons

    find_entropy_neurons(c.model, layer=2)


@case(ValueError, r"neurons must be .* indices in \[0, 127\] \(d_mlp=128\); got \[128\]")
def ablate_neuron_index_out_of_range(c):
    from lnfree import ablate_neurons

    ablate_neurons(c.model, c.tokens, [128], layer=-1)


@case(ValueError, r"neurons \[3, 4\] are bare indices, which do not say their layer; pass labels like 'L1N3'")
def ablate_bare_neuron_indices_without_layer(c):
    from lnfree import ablate_neurons

    ablate_neurons(c.model, c.tokens, [3, 4])


@case(ValueError, r"neurons are in layer 0, but layer=1 was given")
def ablate_neurons_of_another_layer(c):
    from lnfree import ablate_neurons, find_entropy_neurons

    ablate_neurons(c.model, c.tokens, find_entropy_neurons(c.model, layer=0), layer=1)


@case(ValueError, r"blocks.1.mlp.W_out contains 1 non-finite values")
def entropy_neurons_nan_weight(c):
    from lnfree import find_entropy_neurons

    with torch.no_grad():
        c.model.blocks[1].mlp.W_out[5, 0] = float("nan")
    find_entropy_neurons(c.model)


@case(ValueError, "n_bins must be a positive int, got 0")
def calibration_zero_bins(c):
    from lnfree import calibration

    calibration(c.model, c.tokens, n_bins=0)


@case(ValueError, r"tokens need at least 2 positions .*got shape \(6, 1\)")
def first_token_norm_single_position(c):
    from lnfree import first_token_norm

    first_token_norm(c.model, c.tokens[:, :1])


@case(ValueError, r"threshold must be a number in \(0, 1\], got 0")
def attention_sink_threshold_zero(c):
    from lnfree import attention_sink_rate

    attention_sink_rate(c.model, c.tokens, threshold=0)


@case(ValueError, "bootstrap needs at least one sample, got an empty array")
def bootstrap_empty(c):
    from lnfree import bootstrap

    bootstrap(np.array([]))


@case(ValueError, "samples contain 1 non-finite values")
def bootstrap_nan_sample(c):
    from lnfree import bootstrap

    bootstrap(np.array([1.0, np.nan, 2.0]))  # used to give value nan with a finite CI [1, 2]


@case(ValueError, "n_boot must be a positive int .*got 0")
def bootstrap_zero_resamples(c):
    from lnfree import bootstrap

    bootstrap(np.arange(5.0), n_boot=0)


# ---- loading / saving checkpoints ----------------------------------------------------------------
@case(CheckpointError, r"holds no model lnfree can read \(found: \[.notes.txt.\]\)")
def load_directory_that_is_not_a_checkpoint(c):
    (c.tmp_path / "notes.txt").write_text("hello")
    _load(c.tmp_path)


@case(CheckpointError, "has config.json but no weights")
def load_checkpoint_without_weights(c):
    path = _hf_dir(c.tmp_path / "ck")
    (path / "model.safetensors").unlink()
    _load(path)


@case(CheckpointError, r"model.safetensors: .*corrupt or truncated")
def load_truncated_safetensors(c):
    path = _hf_dir(c.tmp_path / "ck")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    _load(path)


@case(CheckpointError, r"cannot read .*pytorch_model.bin.*corrupt or truncated")
def load_truncated_pytorch_bin(c):
    path = _hf_dir(c.tmp_path / "ck")
    from safetensors.torch import load_file

    sd = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    torch.save(sd, path / "pytorch_model.bin")
    data = (path / "pytorch_model.bin").read_bytes()
    (path / "pytorch_model.bin").write_bytes(data[: len(data) // 3])
    _load(path)


@case(CheckpointError, r"config.json is not valid JSON")
def load_corrupt_config(c):
    path = _hf_dir(c.tmp_path / "ck")
    text = (path / "config.json").read_text()
    (path / "config.json").write_text(text[: len(text) // 2])
    _load(path)


@case(CheckpointError, r"model_type 'bert'.*not supported.*causal LMs of model_type .*gpt2.*llama")
def load_unsupported_architecture(c):
    (c.tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    _load(c.tmp_path)


@case(CheckpointError, r"spec '/no/such/model\.gguf': no such file.*accepted: a zoo name")
def resolve_missing_path(c):
    import lnfree

    lnfree.load("/no/such/model.gguf")


@case(CheckpointError, r"has shape .* but config.json implies")
def load_config_that_does_not_match_weights(c):
    path = _hf_dir(c.tmp_path / "ck")
    config = json.loads((path / "config.json").read_text())
    config["n_embd"] = 32
    (path / "config.json").write_text(json.dumps(config))
    _load(path)


@case(CheckpointError, "non-finite or non-float values; the file is corrupt")
def load_checkpoint_with_nan_weights(c):
    def poison(hf):
        with torch.no_grad():
            hf.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")

    _load(_hf_dir(c.tmp_path / "ck", poison=poison))


@case(CheckpointError, r"is a file but not a \.gguf.*pass the directory that holds them")
def load_a_file_instead_of_a_directory(c):
    path = _hf_dir(c.tmp_path / "ck")
    _load(path / "model.safetensors")


@case(TypeError, "dtype must be a floating torch.dtype")
def load_with_string_dtype(c):
    _load(_hf_dir(c.tmp_path / "ck"), dtype="float16")


@case(HubUnreachableError, r"not in the local Hugging Face cache; the hub is disabled \(HF_HUB_OFFLINE is set\)")
def hub_id_with_hub_offline(c):
    c.monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _fast(lambda: _load("nobody-lnfree-test/gpt2-missing"))


@case(HubUnreachableError, r"the hub is unreachable: .*hf download nobody-lnfree-test/gpt2-missing")
def hub_id_with_network_down(c):
    import urllib.error
    import urllib.request

    def down(*a, **k):
        raise urllib.error.URLError("Network is unreachable")

    c.monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    c.monkeypatch.setattr(urllib.request, "urlopen", down)
    _fast(lambda: _load("nobody-lnfree-test/gpt2-missing", local_files_only=False))


@case(ValueError, r"cannot be written in a Hugging Face format: the HF GPT-2 format has no fixed-scale LayerNorm.*format='lnfree'")
def save_model_with_frozen_sites_as_hf(c):
    from lnfree import save_pretrained

    save_pretrained(c.model.freeze_ln("blocks.0.ln2", scales=2.0), c.tmp_path / "out", format="hf")


# ---- patching, tasks, evaluation, removal, zoo ---------------------------------------------------
@case(ValueError, r"unknown site 'attn'; allowed sites are")
def patching_unknown_site(c):
    from lnfree import activation_patching

    activation_patching(c.model, c.tokens, c.tokens.flip(0), _metric, site="attn")


@case(ValueError, r"clean and corrupt must have the same shape, got \(6, 12\) and \(3, 12\)")
def patching_mismatched_pair(c):
    from lnfree import activation_patching

    activation_patching(c.model, c.tokens, c.tokens[:3], _metric)


@case(ValueError, r"metric must return one scalar per prompt, shape \(6,\); got shape \(\)")
def patching_metric_returns_mean(c):
    from lnfree import activation_patching

    activation_patching(c.model, c.tokens, c.tokens.flip(0), lambda logits: _metric(logits).mean())


@case(ValueError, r"method must be one of 'atp', 'atp\+qk', 'atp\+graddrop', 'atp\*'; got 'exact'")
def attribution_patching_unknown_method(c):
    from lnfree import attribution_patching

    attribution_patching(c.model, c.tokens, c.tokens.flip(0), _metric, method="exact")


@case(ValueError, "act must be an activation_patching result")
def patching_error_of_two_attribution_results(c):
    from lnfree import attribution_patching, patching_error

    atp = attribution_patching(c.model, c.tokens[:2], c.tokens[:2].flip(0), _metric, site="resid_pre")
    patching_error(atp, atp)


@case(ValueError, r"different vocabularies \(d_vocab 61 vs 70\)")
def compare_patching_different_vocab(c):
    from lnfree import compare_patching

    compare_patching(c.model, make_model(d_vocab=70), c.tokens, c.tokens.flip(0), _metric)


@case(ValueError, "n_prompts must be a positive int, got 0")
def ioi_zero_prompts(c):
    from lnfree import tasks
    from lnfree.tokenizer import gpt2_tokenizer

    tasks.ioi(gpt2_tokenizer(), 0)


@case(ValueError, r"logits have batch size 3 but the IOI batch has 4 prompts")
def ioi_metric_on_wrong_batch(c):
    from lnfree import tasks
    from lnfree.tokenizer import gpt2_tokenizer

    batch = tasks.ioi(gpt2_tokenizer(), 4)
    tasks.logit_diff(torch.zeros(3, batch.clean.shape[1], 50257), batch)


@case(ValueError, r"ioi: the model has no tokenizer attached")
def ioi_model_without_tokenizer(c):
    from lnfree import tasks

    tasks.ioi(c.model, 4)


@case(ValueError, r"ioi got None for the tokenizer: the model has no tokenizer attached")
def ioi_none_tokenizer(c):
    from lnfree import tasks

    tasks.ioi(c.model.tokenizer, 4)


@case(ValueError, r"atp and act come from different models")
def patching_error_across_models(c):
    from lnfree import activation_patching, attribution_patching, patching_error

    pair = (c.tokens[:2], c.tokens[2:4])
    act = activation_patching(c.model, *pair, _metric, site="resid_pre")
    patching_error(attribution_patching(c.ln_free_model, *pair, _metric, site="resid_pre"), act)


@case(ValueError, r"clean and corrupt are padded differently")
def patching_pairs_padded_differently(c):
    from lnfree import activation_patching

    mask = torch.ones(2, 12, dtype=torch.long)
    other = mask.clone()
    other[0, -3:] = 0
    activation_patching(c.model, c.tokens[:2], c.tokens[2:4], _metric, attention_mask=(mask, other))


@case(ValueError, r"sequences of 1 tokens leave no prediction to score")
def cross_entropy_single_token_sequences(c):
    from lnfree import cross_entropy

    cross_entropy(c.model, c.tokens[:, :1])


@case(ValueError, r"token ids must lie in \[0, 61\)")
def cross_entropy_out_of_vocab(c):
    from lnfree import cross_entropy

    cross_entropy(c.model, c.tokens + 61)


@case(ValueError, "no LayerNorm left .every site removed.: nothing to remove")
def remove_layernorm_from_ln_free_model(c):
    from lnfree import remove_layernorm

    remove_layernorm(c.ln_free_model, c.tokens, steps=2, progress=False)


@case(ValueError, "preset 'gpt2-small' is for 12-layer models; this model has 2 layers")
def remove_layernorm_preset_for_other_depth(c):
    from lnfree import remove_layernorm

    remove_layernorm(c.model, c.tokens, schedule="gpt2-small", progress=False)


@case(ValueError, r"data token ids span \[61, \d+\], outside the model's vocabulary \[0, 61\)")
def remove_layernorm_data_out_of_vocab(c):
    from lnfree import remove_layernorm

    remove_layernorm(c.model, c.tokens + 61, steps=2, batch_size=2, progress=False)


@case(FileNotFoundError, "is neither a removal checkpoint nor a run dir")
def removal_checkpoint_that_does_not_exist(c):
    from lnfree.removal import load_checkpoint

    load_checkpoint(c.tmp_path / "missing-run")


@case(ValueError, r"^steps must be an integer >= 2, got -5$")
def remove_layernorm_negative_steps(c):
    from lnfree import remove_layernorm

    remove_layernorm(c.model, c.tokens, steps=-5, progress=False)


@case(ValueError, r"nothing to resume: .* does not exist")
def remove_layernorm_resume_mistyped_dir(c):
    from lnfree import remove_layernorm

    remove_layernorm(c.model, c.tokens, steps=4, out_dir=c.tmp_path / "typo", resume=True, progress=False)


@case(TypeError, r"data must be .*nested. list of token ids")
def remove_layernorm_float_token_lists(c):
    from lnfree import remove_layernorm

    remove_layernorm(c.model, [[0.5, 1.5, 2.5]], steps=4, progress=False)


@case(ValueError, r"distill must lie in \[0, 1\]")
def remove_layernorm_distill_weight_above_one(c):
    from lnfree import remove_layernorm

    remove_layernorm(c.model, c.tokens, steps=4, distill=1.5, progress=False)


@case(FileNotFoundError, r"no exported model family in .* \(zoo.json missing\)")
def zoo_data_dir_without_manifest(c):
    from lnfree import zoo

    zoo.load("tiny-ln", data_dir=c.tmp_path)


def _fake_zoo(tmp_path):
    (tmp_path / "zoo.json").write_text(json.dumps(
        {"format": "lnfree-zoo", "version": 1, "models": {"tiny-ln": {"file": "tiny-ln.safetensors"}},
         "heldout": {}}))
    return tmp_path


@case(ValueError, r"unknown zoo model 'tiny-xl'.*; valid names: tiny-ln")
def zoo_unknown_model_name(c):
    from lnfree import zoo

    zoo.load("tiny-xl", data_dir=_fake_zoo(c.tmp_path))


@case(TypeError, r"dtype must be a floating torch.dtype .*got torch.int8")
def zoo_integer_dtype(c):
    from lnfree import zoo

    zoo.load("tiny-ln", dtype=torch.int8, data_dir=_fake_zoo(c.tmp_path))


@case(ValueError, "unknown zoo model 'gpt2'; valid names: tiny-ln, tiny-vanilla, tiny-lnfree")
def zoo_unknown_name_in_shipped_family(c):
    from lnfree import zoo

    zoo.load("gpt2", device="cpu")


# ---- the tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_misuse_raises_a_clear_error(name, model, tokens, ln_free_model, tmp_path, monkeypatch, no_network):
    fn, exc, match = CASES[name]
    c = SimpleNamespace(model=model, tokens=tokens, ln_free_model=ln_free_model, tmp_path=tmp_path,
                        monkeypatch=monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(exc, match=match) as info:
            fn(c)
    assert type(info.value) is not AssertionError  # a blocked socket must not pass for a clear error


def test_catalogue_covers_the_public_api():
    assert len(CASES) >= 25
    checkpoint_errors = [n for n, (_, exc, _) in CASES.items() if n.startswith("load_")]
    assert len(checkpoint_errors) >= 8


def test_checkpoint_errors_have_their_own_types(tmp_path):
    """Loading problems raise the package's CheckpointError (a ValueError) / HubUnreachableError."""
    assert issubclass(CheckpointError, ValueError) and issubclass(HubUnreachableError, ConnectionError)
    with pytest.raises(CheckpointError):
        _load(tmp_path)


def test_cross_entropy_refuses_float_numpy_tokens(model):
    import numpy as np
    import pytest as _pytest

    from lnfree.evaluation import cross_entropy
    with _pytest.raises(TypeError, match="integer token ids"):
        cross_entropy(model, np.full((2, 5), 3.7))
