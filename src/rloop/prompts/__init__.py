"""Prompt bank (versioned data in ``data/``) and user prompt files.

>>> from rloop.prompts import load_bank, DEFAULT_CONTRAST
>>> bank = load_bank("v1").select(DEFAULT_CONTRAST)
"""

from rloop.prompts.bank import (
    BASELINE_GROUPS,
    CONTROL_GROUPS,
    DEFAULT_BANK_VERSION,
    DEFAULT_CONTRAST,
    GROUP_FAMILY,
    PROMPT_FILE_SUFFIXES,
    RECURSIVE_GROUPS,
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
    "GROUP_FAMILY",
    "PROMPT_FILE_SUFFIXES",
    "RECURSIVE_GROUPS",
    "Prompt",
    "PromptSet",
    "bank_versions",
    "check_window",
    "load_bank",
    "load_prompt_file",
    "token_counts",
    "token_length_report",
]
