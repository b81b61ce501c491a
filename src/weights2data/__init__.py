"""weights2data: recover an approximation of a language model's finetuning data from its weights."""

from weights2data.errors import W2DError

__all__ = ["W2DError"]
__version__ = "0.1.0"
