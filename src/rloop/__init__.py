"""rloop: geometry of transformer activations (participation ratio, R_V) and the causal
experiments around it.

The main verbs are here for notebooks: ``rloop.load``, ``rloop.contraction``,
``rloop.ablate``, ``rloop.validate``, ``rloop.verify``, ``rloop.gain``; each returns a
:class:`rloop.api.Result` (tables as DataFrames, ``.summary()``, ``.plot(name)``, ``.save``).
"""

__version__ = "0.1.0"

from rloop.api import Result, ablate, contraction, gain, load, validate, verify  # noqa: E402

__all__ = ["Result", "ablate", "contraction", "gain", "load", "validate", "verify"]
