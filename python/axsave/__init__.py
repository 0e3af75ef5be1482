"""axsave: save the model at the end of distributed training.

The work is done by the ``axsave`` binary that the wheel installs (``binary_path()`` finds it);
``python -m axsave ARGS`` runs it. Importing this package imports no torch.

* :func:`save` runs the binary (the command line's options as keywords), alone or on every
  rank of a running ``torch.distributed`` job, and returns its JSON summary;
* :func:`save_trained_model` is a drop-in for Axolotl's ``save_trained_model(cfg, trainer,
  model)``;
* ``axsave.integrations.transformers.AxsaveCallback`` and
  ``axsave.integrations.axolotl.AxsavePlugin`` hook it into training.
"""

from ._bin import binary_path
from ._version import __version__
from .api import AxsaveError, save
from .trained import save_trained_model

__all__ = ["AxsaveError", "__version__", "binary_path", "save", "save_trained_model"]
