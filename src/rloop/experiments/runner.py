"""What every experiment does around its measurement: load prompts and model, check the
request before anything is written, open (or resume) the run directory, record the manifest,
write tables, summary and plots, and mark the run complete or failed."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rloop.errors import PromptError


@dataclass
class RunOutcome:
    run_dir: Path
    already_complete: bool
    headline: dict


def load_prompt_set(prompts: str | None, bank_version: str = "v1", groups=None):
    """The shipped bank (``prompts`` None) or a user file, optionally restricted to groups."""
    from rloop.prompts import load_bank, load_prompt_file

    prompt_set = load_bank(bank_version) if prompts is None else load_prompt_file(prompts)
    if groups:
        missing = sorted(set(groups) - set(prompt_set.groups()))
        if missing:
            raise PromptError(
                f"group(s) {', '.join(missing)} not in the prompt set; "
                f"available: {', '.join(prompt_set.groups())}"
            )
        prompt_set = prompt_set.select(groups)
    if len(prompt_set) == 0:
        raise PromptError("the prompt set is empty: pass a file with at least one prompt")
    return prompt_set


def model_manifest(lm) -> dict:
    return {
        "name": lm.name,
        "source": lm.source,
        "path": str(lm.path),
        "revision": lm.revision,
        "weights_sha256": lm.weights_sha256,
        "dtype": str(lm.dtype).replace("torch.", ""),
        "device": str(lm.device),
        "family": lm.adapter.family,
        "n_layers": lm.adapter.n_layers,
        "n_heads": lm.adapter.n_heads,
        "n_kv_heads": lm.adapter.n_kv_heads,
        "d_head": lm.adapter.d_head,
    }


def prompts_manifest(prompt_set, tokenizer) -> dict:
    from rloop.prompts import token_length_report

    report = token_length_report(prompt_set, tokenizer)
    return {
        "source": str(prompt_set.source),
        "version": prompt_set.version,
        "sha256": prompt_set.sha256,
        "n": len(prompt_set),
        "groups": {g: int(n) for g, n in report.set_index("group")["n"].items()},
        "token_lengths": report.to_dict(orient="records"),
    }


def execute(
    experiment: str,
    config: dict,
    model_name: str,
    out: Path | None,
    body: Callable[..., dict],
    *,
    force: bool = False,
) -> RunOutcome:
    """Open the run directory and call ``body(run)``; ``body`` returns the headline metrics.

    Everything that can be rejected (bad settings, prompts, model) must be checked by the
    caller before this is called, so that a rejected request writes nothing.
    """
    from rloop.runs import Run, default_run_dir, runs_root

    run_dir = (
        Path(out)
        if out is not None
        else default_run_dir(runs_root(), experiment, model_name, config)
    )
    with Run.open(run_dir, experiment=experiment, config=config, resume=not force) as run:
        if run.already_complete and not force:
            return RunOutcome(run.path, True, run.manifest.get("headline", {}))
        started = time.time()
        headline = body(run)
        run.update_manifest(headline=headline, wall_seconds=time.time() - started)
        run.complete()
    return RunOutcome(run_dir, False, headline)
