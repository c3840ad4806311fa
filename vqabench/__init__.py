"""vqabench: benchmark preference alignment of vision-language (VQA) models on quality and cost."""

__version__ = "0.1.0"
