"""Methods: one module each, registered by name. Import a module below to make it available."""

# Importing a module registers its methods (one explicit list, no import magic).
from usad_bench.methods import (  # noqa: F401
    adaclip,  # detection / localisation baseline: AdaCLIP (ECCV 2024), hybrid static + dynamic prompts in both towers
    anomalyclip,  # detection / localisation baseline: AnomalyCLIP (ICLR 2024), DPAM + object-agnostic prompts
    april_gan,  # detection / localisation baseline: APRIL-GAN (VAND 2023), text heads + few-shot memory
    biomedclip_metric,  # related ultrasound system: BiomedCLIP prototype metric learning (Lee et al., KICS 2025)
    clip_adapter,  # few-shot classification baseline: CLIP-Adapter
    cocoop,  # few-shot classification baseline: CoCoOp
    coop,  # few-shot classification baseline: CoOp
    hybrid_tuning,  # related ultrasound system: Hybrid Tuning (Qu et al.), frequency filter + noise estimation adapter
    linear_adapter,  # reference: trainable linear patch adapter (foundation)
    linear_probe,  # few-shot classification baseline: logistic-regression linear probe
    lp_plus_plus,  # few-shot classification baseline: LP++
    mvfa,  # detection / localisation baseline: MVFA (CVPR 2024), adapters re-injected into the image stream
    tip_adapter,  # few-shot classification baseline: Tip-Adapter
    tip_adapter_f,  # few-shot classification baseline: Tip-Adapter-F
    ultraad,  # the headline method: UltraAD (MICCAI 2025)
    usclip_softlabel,  # related ultrasound system: Ultrasound-CLIP few-shot adaptation with attribute soft labels
    vcp_clip,  # detection / localisation baseline: VCP-CLIP (ECCV 2024)
    winclip,  # detection / localisation baseline: WinCLIP and WinCLIP+ (CVPR 2023), training-free
    zero_shot_clip,  # reference: zero-shot CLIP scores, maps and class logits (foundation)
)
from usad_bench.methods.base import Method, MethodConfig, Prediction, SupportSet, Task
from usad_bench.methods.registry import get_method, list_methods, register

__all__ = ["Method", "MethodConfig", "Prediction", "SupportSet", "Task", "get_method", "list_methods", "register"]
