"""dlrt: Dynamical Low-Rank Training (Schotthöfer et al., NeurIPS 2022), exact and in one pass per batch."""

from .convert import convert, merge
from .layers import LowRankConv2d, LowRankLinear, low_rank_layers
from .optim import METHODS, DLRTOptimizer
from . import metrics

__all__ = ["LowRankLinear", "LowRankConv2d", "low_rank_layers", "convert", "merge", "DLRTOptimizer", "METHODS", "metrics"]
__version__ = "0.1.0"
