"""gradgeom: the geometry of training, measured while it happens.

Functional level: :mod:`gradgeom.ops` (fused gradient statistics), :mod:`gradgeom.lora` (LoRA
update geometry) and their float64 twins in :mod:`gradgeom.reference`. Stateful level:
:class:`GradientSmoothnessEstimator`, :class:`PauseController` and the callbacks in
:mod:`gradgeom.integrations`.
"""

from gradgeom._native import compiled_with_cuda
from gradgeom import lora, lora_ops, ops, reference
from gradgeom.controller import Decision, PauseController
from gradgeom.estimator import GradientSmoothnessEstimator
from gradgeom.policy import Action, PausePolicy
from gradgeom.quality import LayerGradientQuality, SmoothnessThresholds

__version__ = "0.1.0"

__all__ = [
    "Action",
    "Decision",
    "GradientSmoothnessEstimator",
    "LayerGradientQuality",
    "PauseController",
    "PausePolicy",
    "SmoothnessThresholds",
    "compiled_with_cuda",
    "lora",
    "lora_ops",
    "ops",
    "reference",
    "__version__",
]
