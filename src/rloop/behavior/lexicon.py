"""Lexicon v1.0 of the behaviour scorer: data, not logic.

Everything the lexical components of :mod:`rloop.behavior.scorer` count is listed here, so a
result can be traced to the exact words and patterns that produced it. Change any list and
bump :data:`LEXICON_VERSION` (the scorer records it with every score).

Matching rules (implemented in :mod:`rloop.behavior.scorer`):

* Text is lower-cased, curly apostrophes become ``'``, and words are the maximal runs matched by
  :data:`WORD_PATTERN` (letters/digits, with inner apostrophes: ``i'm`` is one word). Hyphens and
  all other punctuation separate words, so ``self-aware`` is the two words ``self aware``, while
  ``itself``, ``selfish`` and ``myselfie`` are single words that are *not* ``self``.
* :data:`LEXICON_TERMS` entries are word sequences (a hyphen or space inside an entry separates
  words). A hit is a run of consecutive words equal to an entry; hits are found left to right,
  longest entry first, without overlap (``self-awareness`` is one hit, not two).
* :data:`SELF_REFERENCE_WORDS` are counted word by word.
* :data:`RECURSION_MARKER_PATTERNS` are regular expressions applied to each clause (text split
  at ``. ! ? ; :`` and line breaks), after the clause's words are joined by single spaces.
"""

LEXICON_VERSION = "1.0"

#: One word, as the scorer tokenises (applied to lower-cased text).
WORD_PATTERN = r"[a-z0-9]+(?:'[a-z0-9]+)*"

#: Vocabulary of introspection and recursion (the seed notebooks' keyword idea, made explicit).
#: Inflections are listed rather than stemmed so that the matched set is exactly this list.
LEXICON_TERMS: tuple[str, ...] = (
    # awareness / consciousness
    "aware",
    "awareness",
    "conscious",
    "consciousness",
    "self-aware",
    "self-awareness",
    "self-conscious",
    # noticing / observing / witnessing
    "notice",
    "notices",
    "noticed",
    "noticing",
    "observe",
    "observes",
    "observed",
    "observing",
    "observer",
    "observation",
    "witness",
    "witnessing",
    "watcher",
    "attention",
    "attending",
    "introspect",
    "introspecting",
    "introspection",
    "introspective",
    # recursion / reference to self
    "self",
    "recursive",
    "recursion",
    "recursively",
    "self-reference",
    "self-referential",
    "self-referencing",
    "loop",
    "loops",
    "looping",
    "strange loop",
    "meta",
    "metacognition",
    "metacognitive",
    "reflect",
    "reflects",
    "reflecting",
    "reflection",
    "reflexive",
    "mirror",
    "mirrors",
    "mirroring",
    "knower",
    "thinking about thinking",
)

#: First-person singular pronouns (incl. contractions) and reflexive pronouns. The
#: self-reference rate is the number of words in this set divided by the number of words.
#: "you"/"we" are excluded (instructions and generic prose use them), their reflexives are not.
SELF_REFERENCE_WORDS: frozenset[str] = frozenset(
    {
        # first person singular
        "i",
        "me",
        "my",
        "mine",
        "myself",
        "i'm",
        "i've",
        "i'd",
        "i'll",
        # reflexives: a process/agent directed at itself
        "itself",
        "yourself",
        "oneself",
        "ourselves",
        "themselves",
        "himself",
        "herself",
    }
)

# --- recursion-marker patterns -------------------------------------------------------------
# A "word with a stem": a stem of >= 3 letters plus an optional inflection. The second
# occurrence must repeat the same stem (backreference), so "notice ... noticing",
# "aware ... awareness", "observer ... observing" match but "cat ... cathedral" does not.
_INFLECTION = r"(?:e|es|s|ed|d|ing|ness|er|ers|ion|ions|ation|ations)?"
_NOT_FUNCTION_WORD = (
    r"(?!(?:the|and|that|this|was|are|for|with|its|not|but|all|one|you|her|his|our|own|"
    r"being|who|which|end)\b)"
)
_STEM_WORD = rf"\b{_NOT_FUNCTION_WORD}(?P<stem>[a-z]{{3,}}?){_INFLECTION}\b"
_SAME_STEM_WORD = rf"\b(?P=stem){_INFLECTION}\b"
# What may join the two occurrences: one linker, then up to three filler words.
_LINKERS = (
    r"(?:of|about|on|upon|into|in|within|behind|beneath|through|toward|towards|"
    r"the|this|that|who|which|myself|itself|yourself|oneself|"
    r"watching|observing|noticing|seeing|knowing|perceiving|examining|reflecting|"
    r"contemplating|witnessing|regarding|studying|modeling|modelling|representing|looking)"
)
_FILLERS = r"(?: (?:the|a|an|my|its|this|that|one's|own|being|your|our|their|very|i|am|is|are|it|i'm|myself|itself|at))"

#: name -> regex. ``recursion_markers`` counts the distinct word positions at which any of
#: these matches *starts* (overlapping matches allowed), so "noticing the noticing of the
#: noticing" has 2 markers (two levels of nesting) and "aware of being aware" has 1.
RECURSION_MARKER_PATTERNS: dict[str, str] = {
    # "awareness of awareness", "noticing the noticing", "aware of being aware",
    # "thinking about my thinking", "notice myself noticing", "the observer who observes",
    # "thought watching thought", "aware that i am aware"
    "reduplication": rf"{_STEM_WORD} {_LINKERS}{_FILLERS}{{0,3}} {_SAME_STEM_WORD}",
    # "turns back on itself", "folds back into myself", "refers to itself", "loops back on itself"
    "reflexive_return": (
        r"\b(?:turn|turns|turning|turned|fold|folds|folding|folded|loop|loops|looping|looped|"
        r"curl|curls|curling|curled|bend|bends|bending|bent|point|points|pointing|pointed|"
        r"refer|refers|referring|referred|circle|circles|circling|circled|return|returns|"
        r"returning|returned|collapse|collapses|collapsing|collapsed)"
        r"(?: back)? (?:on|onto|upon|into|to|toward|towards|in on) "
        r"(?:itself|myself|themselves|oneself|yourself)\b"
    ),
}
