from .attention import attach_wings, detach_wings, is_wings_attention
from .inject import detach_learners, inject_learners, wings_modules
from .learner import LoRRALearner, LowRankLinear
from .modeling_wings import WingsForConditionalGeneration, WingsPreTrainedModel
from .router import WingsRouter

__all__ = [
    "LoRRALearner",
    "LowRankLinear",
    "WingsForConditionalGeneration",
    "WingsPreTrainedModel",
    "WingsRouter",
    "attach_wings",
    "detach_wings",
    "is_wings_attention",
    "detach_learners",
    "inject_learners",
    "wings_modules",
]
