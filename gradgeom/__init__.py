"""gradgeom: the geometry of training, measured while it happens.

Functional ops live in :mod:`gradgeom.ops` (fused gradient statistics) and pure-torch float64
twins of each in :mod:`gradgeom.reference`.
"""

from gradgeom._native import compiled_with_cuda
from gradgeom import ops, reference
from gradgeom import lora, lora_ops

__version__ = "0.1.0"

__all__ = ["compiled_with_cuda", "ops", "reference", "__version__"]
__all__ += ["lora", "lora_ops"]
