"""Model I/O as one layer: every reader returns `Parts`, one `assemble` builds the model, one resolver dispatches.

- `parts`: `Parts(cfg, weights, tokenizer, ln_state)` and `assemble` (the one missing-key rule);
- readers: `hf` (HF directories, GPT-2's released LN-free format, hub ids), `gguf`, `tl_dir` (lnfree and
  TransformerLens weights directories, zoo pretraining runs), `checkpoint` (removal checkpoints), `zoo`
  (the shipped family, real and derived zoo models), `derived` (base spec + deltas); `tokenizers`;
- writers: `tl_dir` (the lnfree directory), `hf_write` (HF GPT-2), `derived`; `save` chooses among them
  (`save_pretrained`, `save_derived`);
- `resolve`: `load` / `read_parts` (the only dispatcher) and `build` (the only device / dtype policy).

    >>> from lnfree.io.resolve import load
    >>> load("tiny-ln", device="cpu").cfg.model_name
    'tiny-ln'
"""
