"""rloop: geometry of transformer activations (participation ratio, R_V) and the causal
experiments around it."""

__version__ = "0.1.0"
