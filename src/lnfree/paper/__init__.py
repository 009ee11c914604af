"""`lnfree.paper`: each statistic of Baroni et al. (2025) computed exactly as the paper's code does.

Thin presets over the analysis API: each function applies the paper's weight processing,
positions, targets, aggregation and normalisation on a copy of the model (the caller's model is
never changed). Definitions, with references into github.com/submarat/removing-layer-norm, are in
docs/paper.md.

    >>> import lnfree.paper as P
    >>> P.dla_nmae(model, tokens)        # doctest: +SKIP
"""

from lnfree.paper._process import paper_processed
from lnfree.paper.dla import PaperDLA, dla_nmae, paper_dla
from lnfree.paper.geometry import PaperNorms, first_token_norm, sink_rate, sink_rate_per_sample
from lnfree.paper.entropy import PAPER_NEURONS, PaperEntropyAblation, entropy_neuron_ablation
from lnfree.paper.table1 import PaperCE, pack_documents, paper_eval_tokens, table1_ce
from lnfree.paper.ioi import IOIAtPComparison, IOIAtPError, IOIPrompts, compare_ioi_atp, ioi_atp_error, ioi_prompts

__all__ = ["paper_processed", "PaperDLA", "dla_nmae", "paper_dla", "PaperNorms", "first_token_norm",
           "sink_rate", "sink_rate_per_sample", "IOIPrompts", "ioi_prompts", "IOIAtPError", "ioi_atp_error",
           "IOIAtPComparison", "compare_ioi_atp", "PAPER_NEURONS", "PaperEntropyAblation", "entropy_neuron_ablation",
           "PaperCE", "table1_ce", "pack_documents", "paper_eval_tokens"]
