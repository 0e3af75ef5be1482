"""axsave: save the model at the end of distributed training.

The work is done by the ``axsave`` binary that the wheel installs (``binary_path()`` finds it);
``python -m axsave ARGS`` runs it. Importing this package imports no torch.
"""

from ._bin import binary_path
from ._version import __version__

__all__ = ["__version__", "binary_path"]
