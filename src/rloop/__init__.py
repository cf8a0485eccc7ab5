"""rloop: geometry of transformer activations (participation ratio, R_V) and the causal
experiments around it.

The main verbs are here for notebooks: ``rloop.load``, ``rloop.contraction``,
``rloop.ablate``, ``rloop.validate``, ``rloop.verify``, ``rloop.gain``; each returns a
:class:`rloop.api.Result` (tables as DataFrames, ``.summary()``, ``.plot(name)``, ``.save``).
"""

__version__ = "0.1.0"

from rloop.api import (  # noqa: E402
    Result,
    ablate,
    ablate_group,
    ablate_layer,
    attn_vs_mlp,
    attribution,
    contraction,
    gain,
    heads,
    kv_patch,
    load,
    patch,
    robustness,
    saliency,
    subspace,
    temporal,
    validate,
    verify,
)

__all__ = [
    "Result",
    "ablate",
    "ablate_group",
    "ablate_layer",
    "attn_vs_mlp",
    "attribution",
    "contraction",
    "gain",
    "heads",
    "kv_patch",
    "load",
    "patch",
    "robustness",
    "saliency",
    "subspace",
    "temporal",
    "validate",
    "verify",
]
