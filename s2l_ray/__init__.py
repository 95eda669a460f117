"""SmallToLarge (S2L) data selection for LLM fine-tuning, distributed with Ray."""

__version__ = "0.1.0"
