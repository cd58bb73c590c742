"""usad_bench: few-shot adaptation of CLIP-family models to ultrasound anomaly analysis."""

__version__ = "0.1.0"
