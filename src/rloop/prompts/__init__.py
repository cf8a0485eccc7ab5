"""Prompt bank (versioned data in ``data/``) and user prompt files.

>>> from rloop.prompts import DEFAULT_CONTRAST, DEFAULT_PAIRED_CONTRAST, load_bank
>>> bank = load_bank("v1").select(DEFAULT_CONTRAST)
>>> pairs = load_bank("v2").pairs(*DEFAULT_PAIRED_CONTRAST)  # [(L5 prompt, its twin), ...]
"""

from rloop.prompts.bank import (
    BASELINE_GROUPS,
    CONTROL_GROUPS,
    DEFAULT_BANK_VERSION,
    DEFAULT_CONTRAST,
    DEFAULT_PAIRED_CONTRAST,
    GROUP_FAMILY,
    MAX_LEVEL,
    PROMPT_FILE_SUFFIXES,
    PROMPT_STYLES,
    RECURSIVE_GROUPS,
    TWIN_GROUPS,
    Prompt,
    PromptSet,
    bank_versions,
    check_window,
    load_bank,
    load_prompt_file,
    token_counts,
    token_length_report,
)

__all__ = [
    "BASELINE_GROUPS",
    "CONTROL_GROUPS",
    "DEFAULT_BANK_VERSION",
    "DEFAULT_CONTRAST",
    "DEFAULT_PAIRED_CONTRAST",
    "GROUP_FAMILY",
    "MAX_LEVEL",
    "PROMPT_FILE_SUFFIXES",
    "PROMPT_STYLES",
    "RECURSIVE_GROUPS",
    "TWIN_GROUPS",
    "Prompt",
    "PromptSet",
    "bank_versions",
    "check_window",
    "load_bank",
    "load_prompt_file",
    "token_counts",
    "token_length_report",
]
