"""The loading names under their older home: `load_model`, `save_pretrained` and the errors (see `lnfree.io`).

    >>> from lnfree.loading import load_model
    >>> load_model("tiny-ln", device="cpu").zoo_name
    'tiny-ln'
"""

from lnfree._errors import CheckpointError
from lnfree.io.hf import HUB_MODELS, RELEASED_LN_FREE, HubUnreachableError
from lnfree.io.hf_write import hf_gpt2_problems
from lnfree.io.resolve import load_model
from lnfree.io.save import save_pretrained

__all__ = ["CheckpointError", "HUB_MODELS", "HubUnreachableError", "RELEASED_LN_FREE", "hf_gpt2_problems",
           "load_model", "save_pretrained"]
