"""Readers of the list-valued options: integer lists and ranges, layer pairs, names, numbers.

Every command reads its list options with these functions before it loads a model, so bad
input is one line (a ConfigError naming the flag and showing a correct example) and nothing
is computed or written.
"""

from __future__ import annotations

from pathlib import Path

from rloop.errors import ConfigError


def _read_item(item: str, flag: str, text: str) -> list[int]:
    """One comma-separated item: 'N' -> [N]; 'LOW-HIGH' -> [LOW, ..., HIGH] (both included)."""
    bounds = [bound.strip() for bound in item.split("-")]
    if len(bounds) > 2 or not all(bound.isdigit() for bound in bounds):
        raise ConfigError(
            f"cannot read {flag} {text!r}: write integers and LOW-HIGH ranges, e.g. 3,7,10-12"
        )
    low, high = int(bounds[0]), int(bounds[-1])
    if low > high:
        raise ConfigError(
            f"reversed range {low}-{high} in {flag}: write LOW-HIGH, e.g. {high}-{low}"
        )
    return list(range(low, high + 1))


def parse_int_list(text: str | None, flag: str) -> list[int] | None:
    """'5,28' -> [5, 28]; '15-18' -> [15, 16, 17, 18]; '3,7,10-12' -> [3, 7, 10, 11, 12].

    None (the option was not given) stays None. Order is kept as written.
    """
    if text is None:
        return None
    values: list[int] = []
    for item in text.split(","):
        values.extend(_read_item(item, flag, text))
    return values


def parse_layer_pair(text: str | None, flag: str) -> list[int] | None:
    """'5,28' -> [5, 28]: the EARLY,LATE layers of R_V, EARLY below LATE. None stays None."""
    if text is None:
        return None
    items = [item.strip() for item in text.split(",")]
    if len(items) != 2 or not all(item.isdigit() for item in items):
        raise ConfigError(
            f"{flag} needs two layers EARLY,LATE separated by a comma, e.g. 5,28; got {text!r}"
        )
    early, late = int(items[0]), int(items[1])
    if early >= late:
        raise ConfigError(
            f"{flag} {text}: the early layer {early} must be below the late layer {late}; "
            f"write EARLY,LATE, e.g. {min(early, late)},{max(early, late) + (early == late)}"
        )
    return [early, late]


def parse_layer_ranges(text: str | None, flag: str) -> list[str] | None:
    """'15-29;23-27;25' -> ['15-29', '23-27', '25']: ranges separated by ';', each checked."""
    if text is None:
        return None
    ranges = [part.strip() for part in text.split(";") if part.strip()]
    for part in ranges:
        _read_item(part, flag, text)
    return ranges or None


def parse_names(text: str | None) -> list[str] | None:
    """'L5, factual' -> ['L5', 'factual']; None or nothing but commas -> None (the default)."""
    names = [part.strip() for part in (text or "").split(",") if part.strip()]
    return names or None


def parse_float_list(text: str | None, flag: str) -> list[float] | None:
    """'0,0.5,1' -> [0.0, 0.5, 1.0]; None stays None (the default); an empty list is an error."""
    if text is None:
        return None
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise ConfigError(
            f"{flag} is empty: write numbers like 0,0.5,1 (or leave {flag} out for the default)"
        )
    try:
        return [float(part) for part in parts]
    except ValueError:
        raise ConfigError(f"cannot read {flag} {text!r}: write numbers like 0,0.5,1") from None


def parse_max_prompts(count: int, flag: str = "--max-prompts") -> int | None:
    """A prompt limit: 0 -> None (all prompts); a positive count stays; negative is an error."""
    if count < 0:
        raise ConfigError(f"{flag} must be 0 (all prompts) or a positive count, got {count}")
    return count or None


def path_text(path: Path | None) -> str | None:
    """A path option as the string the experiment configs hold (None stays None)."""
    return str(path) if path is not None else None
