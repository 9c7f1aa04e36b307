"""gradgeom: the geometry of training, measured while it happens.

Functional ops live in :mod:`gradgeom.ops` (fused gradient statistics) and pure-torch float64
twins of each in :mod:`gradgeom.reference`.
"""

from gradgeom._native import compiled_with_cuda
from gradgeom import ops, reference
from gradgeom import lora, lora_ops

__version__ = "0.1.0"

__all__ = ["compiled_with_cuda", "ops", "reference", "__version__"]

# --- estimator (issue 3) ---
from gradgeom.quality import LayerGradientQuality, SmoothnessThresholds  # noqa: E402
from gradgeom.estimator import GradientSmoothnessEstimator  # noqa: E402

__all__ += ["GradientSmoothnessEstimator", "LayerGradientQuality", "SmoothnessThresholds"]

# --- controller (issue 5) ---
from gradgeom.policy import Action, PausePolicy  # noqa: E402
from gradgeom.controller import Decision, PauseController  # noqa: E402

__all__ += ["Action", "Decision", "PauseController", "PausePolicy"]
__all__ += ["lora", "lora_ops"]
