"""Train a small sparse autoencoder on captured activations, on CPU.

Recipe (TopK after Gao et al. 2024; ReLU + L1 after Bricken et al. 2023 / Conerly et al. 2024):

- The activations are split once into a training part and a held-out slice (seeded).
- b_dec starts at the geometric median of the training rows (Weiszfeld iterations; the mean
  with ``b_dec_init="mean"``), so that features code deviations from a typical row.
- With ``normalize`` the rows are multiplied by one scalar s that gives the centred rows unit
  mean square per dimension, so the default learning rate and L1 coefficient fit any hook
  point. The scale is folded back at the end (b_enc and b_dec divided by s, which ReLU and TopK
  commute with), so the returned SAE takes raw activations and its decoder rows stay unit norm.
- Decoder rows start as random unit vectors, the encoder as their transpose. After every Adam
  step the rows are renormalised to unit norm, and before it the gradient component along each
  row is removed (it would only change the norm).
- Loss: squared reconstruction error summed over d_in, averaged over the batch; the ReLU SAE
  adds ``l1`` times the sum of feature activations (decoder rows have unit norm, so this is the
  usual norm-weighted L1).

Everything is seeded with one ``torch.Generator``: the same activations, settings and seed give
the same SAE (on the same machine and thread count). :class:`SAETrainer` runs the steps in
pieces: its ``state_dict`` (parameters, Adam moments, step, the batch order's generator state
and position in the epoch, the last losses) restored into a freshly built trainer continues the
run so that the final SAE is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import numpy as np
import torch

from rloop.errors import ConfigError
from rloop.metrics.stats import check_choice
from rloop.sae.format import (
    ARCHITECTURE_STANDARD,
    ARCHITECTURE_TOPK,
    SparseAutoencoder,
)

TRAIN_ARCHITECTURES = ("topk", "relu")
B_DEC_INITS = ("geometric_median", "mean", "zeros")
DEFAULT_STEPS = 2000
_FINAL_LOSS_STEPS = 50  # final_loss is the mean training loss over this many last steps
_MEDIAN_ROWS = 16_384  # rows used for the geometric median

ProgressCallback = Callable[[int, int, float], None]


def geometric_median(rows: torch.Tensor, max_iter: int = 200, tol: float = 1e-7) -> torch.Tensor:
    """Geometric median of rows (n, d) -> (d,) float64: the point minimising the sum of
    Euclidean distances, by Weiszfeld iterations started at the mean. Stops when a step moves
    less than ``tol`` times the rows' RMS distance to the mean."""
    x = rows.to(torch.float64)  # (n, d)
    median = x.mean(dim=0)  # (d,)
    spread = (x - median).norm(dim=1).square().mean().sqrt()
    if spread == 0:
        return median
    floor = 1e-12 * spread
    for _ in range(max_iter):
        distances = (x - median).norm(dim=1).clamp(min=floor)  # (n,)
        weights = 1.0 / distances  # (n,)
        updated = (weights[:, None] * x).sum(dim=0) / weights.sum()  # (d,)
        moved = (updated - median).norm()
        median = updated
        if moved < tol * spread:
            break
    return median


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_activations(activations) -> torch.Tensor:
    x = activations if isinstance(activations, torch.Tensor) else torch.as_tensor(activations)
    if x.dim() != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise ConfigError(
            f"activations must be (n, d_in) with n >= 2, got {tuple(x.shape)}: flatten the "
            "prompt and token dimensions first"
        )
    if not x.is_floating_point():
        raise ConfigError(f"activations must be floating point, got {x.dtype}")
    x = x.detach().to(device="cpu", dtype=torch.float32)  # (n, d_in)
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        raise ConfigError(f"activations hold NaN or infinite values in {bad} rows: drop them")
    return x


def _n_steps(steps: int | None, epochs: int | None, n_train: int, batch_size: int) -> int:
    if steps is not None and epochs is not None:
        raise ConfigError("pass steps or epochs, not both")
    if epochs is not None:
        return _check_positive_int(epochs, "epochs") * math.ceil(n_train / batch_size)
    return _check_positive_int(steps if steps is not None else DEFAULT_STEPS, "steps")


class _BatchOrder:
    """Minibatch indices (batch_size,): a fresh permutation of range(n) per epoch, cut into
    whole batches (the rest of an epoch is dropped); its state can be saved and restored."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator) -> None:
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.order: torch.Tensor | None = None  # (n,) this epoch's permutation
        self.position = 0  # rows of ``order`` already used

    def next(self) -> torch.Tensor:
        if self.order is None or self.position + self.batch_size > self.n:
            self.order = torch.randperm(self.n, generator=self.generator)  # (n,)
            self.position = 0
        batch = self.order[self.position : self.position + self.batch_size]  # (batch_size,)
        self.position += self.batch_size
        return batch

    def state_dict(self) -> dict:
        order = self.order if self.order is not None else torch.empty(0, dtype=torch.int64)
        return {
            "generator": self.generator.get_state(),
            "order": order.clone(),
            "position": self.position,
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order = state["order"].clone() if state["order"].numel() else None
        self.position = int(state["position"])


@torch.no_grad()
def evaluate_sae(sae: SparseAutoencoder, activations) -> dict[str, float]:
    """Reconstruction and sparsity of ``sae`` on rows (n, d_in), accumulated in float64.

    explained_variance = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2; mse = mean over rows
    of ||x - x_hat||^2; mean_l0 = mean number of active (> 0) features per row; dead_share =
    share of features active on no row; dead_features = their count.
    """
    x = _check_activations(activations).to(sae.dtype)  # (n, d_in)
    features = sae.encode(x)  # (n, d_sae)
    reconstruction = sae.decode(features).to(torch.float64)  # (n, d_in)
    x64 = x.to(torch.float64)  # (n, d_in)
    error = (x64 - reconstruction).square().sum()
    total = (x64 - x64.mean(dim=0)).square().sum()
    active = features > 0  # (n, d_sae)
    dead = int((~active.any(dim=0)).sum())
    return {
        "explained_variance": float(1.0 - error / total) if total > 0 else math.nan,
        "mse": float(error / x.shape[0]),
        "mean_l0": float(active.sum(dim=1).to(torch.float64).mean()),
        "dead_features": dead,
        "dead_share": dead / sae.d_sae,
    }


def train_sae(
    activations,
    d_sae: int,
    architecture: str = "topk",
    k: int | None = None,
    l1: float = 1.0,
    steps: int | None = None,
    epochs: int | None = None,
    lr: float = 1e-3,
    batch_size: int = 256,
    seed: int = 0,
    holdout_fraction: float = 0.1,
    b_dec_init: str = "geometric_median",
    normalize: bool = True,
    progress: ProgressCallback | None = None,
    log_every: int = 100,
    hook_name: str | None = None,
    model_name: str | None = None,
) -> tuple[SparseAutoencoder, dict]:
    """Train an SAE with ``d_sae`` features on activations (n, d_in); returns (sae, metrics).

    architecture: "topk" (keep the k largest pre-activations; ``k`` required) or "relu" (ReLU
    with an L1 penalty of weight ``l1``, in units of the normalised activations). Training runs
    ``steps`` Adam steps of ``batch_size`` rows (default 2000), or ``epochs`` passes over the
    training rows. ``progress(step, n_steps, loss)`` is called every ``log_every`` steps and at
    the end.

    metrics: :func:`evaluate_sae` on the held-out slice (``holdout_fraction`` of the rows, at
    least one; on the training rows if it is 0, and ``evaluated_on`` says which), plus
    final_loss (mean training loss over the last 50 steps, normalised units), the input scale
    s, n_train, n_holdout, n_steps and the settings. :class:`SAETrainer` does the same in
    resumable pieces.
    """
    _check_positive_int(log_every, "log_every")
    trainer = SAETrainer(
        activations,
        d_sae,
        architecture,
        k=k,
        l1=l1,
        steps=steps,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        holdout_fraction=holdout_fraction,
        b_dec_init=b_dec_init,
        normalize=normalize,
        hook_name=hook_name,
        model_name=model_name,
    )
    trainer.run(progress=progress, log_every=log_every)
    return trainer.result()


class SAETrainer:
    """The training of :func:`train_sae` (same arguments, same result), run in pieces.

    Building it checks the settings, splits the rows, computes the input scale and b_dec and
    initialises the SAE and Adam (all seeded). :meth:`run` takes the steps up to a given one;
    :meth:`state_dict` / :meth:`load_state_dict` save and restore everything the remaining
    steps depend on; :meth:`result` folds the scale back and evaluates the finished SAE.
    """

    def __init__(
        self,
        activations,
        d_sae: int,
        architecture: str = "topk",
        k: int | None = None,
        l1: float = 1.0,
        steps: int | None = None,
        epochs: int | None = None,
        lr: float = 1e-3,
        batch_size: int = 256,
        seed: int = 0,
        holdout_fraction: float = 0.1,
        b_dec_init: str = "geometric_median",
        normalize: bool = True,
        hook_name: str | None = None,
        model_name: str | None = None,
    ) -> None:
        _check_train_settings(architecture, k, l1, lr, b_dec_init, holdout_fraction)
        _check_positive_int(d_sae, "d_sae")
        _check_positive_int(batch_size, "batch_size")
        x_all = _check_activations(activations)  # (n, d_in)
        if architecture == "topk" and k is None:
            raise ConfigError("a topk SAE needs k (the number of active features per row)")
        generator = torch.Generator().manual_seed(seed)
        self.holdout, x_train = _split_holdout(x_all, holdout_fraction, generator)
        n_train = x_train.shape[0]
        batch_size = min(batch_size, n_train)
        self.n_steps = _n_steps(steps, epochs, n_train, batch_size)
        self.sae = SparseAutoencoder(
            d_in=x_all.shape[1],
            d_sae=d_sae,
            architecture=ARCHITECTURE_TOPK if architecture == "topk" else ARCHITECTURE_STANDARD,
            k=k if architecture == "topk" else None,
            hook_name=hook_name,
            model_name=model_name,
            metadata={"trained_with": "rloop.sae.train_sae", "seed": seed},
        )
        self.scale, centre = _input_scale_and_centre(x_train, normalize, b_dec_init, generator)
        _initialise(self.sae, centre, self.scale, generator)
        self.x_train = x_train  # (n_train, d_in) raw units
        self.z_train = x_train * self.scale  # (n_train, d_in) normalised units
        self.sae.requires_grad_(True)
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=lr)
        self.batches = _BatchOrder(n_train, batch_size, generator)
        self.l1 = l1 if architecture == "relu" else None
        self.step = 0  # steps taken
        self.recent_losses: list[float] = []  # the last _FINAL_LOSS_STEPS training losses
        self.settings = {
            "architecture": architecture,
            "d_in": x_all.shape[1],
            "d_sae": d_sae,
            "k": k if architecture == "topk" else None,
            "l1": self.l1,
            "lr": lr,
            "batch_size": batch_size,
            "b_dec_init": b_dec_init,
            "seed": seed,
        }

    def run(
        self,
        until: int | None = None,
        progress: ProgressCallback | None = None,
        log_every: int = 100,
    ) -> None:
        """Take the steps after :attr:`step` up to ``until`` (default: all ``n_steps``);
        ``progress(step, n_steps, loss)`` every ``log_every`` steps and at the last step."""
        until = self.n_steps if until is None else min(until, self.n_steps)
        for step in range(self.step + 1, until + 1):
            batch = self.z_train[self.batches.next()]  # (B, d_in)
            loss_value = _adam_step(self.sae, self.optimizer, batch, self.l1)
            if not math.isfinite(loss_value):
                raise ConfigError(
                    f"SAE training diverged at step {step} (loss {loss_value}): lower lr "
                    f"(now {self.settings['lr']})"
                )
            self.recent_losses = [*self.recent_losses, loss_value][-_FINAL_LOSS_STEPS:]
            self.step = step
            if progress is not None and (step % log_every == 0 or step == self.n_steps):
                progress(step, self.n_steps, loss_value)

    def _shape(self) -> dict:
        """What a saved state must agree on to be restored into this trainer."""
        return {
            "n_train": self.x_train.shape[0],
            "n_steps": self.n_steps,
            "input_scale": self.scale,
            **self.settings,
        }

    def state_dict(self) -> dict:
        """A copy of everything the remaining steps depend on (tensors and plain values, so
        ``torch.load(..., weights_only=True)`` reads it back)."""
        return {
            "step": self.step,
            "shape": self._shape(),
            "sae": {name: t.detach().clone() for name, t in self.sae.state_dict().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "batches": self.batches.state_dict(),
            "recent_losses": list(self.recent_losses),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (from :meth:`state_dict` of a trainer built with the same
        activations and settings); ValueError if it belongs to another training."""
        if state.get("shape") != self._shape():
            raise ValueError(
                f"the saved SAE training state ({state.get('shape')}) does not belong to this "
                f"training ({self._shape()})"
            )
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.batches.load_state_dict(state["batches"])
        self.recent_losses = [float(v) for v in state["recent_losses"]]
        self.step = int(state["step"])

    def result(self) -> tuple[SparseAutoencoder, dict]:
        """(the SAE taking raw activations, metrics as :func:`train_sae` reports them), once
        every step is taken."""
        if self.step != self.n_steps:
            raise RuntimeError(f"the SAE has taken {self.step} of its {self.n_steps} steps")
        _fold_scale(self.sae, self.scale)
        n_holdout = self.holdout.shape[0]
        metrics = evaluate_sae(self.sae, self.holdout if n_holdout else self.x_train)
        metrics.update(
            {
                "evaluated_on": "holdout" if n_holdout else "train",
                "final_loss": float(np.mean(self.recent_losses)),
                "input_scale": self.scale,
                "n_train": self.x_train.shape[0],
                "n_holdout": n_holdout,
                "n_steps": self.n_steps,
                **self.settings,
            }
        )
        return self.sae, metrics


def _check_train_settings(
    architecture: str,
    k: int | None,
    l1: float,
    lr: float,
    b_dec_init: str,
    holdout_fraction: float,
) -> None:
    """ConfigError for an unknown architecture or b_dec_init, or an out-of-range setting."""
    check_choice(architecture, TRAIN_ARCHITECTURES, "SAE architecture")
    check_choice(b_dec_init, B_DEC_INITS, "b_dec_init")
    if not 0.0 <= holdout_fraction < 1.0:
        raise ConfigError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"lr must be a positive number, got {lr}")
    if architecture == "relu" and not (l1 >= 0 and math.isfinite(l1)):
        raise ConfigError(f"l1 must be a non-negative number, got {l1}")


def _split_holdout(
    x_all: torch.Tensor, holdout_fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(held-out rows (n_holdout, d_in), training rows (n_train, d_in)) from one seeded
    shuffle; at least one held-out row unless ``holdout_fraction`` is 0."""
    n = x_all.shape[0]
    order = torch.randperm(n, generator=generator)  # (n,)
    n_holdout = max(1, round(holdout_fraction * n)) if holdout_fraction > 0 else 0
    if n - n_holdout < 1:
        raise ConfigError(f"holdout_fraction {holdout_fraction} leaves no training rows of {n}")
    return x_all[order[:n_holdout]], x_all[order[n_holdout:]]


def _input_scale_and_centre(
    x_train: torch.Tensor, normalize: bool, b_dec_init: str, generator: torch.Generator
) -> tuple[float, torch.Tensor]:
    """(input scale s, initial b_dec (d_in,) float64 in raw units) of the training rows."""
    d_in = x_train.shape[1]
    mean = x_train.to(torch.float64).mean(dim=0)  # (d_in,)
    mean_square = (x_train.to(torch.float64) - mean).square().sum(dim=1).mean()
    scale = float(math.sqrt(d_in / mean_square)) if normalize and mean_square > 0 else 1.0
    if b_dec_init == "geometric_median":
        pick = torch.randperm(x_train.shape[0], generator=generator)[:_MEDIAN_ROWS]
        return scale, geometric_median(x_train[pick])  # (d_in,)
    if b_dec_init == "mean":
        return scale, mean
    return scale, torch.zeros(d_in, dtype=torch.float64)


@torch.no_grad()
def _initialise(
    sae: SparseAutoencoder, centre: torch.Tensor, scale: float, generator: torch.Generator
) -> None:
    """Random unit decoder rows, the encoder as their transpose, b_dec = centre (normalised)."""
    directions = torch.randn(sae.d_sae, sae.d_in, generator=generator)  # (d_sae, d_in)
    directions /= directions.norm(dim=1, keepdim=True)
    sae.W_dec.copy_(directions)
    sae.W_enc.copy_(directions.T)
    sae.b_dec.copy_((centre * scale).to(torch.float32))


def _adam_step(
    sae: SparseAutoencoder,
    optimizer: torch.optim.Optimizer,
    batch: torch.Tensor,
    l1: float | None,
) -> float:
    """One Adam step on rows ``batch`` (B, d_in) keeping the decoder rows at unit norm; ``l1``
    weights the ReLU SAE's sparsity penalty (None: no penalty). Returns the step's loss."""
    features = sae.encode(batch)  # (B, d_sae)
    reconstruction = sae.decode(features)  # (B, d_in)
    loss = (reconstruction - batch).square().sum(dim=1).mean()
    if l1 is not None:
        loss = loss + l1 * features.sum(dim=1).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    with torch.no_grad():
        rows, grad = sae.W_dec, sae.W_dec.grad  # (d_sae, d_in), (d_sae, d_in)
        grad -= (grad * rows).sum(dim=1, keepdim=True) * rows  # keep only norm-free changes
    optimizer.step()
    with torch.no_grad():
        sae.W_dec /= sae.W_dec.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return float(loss.detach())


@torch.no_grad()
def _fold_scale(sae: SparseAutoencoder, scale: float) -> None:
    """Fold the input scale back so the SAE takes raw activations; freeze it."""
    sae.b_enc /= scale
    sae.b_dec /= scale
    sae.requires_grad_(False)
    sae.zero_grad(set_to_none=True)
