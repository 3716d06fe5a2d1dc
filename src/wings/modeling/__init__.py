from .attention import WingsAttention
from .inject import detach_learners, inject_learners, wings_modules
from .learner import LoRRALearner, LowRankLinear
from .modeling_wings import WingsForConditionalGeneration, WingsPreTrainedModel
from .router import WingsRouter

__all__ = [
    "LoRRALearner",
    "LowRankLinear",
    "WingsAttention",
    "WingsForConditionalGeneration",
    "WingsPreTrainedModel",
    "WingsRouter",
    "detach_learners",
    "inject_learners",
    "wings_modules",
]
