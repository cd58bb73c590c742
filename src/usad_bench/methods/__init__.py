"""Methods: one module each, registered by name. Import a module below to make it available."""

# Importing a module registers its methods (one explicit list, no import magic).
from usad_bench.methods import (  # noqa: F401
    clip_adapter,  # few-shot classification baseline: CLIP-Adapter
    cocoop,  # few-shot classification baseline: CoCoOp
    coop,  # few-shot classification baseline: CoOp
    linear_adapter,  # reference: trainable linear patch adapter (foundation)
    linear_probe,  # few-shot classification baseline: logistic-regression linear probe
    lp_plus_plus,  # few-shot classification baseline: LP++
    tip_adapter,  # few-shot classification baseline: Tip-Adapter
    tip_adapter_f,  # few-shot classification baseline: Tip-Adapter-F
    ultraad,  # the headline method: UltraAD (MICCAI 2025)
    zero_shot_clip,  # reference: zero-shot CLIP scores, maps and class logits (foundation)
)
from usad_bench.methods.base import Method, MethodConfig, Prediction, SupportSet, Task
from usad_bench.methods.registry import get_method, list_methods, register

__all__ = ["Method", "MethodConfig", "Prediction", "SupportSet", "Task", "get_method", "list_methods", "register"]
