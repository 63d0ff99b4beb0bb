"""recomp-eval: evaluation harness for training-free visual-token compression in LLaVA models."""

__version__ = "0.1.0"
