"""Sparse autoencoders (SAEs) on rloop's activations.

- :mod:`rloop.sae.format`: the SAE model and the SAELens on-disk format (cfg.json +
  sae_weights.safetensors), read and written without the sae-lens package.
- :mod:`rloop.sae.train`: train a TopK or ReLU SAE on CPU with held-out metrics.
- :mod:`rloop.sae.features`: feature activations of windows, differential features between
  prompt groups, top-activating tokens, and how much of a subspace features' decoders span.
"""

from rloop.sae.features import (
    decoder_span_share,
    differential_features,
    feature_activations,
    top_activating,
)
from rloop.sae.format import (
    ARCHITECTURES,
    SparseAutoencoder,
    check_d_in,
    load_sae,
    save_sae,
)
from rloop.sae.train import evaluate_sae, geometric_median, train_sae

__all__ = [
    "ARCHITECTURES",
    "SparseAutoencoder",
    "check_d_in",
    "decoder_span_share",
    "differential_features",
    "evaluate_sae",
    "feature_activations",
    "geometric_median",
    "load_sae",
    "save_sae",
    "top_activating",
    "train_sae",
]
