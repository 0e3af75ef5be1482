"""axsave from Python: save the model at the end of distributed training.

* :func:`save` runs the ``axsave`` binary (the command line's options as keywords), alone or
  on every rank of a running ``torch.distributed`` job, and returns its JSON summary.
* :func:`save_trained_model` is a drop-in for Axolotl's ``save_trained_model(cfg, trainer,
  model)``.
* :mod:`axsave.integrations.transformers` (``AxsaveCallback``) and
  :mod:`axsave.integrations.axolotl` (``AxsavePlugin``) hook it into training.

Importing axsave imports neither torch nor transformers.
"""

from .api import AxsaveError, save
from .trained import save_trained_model

__all__ = ["AxsaveError", "save", "save_trained_model"]
