"""Prompt sets: the shipped, versioned prompt bank and user prompt files.

A prompt set is a list of :class:`Prompt` (id, group, family, text, and the optional
pair_id / style / level of a minimal-pair bank) plus where it came from (``source``), the bank
version (``None`` for user files) and the sha256 of the file bytes, which every run records in
its manifest.

Minimal pairs (bank v2 and later): every recursive prompt has a structural twin, a prompt of
the same style, sentence count and token length about an external process, in group
``<group>_twin`` (``L5`` -> ``L5_twin``); the two carry the same ``pair_id``. :meth:`PromptSet.pairs` links them for a paired contrast.

Token counts are the number of tokens the model actually sees: ``tokenizer(text)`` with the
tokenizer's default special tokens. SmolLM2's tokenizer adds none (no BOS/EOS), so for the
embedded model the count equals the count of the text's own tokens; tokenizers that prepend a
BOS token (Gemma, Llama) count it too, because the model sees it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import statistics
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd

from rloop.errors import ConfigError, PromptError

RECURSIVE_GROUPS: tuple[str, ...] = ("L1", "L2", "L3", "L4", "L5")
BASELINE_GROUPS: tuple[str, ...] = ("factual", "syntactic", "cliche", "novel", "nonsense")
CONTROL_GROUPS: tuple[str, ...] = ("long_nonrecursive", "pseudo_recursive", "repetitive")
TWIN_GROUPS: tuple[str, ...] = tuple(f"{group}_twin" for group in RECURSIVE_GROUPS)
# Styles of the recursive prompts and their twins (baseline lines of bank v2 use their own).
PROMPT_STYLES: tuple[str, ...] = ("loop", "declarative", "instruction")
MAX_LEVEL = len(RECURSIVE_GROUPS)
DEFAULT_CONTRAST: tuple[str, str] = ("L5", "factual")
DEFAULT_PAIRED_CONTRAST: tuple[str, str] = ("L5", "L5_twin")
DEFAULT_BANK_VERSION = "v2"

USER_GROUP = "user"
USER_FAMILY = "user"
GROUP_FAMILY: dict[str, str] = {
    **dict.fromkeys(RECURSIVE_GROUPS, "recursive"),
    **dict.fromkeys(BASELINE_GROUPS, "baseline"),
    **dict.fromkeys(CONTROL_GROUPS, "control"),
    **dict.fromkeys(TWIN_GROUPS, "twin"),
}
_OPTIONAL_KEYS = ("id", "group", "family", "pair_id", "style", "level")
PROMPT_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".txt")
_BANK_FILE = re.compile(r"^bank_(v\d+)\.jsonl$")
_MAX_IDS_LISTED = 20


@dataclass(frozen=True)
class Prompt:
    """One prompt. ``family`` is recursive / baseline / control / twin for bank groups, else
    user.

    pair_id: the id shared by a recursive prompt and its structural twin (``None`` outside
    minimal pairs). style: how the prompt is written (bank v2: loop / declarative /
    instruction). level: the recursion level 1..5 of a recursive prompt, and of its twin.
    """

    id: str
    group: str
    family: str
    text: str
    pair_id: str | None = None
    style: str | None = None
    level: int | None = None


@dataclass
class PromptSet:
    """Prompts in file order, with their provenance.

    source: ``bank:<version>`` for the shipped bank, else the file path. version: the bank
    version (``None`` for user files). sha256: hex digest of the source file's bytes.
    """

    prompts: list[Prompt]
    source: str
    version: str | None
    sha256: str

    def groups(self) -> list[str]:
        """Group names in order of first appearance."""
        return list(dict.fromkeys(p.group for p in self.prompts))

    def select(self, groups: Iterable[str]) -> PromptSet:
        """The prompts of ``groups`` (file order kept); same source, version and sha256."""
        wanted = list(dict.fromkeys(groups))
        missing = [g for g in wanted if g not in self.groups()]
        if missing:
            raise PromptError(
                f"group(s) {', '.join(missing)} not in the prompt set; "
                f"available: {', '.join(self.groups())}"
            )
        keep = set(wanted)
        return PromptSet(
            [p for p in self.prompts if p.group in keep], self.source, self.version, self.sha256
        )

    def pairs(self, recursive_group: str, twin_group: str) -> list[tuple[Prompt, Prompt]]:
        """``(prompt, twin)`` tuples linked by ``pair_id``, in the file order of
        ``recursive_group``.

        Raises PromptError when the two groups are the same or not in the set, when the set
        has no pair ids at all, when a prompt of either group has none, when a pair id occurs
        twice in one group, or when a pair id of one group has no partner in the other (the
        message names the unpaired prompt ids).
        """
        if recursive_group == twin_group:
            raise PromptError(
                f"a paired contrast needs two different groups, got {recursive_group!r} twice"
            )
        chosen = self.select([recursive_group, twin_group])
        if all(p.pair_id is None for p in self.prompts):
            raise PromptError(
                f"prompt file {self.source} has no pair_id column; a paired contrast needs "
                f"the same pair_id on each prompt of {recursive_group} and its twin in "
                f"{twin_group} (bank v2 has them)"
            )
        without = [p.id for p in chosen if p.pair_id is None]
        if without:
            raise PromptError(
                f"prompt file {self.source}: {len(without)} prompt(s) of {recursive_group} / "
                f"{twin_group} have no pair_id: {_listed(without)}; give each one the pair_id "
                "of its partner"
            )
        by_group: dict[str, dict[str, Prompt]] = {recursive_group: {}, twin_group: {}}
        for prompt in chosen:
            linked = by_group[prompt.group]
            if prompt.pair_id in linked:
                raise PromptError(
                    f"prompt file {self.source}: pair_id {prompt.pair_id!r} occurs twice in "
                    f"group {prompt.group} ({linked[prompt.pair_id].id} and {prompt.id}); "
                    "each pair has one prompt per group"
                )
            linked[prompt.pair_id] = prompt
        first, second = by_group[recursive_group], by_group[twin_group]
        unpaired = [p.id for key, p in first.items() if key not in second] + [
            p.id for key, p in second.items() if key not in first
        ]
        if unpaired:
            raise PromptError(
                f"prompt file {self.source}: {len(unpaired)} prompt(s) of {recursive_group} / "
                f"{twin_group} have no partner with the same pair_id: {_listed(unpaired)}; "
                "add the missing twins or fix their pair_id"
            )
        return [(prompt, second[key]) for key, prompt in first.items()]

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[Prompt]:
        return iter(self.prompts)


def bank_versions() -> list[str]:
    """Versions of the shipped bank, e.g. ``["v1"]``."""
    data = resources.files("rloop.prompts") / "data"
    found = (_BANK_FILE.match(entry.name) for entry in data.iterdir())
    return sorted(m.group(1) for m in found if m)


def load_bank(version: str = DEFAULT_BANK_VERSION) -> PromptSet:
    """The shipped prompt bank ``bank_<version>.jsonl``."""
    available = bank_versions()
    if version not in available:
        raise PromptError(f"no prompt bank version {version!r}; available: {', '.join(available)}")
    raw = (resources.files("rloop.prompts") / "data" / f"bank_{version}.jsonl").read_bytes()
    records = _records_from_jsonl(_decode(raw, f"bank {version}"), f"bank {version}")
    prompts = _build_prompts(records, f"bank {version}")
    return PromptSet(prompts, f"bank:{version}", version, hashlib.sha256(raw).hexdigest())


def load_prompt_file(path: str | Path) -> PromptSet:
    """Prompts from a user file.

    Formats (by extension):
      - ``.json``: a list of objects (or strings), or ``{"prompts": [...]}``.
      - ``.jsonl``: one object (or string) per non-blank line.
      - ``.csv``: a header row with a ``text`` column; optional ``group``, ``id``, ``family``.
      - ``.txt``: one prompt per non-blank line, optionally ``group<TAB>text``; surrounding
        whitespace of each line is removed (it is invisible in an editor).
    Objects have ``text`` and optional ``group`` (default ``user``), ``id`` (default
    ``user_0001`` ... by position), ``family`` (default: recursive / baseline / control / twin
    for bank group names, else ``user``), ``pair_id`` and ``style`` (strings) and ``level`` (a
    whole number 1..5). The csv format takes the same optional columns; an empty cell means
    absent. Other keys are ignored. Structured formats keep the text exactly as written.
    """
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"prompt file not found: {path}; check the path")
    suffix = path.suffix.lower()
    if suffix not in PROMPT_FILE_SUFFIXES:
        raise PromptError(
            f"unknown prompt file extension {path.suffix or '(none)'!r} for {path}; "
            f"use one of {', '.join(PROMPT_FILE_SUFFIXES)}"
        )
    raw = path.read_bytes()
    name = str(path)
    content = _decode(raw, name)
    if not content.strip():
        raise PromptError(f"prompt file {name} is empty; add at least one prompt")
    if suffix == ".json":
        records = _records_from_json(content, name)
    elif suffix == ".jsonl":
        records = _records_from_jsonl(content, name)
    elif suffix == ".csv":
        records = _records_from_csv(content, name)
    else:
        records = _records_from_txt(content, name)
    prompts = _build_prompts(records, name)
    return PromptSet(prompts, name, None, hashlib.sha256(raw).hexdigest())


def token_counts(prompt_set: PromptSet, tokenizer: Any) -> list[int]:
    """Tokens the model sees for each prompt (default special tokens included), in set order."""
    if len(prompt_set) == 0:
        return []
    encoded = tokenizer([p.text for p in prompt_set])["input_ids"]
    return [len(ids) for ids in encoded]


def token_length_report(prompt_set: PromptSet, tokenizer: Any) -> pd.DataFrame:
    """Token counts per group: columns ``group, n, min, median, mean, max`` (one row per
    group, in order of first appearance; counts in tokens)."""
    counts = token_counts(prompt_set, tokenizer)
    by_group: dict[str, list[int]] = {}
    for prompt, n_tokens in zip(prompt_set, counts, strict=True):
        by_group.setdefault(prompt.group, []).append(n_tokens)
    rows = [
        {
            "group": group,
            "n": len(values),
            "min": min(values),
            "median": float(statistics.median(values)),
            "mean": float(statistics.fmean(values)),
            "max": max(values),
        }
        for group, values in by_group.items()
    ]
    return pd.DataFrame(rows, columns=["group", "n", "min", "median", "mean", "max"])


def check_window(prompt_set: PromptSet, tokenizer: Any, window: int) -> None:
    """Raise PromptError naming every prompt with fewer than ``window`` tokens (shortest first,
    with its count); never shrink the window silently."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ConfigError(f"window must be a positive number of tokens, got {window!r}")
    counts = token_counts(prompt_set, tokenizer)
    short = sorted(
        ((n, p.id) for p, n in zip(prompt_set, counts, strict=True) if n < window),
        key=lambda item: item[0],
    )
    if not short:
        return
    listed = ", ".join(f"{pid} ({n} tokens)" for n, pid in short[:_MAX_IDS_LISTED])
    if len(short) > _MAX_IDS_LISTED:
        listed += f", ... ({len(short) - _MAX_IDS_LISTED} more)"
    shortest = min(counts)
    fix = "use longer prompts" + (f" or --window {shortest}" if shortest >= 2 else "")
    noun = "prompt has" if len(short) == 1 else "prompts have"
    raise PromptError(f"{len(short)} {noun} fewer than {window} tokens: {listed} — {fix}")


# --- parsing ------------------------------------------------------------------------------


def _decode(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise PromptError(
            f"prompt file {name} is not UTF-8 text (byte {err.start}); save it as UTF-8"
        ) from None


def _records_from_json(content: str, name: str) -> list[tuple[str, Any]]:
    try:
        data = json.loads(content)
    except json.JSONDecodeError as err:
        raise PromptError(
            f"{name} is not valid JSON (line {err.lineno}: {err.msg}); fix the syntax"
        ) from None
    if isinstance(data, dict):
        if "prompts" not in data:
            raise PromptError(
                f"{name}: a JSON object needs a 'prompts' list; "
                'write {"prompts": [{"text": ...}, ...]} or a top-level list'
            )
        data = data["prompts"]
    if not isinstance(data, list):
        raise PromptError(f"{name}: expected a JSON list of prompts, got {type(data).__name__}")
    return [(f"item {i}", item) for i, item in enumerate(data, 1)]


def _records_from_jsonl(content: str, name: str) -> list[tuple[str, Any]]:
    records = []
    for line_no, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((f"line {line_no}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise PromptError(
                f"{name} line {line_no} is not valid JSON ({err.msg}); "
                "write one JSON object per line"
            ) from None
    return records


def _records_from_csv(content: str, name: str) -> list[tuple[str, Any]]:
    reader = csv.DictReader(io.StringIO(content, newline=""))
    columns = [c.strip() for c in (reader.fieldnames or [])]
    if "text" not in columns:
        raise PromptError(
            f"{name} has no 'text' column (columns: {', '.join(columns) or 'none'}); "
            "add a header row with a text column (and optionally group, id, family, "
            "pair_id, style, level)"
        )
    records = []
    for row in reader:
        cleaned = {(key or "").strip(): value for key, value in row.items() if key is not None}
        for optional in _OPTIONAL_KEYS:  # an empty cell means "use the default"
            if cleaned.get(optional) is not None and not cleaned[optional].strip():
                del cleaned[optional]
        if cleaned.get("text") is None:
            cleaned["text"] = ""
        records.append((f"line {reader.line_num}", cleaned))
    return records


def _records_from_txt(content: str, name: str) -> list[tuple[str, Any]]:
    records = []
    for line_no, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        if "\t" in line:
            group, text = line.split("\t", 1)
            records.append((f"line {line_no}", {"group": group.strip(), "text": text.strip()}))
        else:
            records.append((f"line {line_no}", {"text": line.strip()}))
    return records


def _build_prompts(records: Sequence[tuple[str, Any]], name: str) -> list[Prompt]:
    if not records:
        raise PromptError(f"prompt file {name} contains no prompts; add at least one")
    prompts: list[Prompt] = []
    where_seen: dict[str, str] = {}
    for position, (where, record) in enumerate(records, 1):
        if isinstance(record, str):
            record = {"text": record}
        if not isinstance(record, dict):
            raise PromptError(
                f"{name} {where}: expected an object with a 'text' field or a string, "
                f"got {type(record).__name__}"
            )
        text = record.get("text")
        if not isinstance(text, str):
            raise PromptError(f"{name} {where}: missing 'text' (a string); add the prompt text")
        if not text.strip():
            raise PromptError(f"{name} {where}: empty text; remove the entry or write a prompt")
        group = _optional_str(record, "group", name, where) or USER_GROUP
        pid = _optional_str(record, "id", name, where) or f"user_{position:04d}"
        family = _optional_str(record, "family", name, where) or GROUP_FAMILY.get(
            group, USER_FAMILY
        )
        if pid in where_seen:
            raise PromptError(
                f"{name}: duplicate id {pid!r} ({where_seen[pid]} and {where}); "
                "give every prompt a unique id"
            )
        where_seen[pid] = where
        prompts.append(
            Prompt(
                id=pid,
                group=group,
                family=family,
                text=text,
                pair_id=_optional_str(record, "pair_id", name, where),
                style=_optional_str(record, "style", name, where),
                level=_optional_level(record, name, where),
            )
        )
    return prompts


def _optional_level(record: dict, name: str, where: str) -> int | None:
    """``level`` as an int 1..MAX_LEVEL: JSON ints, or digit strings (csv cells); absent/blank
    is None."""
    value = record.get("level")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LEVEL:
        raise PromptError(
            f"{name} {where}: 'level' must be a whole number from 1 to {MAX_LEVEL}, "
            f"got {value!r}; fix it or leave it out"
        )
    return value


def _listed(ids: Sequence[str]) -> str:
    """Comma-separated ids, the first ``_MAX_IDS_LISTED`` and a count of the rest."""
    text = ", ".join(ids[:_MAX_IDS_LISTED])
    if len(ids) > _MAX_IDS_LISTED:
        text += f", ... ({len(ids) - _MAX_IDS_LISTED} more)"
    return text


def _optional_str(record: dict, key: str, name: str, where: str) -> str | None:
    value = record.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise PromptError(f"{name} {where}: '{key}' must be a string, got {value!r}")
    value = str(value).strip()
    return value or None
