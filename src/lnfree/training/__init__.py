"""Training infrastructure shared by the removal fine-tune (`lnfree.removal`) and the zoo pretraining
(`lnfree.zoo.train`): optimiser config and LR schedule (`optim`), checkpoint directories
(`checkpoints`), the JSONL run log (`log`), divergence guards (`guards`), file writing (`files`),
device checks (`device`). The two loops stay separate where they really differ.
"""

from lnfree.training.checkpoints import CheckpointDir
from lnfree.training.device import resolve_device
from lnfree.training.guards import DivergedError, DivergenceGuard, sigma_problem
from lnfree.training.log import JsonlLog
from lnfree.training.optim import OptimConfig, lr_at, make_optimizer

__all__ = ["CheckpointDir", "DivergedError", "DivergenceGuard", "JsonlLog", "OptimConfig", "lr_at",
           "make_optimizer", "resolve_device", "sigma_problem"]
