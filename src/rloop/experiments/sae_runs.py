"""Sparse autoencoders on rloop's activations: ``rloop sae train`` and ``rloop sae features``.

``rloop sae train`` collects the activations of one hook point at one layer (heads flattened
for per-head points) at every real token of the shipped prompt banks (or a prompt file), plus
the tokens of short sampled continuations of every prompt, trains a TopK or ReLU + L1 SAE on
them (:mod:`rloop.sae.train`) and saves it in the SAELens format inside the run directory
(``<run>/sae``). Prompts, not tokens, are held out: the metrics on held-out prompts are the
honest ones. A few tens of thousands of tokens is a small-scale tool for this prompt
distribution, not a general dictionary of the model's features; the summary says so.

An interrupted ``rloop sae train`` resumes. Each prompt batch's activations are a checkpoint of
the shared runner (:func:`rloop.experiments.runner.run_units`): one row per prompt with its
activations flattened into a float32 array column, which parquet stores as IEEE single floats,
so they read back bit for bit in one fixed schema whatever the hook point's width (float32
columns would round-trip too, but one per dimension: thousands of columns, a different schema
per point). While it runs the collection holds about n_tokens x d x 4 bytes in ``partial/``.
Every :data:`CHECKPOINT_EVERY` steps and after the last the training saves its whole state
(SAE parameters, Adam moments, step, the batch order's generator state, the loss log so far) as
one file, ``partial/sae-training-state.pt``, replaced atomically, so the state and the loss log
always belong together; a rerun continues from the last saved step and, on the CPU with the same
thread count, ends with the SAE an uninterrupted run gives, bit for bit. ``partial/`` is
removed when the run completes.

``rloop sae features --sae DIR`` encodes the last W real tokens of every recursive and baseline
(or twin) prompt with an SAE in the SAELens format, checks that its d_in matches the hook point,
and reports the features whose mean activation differs between the groups (bootstrap CI over
prompts, Welch or Mann-Whitney p, Benjamini-Hochberg across features), the prompts and tokens
where the top features fire most, and how much of the contracted subspace (the top-k
directions of the recursive windows at the same hook point, as ``rloop subspace`` finds them)
the decoder directions of the top-n differential features span, against random feature sets.
It keeps no resume checkpoints: a run takes seconds (about 11 s on the embedded model) and its
per-batch state, the raw windows at the hook point, is larger than its tables, so an
interrupted run is simply run again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import pickle
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from rloop.capture.generation import SamplingConfig, generate, pad_id_of, tokenize_rows
from rloop.capture.trace import Trace, address
from rloop.errors import ConfigError, PromptError
from rloop.experiments.runner import (
    PromptBatch,
    execute,
    model_manifest,
    prompt_batches,
    prompts_manifest,
    record_inputs,
    run_units,
)
from rloop.experiments.settings import Settings, check_settings, load, load_prompt_set, prepare
from rloop.experiments.subspace import capture_windows, point_width
from rloop.interventions.engine import resolve_layers
from rloop.metrics.subspace import top_directions
from rloop.progress import progress_bar
from rloop.prompts import PromptSet, bank_versions, load_bank
from rloop.runs import Run
from rloop.runs.layout import atomic_write, now_iso
from rloop.runs.markdown import markdown_table, model_line
from rloop.runs.plots import _save, plt
from rloop.sae import (
    check_d_in,
    decoder_span_share,
    differential_features,
    evaluate_sae,
    feature_activations,
    load_sae,
    save_sae,
    top_activating,
)
from rloop.sae.features import DIFFERENTIAL_TESTS
from rloop.sae.train import TRAIN_ARCHITECTURES, SAETrainer

TRAIN_EXPERIMENT = "sae-train"
FEATURES_EXPERIMENT = "sae-features"
SAE_DIRNAME = "sae"
CHECKPOINT_EVERY = 500  # SAE training steps between saved training states
TRAINING_STATE = "sae-training-state.pt"  # in partial/, removed when the run completes
LOG_EVERY = 50  # training steps between loss log rows
# SAELens / TransformerLens hook names -> rloop points (blocks.L.<name>)
_HOOK_NAMES = {
    "hook_resid_pre": "resid_pre",
    "hook_resid_post": "resid_post",
    "hook_attn_out": "attn_out",
    "hook_mlp_out": "mlp_out",
    "attn.hook_z": "z",
    "attn.hook_v": "v",
    "attn.hook_k": "k",
    "attn.hook_q": "q",
}
_ADDRESS = re.compile(r"^blocks\.(\d+)\.([a-z_.]+)$")


# ============================================================================== sae train
@dataclass
class SAETrainConfig(Settings):
    """Settings of ``rloop sae train`` (defaults match the CLI and finish in about five
    minutes for the embedded model on a 2-core CPU). ``prompts`` None = every shipped bank
    (``all_banks``) or the bank ``bank_version``."""

    layer: int | None = None  # None: the late R_V layer
    point: str = "resid_post"
    architecture: str = "topk"
    d_sae: int = 2048
    k: int = 32
    l1: float = 1.0
    steps: int = 4000
    lr: float = 1e-3
    train_batch_size: int = 256
    all_banks: bool = True
    continuation_tokens: int = 16  # sampled tokens after each prompt; 0 = prompts only
    temperature: float = 1.0
    top_p: float = 0.9
    skip_first: int = 1  # real tokens dropped at the start of each sequence (attention sink)
    heldout_prompts: float = 0.1  # share of prompts held out for the metrics
    batch_size: int = 64  # prompts per forward / generate call (larger is faster on CPU)


def _check_train(config: SAETrainConfig) -> None:
    check_settings(config)
    if config.architecture not in TRAIN_ARCHITECTURES:
        raise ConfigError(
            f"unknown SAE architecture {config.architecture!r}: choose "
            f"{' or '.join(TRAIN_ARCHITECTURES)}"
        )
    for name in ("d_sae", "steps", "train_batch_size"):
        if getattr(config, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    if config.architecture == "topk" and not 1 <= config.k <= config.d_sae:
        raise ConfigError(f"--k must lie in 1..{config.d_sae} (--d-sae), got {config.k}")
    if not (config.lr > 0 and math.isfinite(config.lr)):
        raise ConfigError(f"--lr must be a positive number, got {config.lr}")
    if not (config.l1 >= 0 and math.isfinite(config.l1)):
        raise ConfigError(f"--l1 must be a non-negative number, got {config.l1}")
    if config.continuation_tokens < 0 or config.skip_first < 0:
        raise ConfigError("--continuation-tokens and --skip-first must be 0 or more")
    if not 0 <= config.heldout_prompts < 1:
        raise ConfigError(f"--heldout-prompts must lie in [0, 1), got {config.heldout_prompts}")
    if config.continuation_tokens:
        _sampling(config)


def _sampling(config: SAETrainConfig) -> SamplingConfig:
    return SamplingConfig(config.continuation_tokens, config.temperature, config.top_p, config.seed)


def training_prompts(config: SAETrainConfig) -> PromptSet:
    """The prompt file, the bank ``bank_version``, or every shipped bank (ids prefixed with
    the version, duplicate texts kept once), restricted to ``groups``."""
    if config.prompts is not None or not config.all_banks:
        return load_prompt_set(config.prompts, config.bank_version, config.groups)
    prompts, seen, digests = [], set(), []
    for version in bank_versions():
        bank = load_bank(version)
        digests.append(bank.sha256)
        for p in bank.select(config.groups) if config.groups else bank:
            if p.text not in seen:
                seen.add(p.text)
                prompts.append(dataclasses.replace(p, id=f"{version}:{p.id}"))
    if not prompts:
        raise PromptError("no prompts in the shipped banks for these groups")
    versions = "+".join(bank_versions())
    digest = hashlib.sha256("".join(digests).encode()).hexdigest()
    return PromptSet(prompts, f"bank:{versions}", versions, digest)


def _real_rows(values: torch.Tensor, mask: torch.Tensor, skip: int) -> list[torch.Tensor]:
    """Per row b: values[b] at real positions (mask 1), the first ``skip`` dropped -> (n_b, d)."""
    flat = values.flatten(2) if values.dim() == 4 else values  # (B, T, d)
    return [flat[b][mask[b].bool()][skip:].float().cpu() for b in range(flat.shape[0])]


def _batch_key(batch: PromptBatch) -> str:
    """Checkpoint key of a prompt batch: its number and a digest of its prompts' positions (a
    batch planned differently in a later session is computed again, not mistaken for it)."""
    digest = hashlib.sha256(",".join(map(str, batch.indices)).encode()).hexdigest()[:8]
    return f"activations-{batch.number:05d}-{digest}"


def batch_activations(lm, batch: PromptBatch, layer: int, point: str, config: SAETrainConfig):
    """One row per prompt of ``batch``: its position in the prompt list, its activations
    (n_rows, width) at ``point`` flattened row-major into a float32 array, and the number of
    sampled continuation tokens among them."""
    point_address = address(layer, point)
    if config.continuation_tokens:
        rows = tokenize_rows(lm.tokenizer, [p.text for p in batch.prompts])
        result = generate(
            lm.model,
            lm.adapter,
            rows,
            _sampling(config),
            [point_address],
            pad_id_of(lm.tokenizer),
            None,
        )
        values, mask = result.captured[point_address], result.attention_mask
        n_generated = int(result.new_tokens.shape[1])  # per prompt
    else:
        encoded = batch.encode(lm)
        with (
            torch.no_grad(),
            Trace(lm.model, lm.adapter, [point_address], stop_after_layer=layer) as tr,
        ):
            lm.model(**encoded.model_inputs(), use_cache=False)
        values, mask = tr[point_address], encoded.model_inputs()["attention_mask"]
        n_generated = 0
    real = _real_rows(values, mask, config.skip_first)  # (n_b, width) per prompt
    return pd.DataFrame(
        {
            "prompt_index": batch.indices,
            "n_rows": [rows_b.shape[0] for rows_b in real],
            "width": [rows_b.shape[1] for rows_b in real],
            "n_generated": n_generated,
            "activations": [rows_b.numpy().reshape(-1) for rows_b in real],
        }
    )


def collect_activations(
    lm, prompts, layer: int, point: str, config: SAETrainConfig, run: Run | None = None
):
    """Activations (n_i, d) float32 of every prompt (and its continuation) at ``point``, by
    prompt index; and the number of generated tokens included. With ``run`` each prompt batch
    is a resume checkpoint: a rerun computes only the batches not saved yet."""
    frame = run_units(
        run,
        prompt_batches(lm, prompts, config.batch_size),
        lambda batch: batch_activations(lm, batch, layer, point, config),
        _batch_key,
        "collecting activations",
        weight=lambda batch: len(batch.prompts),
    )
    found: list[torch.Tensor | None] = [None] * len(prompts)
    for row in frame.itertuples(index=False):
        values = np.array(row.activations, dtype=np.float32).reshape(row.n_rows, row.width)
        found[row.prompt_index] = torch.from_numpy(values)  # (n_i, d)
    return found, int(frame["n_generated"].sum())


def _split_prompts(n: int, share: float, seed: int) -> tuple[list[int], list[int]]:
    """(training, held-out) prompt indices from one seeded permutation."""
    order = np.random.default_rng(seed).permutation(n)
    n_held = max(1, round(share * n)) if share > 0 else 0
    if n - n_held < 1:
        raise PromptError(f"--heldout-prompts {share} leaves no training prompts of {n}")
    return sorted(order[n_held:].tolist()), sorted(order[:n_held].tolist())


def _stack(rows: list[torch.Tensor], index: list[int]) -> torch.Tensor:
    """The rows of the prompts in ``index`` stacked -> (N, d) (N may be 0)."""
    width = rows[0].shape[-1]
    return torch.cat([rows[i] for i in index] + [torch.empty(0, width)])  # (N, d)


def _trainer(x_train: torch.Tensor, config: SAETrainConfig, hook: str, model_name: str):
    return SAETrainer(
        x_train,
        config.d_sae,
        config.architecture,
        k=config.k if config.architecture == "topk" else None,
        l1=config.l1,
        steps=config.steps,
        lr=config.lr,
        batch_size=config.train_batch_size,
        seed=config.seed,
        holdout_fraction=0.0,
        hook_name=hook,
        model_name=model_name,
    )


def _save_training(run: Run, trainer: SAETrainer, losses: list[dict]) -> None:
    """The training state and the loss log so far, as one file replaced atomically."""
    path = run.partial_dir / TRAINING_STATE
    run.partial_dir.mkdir(exist_ok=True)
    state = {"trainer": trainer.state_dict(), "losses": losses}
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    run.update_manifest(heartbeat=now_iso())


def _restored_trainer(
    run: Run | None, build: Callable[[], SAETrainer]
) -> tuple[SAETrainer, list[dict]]:
    """(a trainer from ``build``, its loss log so far), continuing the state an interrupted
    session saved in ``run`` if there is one; a state that cannot be restored is warned
    about and the training starts from step 0."""
    trainer = build()
    path = run.partial_dir / TRAINING_STATE if run is not None else None
    if path is None or not path.exists():
        return trainer, []
    try:
        state = torch.load(path, weights_only=True)
        trainer.load_state_dict(state["trainer"])
        losses = [{"step": int(row["step"]), "loss": float(row["loss"])} for row in state["losses"]]
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, pickle.UnpicklingError) as err:
        warnings.warn(
            f"cannot continue the SAE training from {path} ({err}); training from step 0",
            RuntimeWarning,
            stacklevel=3,
        )
        return build(), []  # a fresh one: the failed restore may have changed some tensors
    return trainer, losses


def fit_sae(
    x_train: torch.Tensor,
    config: SAETrainConfig,
    hook: str,
    model_name: str,
    run: Run | None = None,
):
    """Train the SAE of ``config`` on rows (N, d_in) with a progress bar: (sae, training
    metrics, loss every 50 steps as records). With ``run`` the state is saved every
    :data:`CHECKPOINT_EVERY` steps and after the last, and an interrupted training continues
    from the last save (the bar starts at the steps already done)."""
    trainer, losses = _restored_trainer(run, lambda: _trainer(x_train, config, hook, model_name))
    shown = [trainer.step]
    with progress_bar("training the SAE", total=trainer.n_steps) as advance:
        advance(trainer.step)

        def progress(step: int, n_steps: int, loss: float) -> None:
            advance(step - shown[0])
            shown[0] = step
            losses.append({"step": step, "loss": loss})

        while trainer.step < trainer.n_steps:
            next_save = (trainer.step // CHECKPOINT_EVERY + 1) * CHECKPOINT_EVERY
            trainer.run(next_save, progress, LOG_EVERY)
            if run is not None:  # also after the last step: a crash in the tables keeps it
                _save_training(run, trainer, losses)
    sae, trained = trainer.result()
    return sae, trained, losses


def run_sae_train(config: SAETrainConfig, out=None, force: bool = False, lm=None):
    """``rloop sae train``: returns (run_dir, already_complete, headline)."""
    _check_train(config)
    prompt_set = training_prompts(config)
    lm = load(config, lm)
    _, late, _ = resolve_layers(lm.adapter, None)
    layer = late if config.layer is None else config.layer
    lm.adapter.check_layer(layer)
    lm.adapter.spec(config.point)
    prompts = list(prompt_set)
    train_index, held_index = _split_prompts(len(prompts), config.heldout_prompts, config.seed)

    def body(run) -> dict:
        run.set_model(model_manifest(lm))
        run.set_prompts(prompts_manifest(prompt_set, lm.tokenizer))
        started = time.perf_counter()
        rows, n_generated = collect_activations(lm, prompts, layer, config.point, config, run)
        x_train, x_held = _stack(rows, train_index), _stack(rows, held_index)
        if x_train.shape[0] < 2:
            raise PromptError(f"only {x_train.shape[0]} training tokens: pass more prompts")
        collected = time.perf_counter()
        hook = address(layer, config.point)
        sae, trained, losses = fit_sae(x_train, config, hook, lm.name, run)
        seconds = {"collect_s": collected - started, "train_s": time.perf_counter() - collected}
        sae_dir = save_sae(sae, run.path / SAE_DIRNAME)
        splits = {"train": x_train, "heldout_prompts": x_held, "all": torch.cat([x_train, x_held])}
        metrics = pd.DataFrame(
            [
                {"split": name, "n_rows": int(x.shape[0]), **evaluate_sae(sae, x)}
                for name, x in splits.items()
                if x.shape[0] >= 2
            ]
        )
        with torch.no_grad():
            density = (sae.encode(splits["all"]) > 0).double().mean(dim=0).numpy()  # (d_sae,)
        data = {
            "n_prompts": len(prompts),
            "n_train_prompts": len(train_index),
            "n_heldout_prompts": len(held_index),
            "n_tokens": int(splits["all"].shape[0]),
            "n_generated_tokens": n_generated,
            "skip_first": config.skip_first,
        }
        run.write_table("metrics", metrics)
        run.write_table("training_loss", pd.DataFrame(losses))
        run.write_table(
            "feature_density",
            pd.DataFrame({"feature": np.arange(density.size), "density": density}),
        )
        _train_plots(pd.DataFrame(losses), density, run.plot_path)
        run.update_manifest(
            sae={"dir": str(sae_dir), "hook": address(layer, config.point), **trained},
            data=data,
            timings=seconds,
        )
        run.write_summary(_train_markdown(lm, config, layer, metrics, data, seconds))
        held = metrics.set_index("split").loc[
            "heldout_prompts" if "heldout_prompts" in set(metrics.split) else "train"
        ]
        return {
            "layer": layer,
            "n_tokens": data["n_tokens"],
            "explained_variance": float(held["explained_variance"]),
            "mean_l0": float(held["mean_l0"]),
            "dead_share": float(metrics.set_index("split").loc["all", "dead_share"]),
            "sae_dir": str(sae_dir),
        }

    return execute(TRAIN_EXPERIMENT, config.to_dict(), lm.name, out, body, force=force).as_tuple()


def _train_plots(losses: pd.DataFrame, density: np.ndarray, plot_path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(losses["step"], losses["loss"])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (normalised units)")
    ax.set_yscale("log")
    _save(fig, plot_path("training_loss"))
    fig, ax = plt.subplots(figsize=(6, 4))
    alive = density[density > 0]
    if alive.size:
        ax.hist(np.log10(alive), bins=40)
    ax.set_xlabel("log10 share of tokens where the feature fires")
    ax.set_ylabel("features")
    ax.set_title(f"{int((density == 0).sum())} of {density.size} features never fire")
    _save(fig, plot_path("feature_density"))


def _train_markdown(lm, config, layer, metrics, data, seconds) -> str:
    k = f", k = {config.k}" if config.architecture == "topk" else f", l1 = {config.l1}"
    return (
        "\n".join(
            [
                "# Sparse autoencoder (trained by rloop)",
                "",
                f"- model: {model_line(lm)}; hook point `{address(layer, config.point)}`",
                f"- SAE: {config.architecture}, d_sae = {config.d_sae}{k}; {config.steps} "
                f"Adam steps of {config.train_batch_size} tokens, lr {config.lr}, seed {config.seed}",
                f"- data: {data['n_tokens']} tokens of {data['n_prompts']} prompts "
                f"({data['n_generated_tokens']} of them sampled continuations of "
                f"{config.continuation_tokens} tokens); the first {config.skip_first} token(s) "
                f"of each sequence dropped; {data['n_heldout_prompts']} prompts held out",
                f"- time: {seconds['collect_s']:.0f} s collecting, {seconds['train_s']:.0f} s training",
                f"- saved in the SAELens format: `{SAE_DIRNAME}/` (cfg.json + "
                "sae_weights.safetensors); use it with `rloop sae features --sae <run>/sae`",
                "",
                "## Reconstruction and sparsity",
                "",
                markdown_table(metrics),
                "",
                "**Small-scale tool.** Published SAEs are trained on 10^8 to 10^9 tokens of "
                f"broad text; this one saw {data['n_tokens']} tokens of rloop's prompt banks. "
                "Its features describe this prompt distribution at this hook point and may "
                "split or merge differently from a full-scale SAE's; check a finding against "
                "a published SAE where one exists for the model. The held-out-prompt row is "
                "the honest measure of fit.",
            ]
        )
        + "\n"
    )


# ============================================================================== sae features
@dataclass
class SAEFeaturesConfig(Settings):
    """Settings of ``rloop sae features`` (defaults match the CLI). ``layer`` / ``point``
    None: read from the SAE's hook name (``blocks.L.<point>`` or a TransformerLens name)."""

    sae: str = ""
    layer: int | None = None
    point: str | None = None
    recursive_group: str = "L5"
    baseline_group: str = "factual"
    k: int = 8  # dimensions of the contracted subspace
    top_n: int = 16  # differential features whose decoder directions span
    n_features_shown: int = 10
    n_examples: int = 10
    test: str = "welch"
    n_random_sets: int = 200
    batch_size: int = 16


def hook_of_sae(hook_name: str | None) -> tuple[int, str] | None:
    """(layer, point) of an SAE hook name: rloop's ``blocks.15.resid_post`` or
    TransformerLens's ``blocks.15.hook_resid_post`` / ``blocks.15.attn.hook_z``; else None."""
    match = _ADDRESS.match(hook_name or "")
    if match is None:
        return None
    name = match.group(2)
    point = _HOOK_NAMES.get(name, name)
    return (int(match.group(1)), point) if point in _HOOK_NAMES.values() else None


def _features_hook(config: SAEFeaturesConfig, sae) -> tuple[int, str]:
    parsed = hook_of_sae(sae.hook_name)
    layer = config.layer if config.layer is not None else (parsed[0] if parsed else None)
    point = config.point or (parsed[1] if parsed else None)
    if layer is None or point is None:
        raise ConfigError(
            f"cannot tell the hook point from the SAE's hook name {sae.hook_name!r}: pass "
            "--layer and --point"
        )
    return layer, point


def _check_features(config: SAEFeaturesConfig) -> None:
    if not config.sae:
        raise ConfigError("pass the SAE directory with --sae DIR (cfg.json + sae_weights)")
    for name in ("k", "top_n", "n_features_shown", "n_examples", "n_random_sets"):
        if getattr(config, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    if config.recursive_group == config.baseline_group:
        raise ConfigError("--recursive-group and --baseline-group must differ")
    if config.test not in DIFFERENTIAL_TESTS:
        raise ConfigError(
            f"--test must be one of {', '.join(DIFFERENTIAL_TESTS)}, got {config.test!r}"
        )


def window_tokens(lm, prompts, window: int) -> list[list[str]] | None:
    """The strings of each prompt's last ``window`` tokens (None without a decoding
    tokenizer)."""
    decode = getattr(lm.tokenizer, "decode", None)
    if decode is None:
        return None
    rows = tokenize_rows(lm.tokenizer, [p.text for p in prompts])
    return [[decode([t]) for t in row[-window:]] for row in rows]


def span_table(sae, feature_ids, rec_basis, base_basis, n_sets: int, seed: int) -> pd.DataFrame:
    """Share of the recursive (and baseline) top-k subspace spanned by the decoders of the
    first n differential features, n = 1..len(feature_ids), with a null from ``n_sets``
    random feature sets of the same size (mean and 95th percentile)."""
    rng = np.random.default_rng(seed)
    out = []
    for n in range(1, len(feature_ids) + 1):
        ids = feature_ids[:n]
        null = np.array(
            [
                decoder_span_share(sae, rng.choice(sae.d_sae, n, replace=False), rec_basis)
                for _ in range(n_sets)
            ]
        )
        out.append(
            {
                "n_features": n,
                "share_recursive_subspace": decoder_span_share(sae, ids, rec_basis),
                "share_baseline_subspace": decoder_span_share(sae, ids, base_basis),
                "random_mean": float(np.nanmean(null)),
                "random_q95": float(np.nanquantile(null, 0.95)),
                "p_vs_random": float(
                    (1 + np.sum(null >= decoder_span_share(sae, ids, rec_basis))) / (1 + n_sets)
                ),
                "chance": n / sae.d_in,
            }
        )
    return pd.DataFrame(out)


def _examples(acts, prompts, tokens, diff, config) -> pd.DataFrame:
    """Top-activating (prompt, token) positions of the first differential features."""
    groups = {p.id: p.group for p in prompts}
    ids = [p.id for p in prompts]
    frames = []
    for row in diff.head(config.n_features_shown).itertuples():
        top = top_activating(acts, ids, tokens, int(row.feature), top_n=config.n_examples)
        frames.append(top.assign(feature=int(row.feature), diff=row.diff, p_adj=row.p_adj))
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if not frame.empty:
        frame.insert(1, "group", frame["prompt_id"].map(groups))
    return frame


def run_sae_features(config: SAEFeaturesConfig, out=None, force: bool = False, lm=None):
    """``rloop sae features``: returns (run_dir, already_complete, headline)."""
    _check_features(config)
    sae = load_sae(config.sae)
    layer, point = _features_hook(config, sae)
    prepared = prepare(config, [config.recursive_group, config.baseline_group], lm)
    lm = prepared.lm
    lm.adapter.check_layer(layer)
    lm.adapter.spec(point)
    hook = address(layer, point)
    check_d_in(sae, point_width(lm.adapter, point), hook)
    prompts = list(prepared.prompts)
    rec = [i for i, p in enumerate(prompts) if p.group == config.recursive_group]
    base = [i for i, p in enumerate(prompts) if p.group == config.baseline_group]
    if min(len(rec), len(base)) < 2:
        raise PromptError("each group needs at least 2 prompts for the feature contrast")
    if config.k > min(sae.d_in, config.window * min(len(rec), len(base))):
        raise ConfigError(f"--k {config.k} is larger than the window rows or d_in {sae.d_in}")
    if config.top_n > sae.d_sae:
        raise ConfigError(f"--top-n {config.top_n} exceeds the SAE's {sae.d_sae} features")

    def body(run) -> dict:
        record_inputs(
            run,
            prepared,
            sae={
                "dir": str(config.sae),
                "hook": hook,
                "d_sae": sae.d_sae,
                "sae_hook_name": sae.hook_name,
                "sae_model_name": sae.model_name,
            },
        )
        windows = capture_windows(lm, prompts, [layer], point, config.window, config.batch_size)[
            layer
        ]  # (n, W, d_in) float64
        acts = feature_activations(sae, windows.to(sae.dtype))  # (n, W, d_sae)
        diff = differential_features(
            acts[rec], acts[base], n_boot=config.n_boot, seed=config.seed, test=config.test
        )
        tested = diff[np.isfinite(diff["p"])]
        top_ids = tested["feature"].head(config.top_n).astype(int).tolist()
        tokens = window_tokens(lm, prompts, config.window)
        examples = _examples(acts, prompts, tokens, tested, config)
        rec_basis = top_directions(windows[rec], config.k).directions  # (k, d_in)
        base_basis = top_directions(windows[base], config.k).directions  # (k, d_in)
        span = (
            span_table(sae, top_ids, rec_basis, base_basis, config.n_random_sets, config.seed)
            if top_ids
            else pd.DataFrame()
        )
        run.write_table("differential", diff)
        for name, table in (("top_examples", examples), ("span", span)):
            if not table.empty:
                run.write_table(name, table)
        _features_plots(diff, span, run.plot_path)
        run.write_summary(_features_markdown(prepared, config, hook, sae, diff, examples, span))
        last = span.iloc[-1] if not span.empty else None
        return {
            "hook": hook,
            "n_features": sae.d_sae,
            "n_significant": int((diff["p_adj"] < 0.05).sum()),
            "span_share": float(last["share_recursive_subspace"]) if last is not None else None,
            "span_random_mean": float(last["random_mean"]) if last is not None else None,
        }

    return execute(
        FEATURES_EXPERIMENT, config.to_dict(), lm.name, out, body, force=force
    ).as_tuple()


def _features_plots(diff: pd.DataFrame, span: pd.DataFrame, plot_path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    tested = diff[np.isfinite(diff["p_adj"])]
    ax.scatter(tested["diff"], -np.log10(tested["p_adj"].clip(lower=1e-300)), s=6)
    ax.axhline(-math.log10(0.05), color="grey", ls="--", lw=1)
    ax.set_xlabel("mean activation, recursive - baseline")
    ax.set_ylabel("-log10 BH-adjusted p")
    _save(fig, plot_path("differential"))
    if span.empty:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(span["n_features"], span["share_recursive_subspace"], marker="o", label="recursive")
    ax.plot(span["n_features"], span["share_baseline_subspace"], marker="s", label="baseline")
    ax.plot(span["n_features"], span["random_mean"], ls="--", label="random features (mean)")
    ax.set_xlabel("top-n differential features")
    ax.set_ylabel("share of the top-k subspace spanned")
    ax.legend()
    _save(fig, plot_path("span"))


def _features_markdown(prepared, config, hook, sae, diff, examples, span) -> str:
    columns = [
        "feature",
        "mean_rec",
        "mean_base",
        "diff",
        "diff_ci_low",
        "diff_ci_high",
        "hedges_g",
        "p",
        "p_adj",
    ]
    lines = [
        "# SAE features: recursive vs baseline",
        "",
        f"- model: {model_line(prepared.lm)}; hook point `{hook}`; window {config.window}",
        f"- SAE: `{config.sae}` ({sae.architecture}, d_in {sae.d_in}, d_sae {sae.d_sae}; "
        f"trained on {sae.model_name or 'an unnamed model'} at {sae.hook_name or 'an unnamed hook'})",
        f"- contrast: {config.recursive_group} vs {config.baseline_group}; per-prompt mean "
        f"activation over the window; {config.test} test, Benjamini-Hochberg over "
        f"{int(np.isfinite(diff['p']).sum())} features with a test",
        f"- {int((diff['p_adj'] < 0.05).sum())} features differ at BH-adjusted p < 0.05",
    ]
    if sae.model_name and sae.model_name != prepared.lm.name:
        lines.append(f"- note: the SAE names model {sae.model_name!r}, not {prepared.lm.name!r}")
    if sae.metadata.get("trained_with") == "rloop.sae.train_sae":
        lines.append("- note: a small SAE trained by `rloop sae train`: a small-scale tool")
    lines += ["", "## Top differential features", "", markdown_table(diff[columns].head(20)), ""]
    if not span.empty:
        lines += [
            f"## Share of the contracted subspace (top-{config.k} of the recursive windows) "
            "spanned by the top-n features' decoder directions",
            "",
            markdown_table(span),
            "",
        ]
    if not examples.empty:
        shown = [
            c for c in ("feature", "prompt_id", "group", "activation", "context") if c in examples
        ]
        shown_examples = examples.groupby("feature").head(3)[shown]
        if "context" in shown_examples:  # one table row per example: escape | and newlines
            shown_examples = shown_examples.assign(
                context=shown_examples["context"].map(
                    lambda t: repr(str(t))[1:-1].replace("|", "\\|")
                )
            )
        lines += [
            "## Where the top features fire (first 3 each)",
            "",
            markdown_table(shown_examples),
            "",
        ]
    return "\n".join(lines) + "\n"
