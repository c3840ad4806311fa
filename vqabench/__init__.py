"""vqabench: benchmark preference alignment of BLIP VQA models on quality and cost."""

__version__ = "0.1.0"
