"""darl-lite: a compact CPU runtime for graded query–item relevance.

Scores pairs with an int8 ONNX cross-encoder bundle, computes an out-of-distribution score in the
same pass, and routes uncertain or out-of-distribution pairs to a full LLM under a budget. This
package needs numpy, onnxruntime and tokenizers only; training and export live in the
``distill`` and ``export`` extras (``darl_lite.distill``, ``darl_lite.export``).
"""

from darl_lite.budget import RouteBudget
from darl_lite.bundle import Bundle, load_bundle
from darl_lite.errors import BundleError, DarlLiteError, DataError, InputError, MissingExtraError
from darl_lite.inference import SessionConfig
from darl_lite.routing import RoutingPolicy
from darl_lite.scorer import Fallback, PairScore, Scorer
from darl_lite.teacher import Teacher
from darl_lite.types import GRADE_GAINS, GRADE_NAMES, Pair

__version__ = "0.1.0"

__all__ = [
    "GRADE_GAINS",
    "GRADE_NAMES",
    "Bundle",
    "BundleError",
    "DarlLiteError",
    "DataError",
    "Fallback",
    "InputError",
    "MissingExtraError",
    "Pair",
    "PairScore",
    "RouteBudget",
    "RoutingPolicy",
    "Scorer",
    "SessionConfig",
    "Teacher",
    "__version__",
    "load_bundle",
]
