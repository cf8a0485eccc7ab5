"""The sparse autoencoder (SAE) model and its on-disk format (the SAELens layout).

An SAE directory holds two files:

- ``sae_weights.safetensors`` with tensors ``W_enc`` (d_in, d_sae), ``b_enc`` (d_sae,),
  ``W_dec`` (d_sae, d_in), ``b_dec`` (d_in,), and ``threshold`` (d_sae,) for JumpReLU SAEs
  (older files store ``log_threshold``; it is read as exp(log_threshold)).
- ``cfg.json`` with at least ``d_in``, ``d_sae``, ``architecture`` ("standard", "topk",
  "jumprelu"), ``k`` for TopK, ``dtype``, ``apply_b_dec_to_input``, ``normalize_activations``,
  and the hook point and model in ``metadata.hook_name`` / ``metadata.model_name``.

Files written by SAELens before 6.0 put ``hook_name`` (or ``hook_point``) and ``model_name``
at the top level, name the activation ``activation_fn_str`` / ``activation_fn`` with
``activation_fn_kwargs.k`` for TopK, and may store ``normalize_activations`` as a bool; those
are read too. :func:`save_sae` writes the 6.x layout and repeats ``hook_name``,
``model_name`` and ``activation_fn`` at the top level so that older readers find them.

Only SAEs that take raw activations (``normalize_activations`` "none") are supported: the
other modes need statistics that are not in the files or change the decoder's output scale,
and using such an SAE without them would give plausible but wrong features.

Why not the ``sae-lens`` package itself: it installs beside torch 2.13 without replacing it,
but pulls in about 45 other packages (transformer-lens, datasets, wandb, plotly, nltk, ...)
for what is, at inference, four tensors and three activation functions. rloop reads and
writes the same files itself; the format facts come from the sae-lens 6.54 source. The
optional extra ``rloop[sae]`` installs sae-lens; nothing here imports it, and with it
installed the test suite checks that sae-lens loads what :func:`save_sae` writes and encodes
and decodes it as :class:`SparseAutoencoder` does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from rloop.errors import ConfigError

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"

ARCHITECTURE_STANDARD = "standard"
ARCHITECTURE_TOPK = "topk"
ARCHITECTURE_JUMPRELU = "jumprelu"
ARCHITECTURES: tuple[str, ...] = (ARCHITECTURE_STANDARD, ARCHITECTURE_TOPK, ARCHITECTURE_JUMPRELU)

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_TOP_LEVEL_METADATA = ("model_name", "hook_name")
# "hook_z": trained on per-head attention outputs flattened to n_heads * d_head; encode takes
# the flattened (..., d_in) activations either way.
RESHAPE_MODES = ("none", "hook_z")


def _dtype_from_name(name: Any) -> torch.dtype:
    text = str(name).removeprefix("torch.")
    if text not in _DTYPES:
        raise ConfigError(f"SAE dtype {name!r} is not supported: use one of {', '.join(_DTYPES)}")
    return _DTYPES[text]


class SparseAutoencoder(nn.Module):
    """A sparse autoencoder on d_in-dimensional activations with d_sae features.

    encode(x) = act(pre), pre = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc, with act:

    - "standard": ReLU(pre);
    - "topk": ReLU of the k largest entries of pre, all others 0 (with
      ``rescale_acts_by_decoder_norm``, pre is first multiplied by each decoder row's norm and
      decode divides by it again);
    - "jumprelu": ReLU(pre) where pre > threshold (per feature), else 0.

    decode(f) = f @ W_dec + b_dec. Rows of W_dec are the features' decoder directions.
    ``hook_name`` and ``model_name`` say where the SAE was trained (informational; use
    :func:`check_d_in` before applying it); ``metadata`` keeps the other cfg metadata so a
    loaded SAE saves back with it. Parameters are created frozen (requires_grad False) so
    that encode/decode return plain tensors; call ``requires_grad_(True)`` to train.
    """

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        architecture: str = ARCHITECTURE_STANDARD,
        k: int | None = None,
        apply_b_dec_to_input: bool = True,
        rescale_acts_by_decoder_norm: bool = False,
        reshape_activations: str = "none",
        hook_name: str | None = None,
        model_name: str | None = None,
        dtype: torch.dtype = torch.float32,
        metadata: dict[str, Any] | None = None,
    ):
        super().__init__()
        for name, value in (("d_in", d_in), ("d_sae", d_sae)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"SAE {name} must be a positive integer, got {value!r}")
        if architecture not in ARCHITECTURES:
            raise ConfigError(
                f"SAE architecture {architecture!r} is not supported: use one of "
                f"{', '.join(ARCHITECTURES)}"
            )
        if architecture == ARCHITECTURE_TOPK:
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d_sae:
                raise ConfigError(f"a topk SAE needs an integer k in [1, d_sae={d_sae}], got {k!r}")
        elif k is not None:
            raise ConfigError(f"k is only used by topk SAEs, not {architecture!r}: drop k")
        if rescale_acts_by_decoder_norm and architecture != ARCHITECTURE_TOPK:
            raise ConfigError("rescale_acts_by_decoder_norm is only defined for topk SAEs")
        if reshape_activations not in RESHAPE_MODES:
            raise ConfigError(
                f"SAE reshape_activations {reshape_activations!r} is not supported: use one of "
                f"{', '.join(RESHAPE_MODES)}"
            )
        self.d_in = d_in
        self.d_sae = d_sae
        self.architecture = architecture
        self.k = k
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.rescale_acts_by_decoder_norm = bool(rescale_acts_by_decoder_norm)
        self.reshape_activations = reshape_activations
        self.hook_name = hook_name
        self.model_name = model_name
        self.metadata = dict(metadata or {})
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_in, dtype=dtype))
        threshold = (
            torch.zeros(d_sae, dtype=dtype) if architecture == ARCHITECTURE_JUMPRELU else None
        )
        self.register_parameter("threshold", None if threshold is None else nn.Parameter(threshold))
        self.requires_grad_(False)  # an inference model by default; train_sae unfreezes it

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_in:
            raise ConfigError(
                f"SAE input has last dimension {x.shape[-1]} but the SAE has d_in {self.d_in}"
                " (flatten heads into one dimension for a per-head hook point)"
            )
        return x.to(device=self.W_enc.device, dtype=self.dtype)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations: x (..., d_in) -> (..., d_sae), in the SAE's dtype."""
        x = self._check_input(x)  # (..., d_in)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec  # (..., d_in)
        pre = x @ self.W_enc + self.b_enc  # (..., d_sae)
        if self.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)  # (..., d_sae)
        return pre

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """The architecture's activation on pre-activations (..., d_sae) -> (..., d_sae)."""
        if self.architecture == ARCHITECTURE_STANDARD:
            return torch.relu(pre)
        if self.architecture == ARCHITECTURE_TOPK:
            values, indices = pre.topk(self.k, dim=-1, sorted=False)  # (..., k)
            return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))  # (..., d_sae)
        keep = pre > self.threshold  # (..., d_sae)
        return torch.where(keep, torch.relu(pre), torch.zeros_like(pre))  # (..., d_sae)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations of x (..., d_in) -> (..., d_sae), non-negative."""
        return self.activate(self.pre_activations(x))

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        """Reconstruction from feature activations (..., d_sae) -> (..., d_in)."""
        if self.rescale_acts_by_decoder_norm:
            features = features / self.W_dec.norm(dim=-1)  # (..., d_sae)
        return features @ self.W_dec + self.b_dec  # (..., d_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of x (..., d_in) -> (..., d_in)."""
        return self.decode(self.encode(x))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The weights under their file names (W_enc, b_enc, W_dec, b_dec[, threshold])."""
        named = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.threshold is not None:
            named["threshold"] = self.threshold
        return {name: tensor.detach() for name, tensor in named.items()}

    def cfg_dict(self) -> dict[str, Any]:
        """The cfg.json content for this SAE (6.x layout plus top-level copies for older
        readers)."""
        metadata = dict(self.metadata)
        metadata["model_name"] = self.model_name
        metadata["hook_name"] = self.hook_name
        cfg: dict[str, Any] = {
            "architecture": self.architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": _DTYPE_NAMES[self.dtype],
            "device": "cpu",
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": "none",
            "reshape_activations": self.reshape_activations,
            "metadata": metadata,
            "model_name": self.model_name,
            "hook_name": self.hook_name,
        }
        if self.architecture != ARCHITECTURE_JUMPRELU:  # pre-6.0 readers' activation name
            cfg["activation_fn"] = "topk" if self.architecture == ARCHITECTURE_TOPK else "relu"
        if self.architecture == ARCHITECTURE_TOPK:
            cfg["k"] = self.k
            cfg["activation_fn_kwargs"] = {"k": self.k}
            cfg["rescale_acts_by_decoder_norm"] = self.rescale_acts_by_decoder_norm
        return cfg

    def extra_repr(self) -> str:
        k = f", k={self.k}" if self.k is not None else ""
        return (
            f"{self.architecture}, d_in={self.d_in}, d_sae={self.d_sae}{k}, hook={self.hook_name}"
        )


def check_d_in(sae: SparseAutoencoder, d_in: int, hook_name: str) -> None:
    """Raise ConfigError unless the SAE's d_in equals the width of the hook point's
    activations."""
    if sae.d_in != d_in:
        raise ConfigError(
            f"SAE d_in {sae.d_in} does not match hook point {hook_name} ({d_in}): use an SAE "
            "trained on this hook point"
        )


# ----------------------------------------------------------------------------------------------
# Reading


def _read_cfg(path: Path) -> dict[str, Any]:
    cfg_path = path / CFG_FILENAME
    if not cfg_path.is_file():
        raise ConfigError(
            f"no {CFG_FILENAME} in SAE directory {path}: pass a directory with "
            f"{CFG_FILENAME} and {WEIGHTS_FILENAME}"
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{cfg_path} is not valid JSON: {error}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{cfg_path} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    weights_path = path / WEIGHTS_FILENAME
    if not weights_path.is_file():
        raise ConfigError(
            f"no {WEIGHTS_FILENAME} in SAE directory {path}: pass a directory with "
            f"{CFG_FILENAME} and {WEIGHTS_FILENAME}"
        )
    try:
        return load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"cannot read {weights_path}: {first_line}") from None


def _architecture(cfg: dict[str, Any]) -> str:
    activation = cfg.get("activation_fn", cfg.get("activation_fn_str"))
    architecture = cfg.get("architecture")
    if architecture is None:
        architecture = ARCHITECTURE_TOPK if activation == "topk" else ARCHITECTURE_STANDARD
    if architecture == ARCHITECTURE_STANDARD and activation == "topk":
        architecture = ARCHITECTURE_TOPK  # pre-6.0 TopK files say standard + topk activation
    if architecture not in ARCHITECTURES:
        raise ConfigError(
            f"SAE architecture {architecture!r} is not supported: rloop reads "
            f"{', '.join(ARCHITECTURES)}"
        )
    if architecture == ARCHITECTURE_STANDARD and activation not in (None, "relu"):
        raise ConfigError(
            f"SAE activation {activation!r} is not supported for a standard SAE: rloop reads relu"
        )
    return architecture


def _normalization(cfg: dict[str, Any]) -> None:
    mode = cfg.get("normalize_activations", "none")
    if mode is None or mode is False or mode == "none":
        return
    if mode is True or mode == "expected_average_only_in":
        hint = "fold its norm scaling factor into the weights and set it to 'none'"
    else:
        hint = "rloop supports only SAEs on raw activations ('none')"
    raise ConfigError(f"SAE normalize_activations {mode!r} is not supported: {hint}")


def _positive_int(cfg: dict[str, Any], key: str) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"SAE {CFG_FILENAME} needs a positive integer {key}, got {value!r}")
    return value


def _topk_k(cfg: dict[str, Any]) -> int:
    k = cfg.get("k")
    if k is None:
        k = (cfg.get("activation_fn_kwargs") or {}).get("k")
    if isinstance(k, bool) or not isinstance(k, int):
        raise ConfigError(f"a topk SAE needs an integer k in {CFG_FILENAME}, got {k!r}")
    return k


def _expected_shapes(architecture: str, d_in: int, d_sae: int) -> dict[str, tuple[int, ...]]:
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if architecture == ARCHITECTURE_JUMPRELU:
        shapes["threshold"] = (d_sae,)
    return shapes


def load_sae(path: str | Path, dtype: torch.dtype | None = None) -> SparseAutoencoder:
    """Read an SAE directory (cfg.json + sae_weights.safetensors) -> SparseAutoencoder on CPU,
    in the cfg's dtype (or ``dtype``). Raises ConfigError for missing files, an unsupported
    architecture or normalisation, missing or extra tensors, shapes that disagree with
    d_in / d_sae, or non-finite weights."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(
            f"SAE directory {path} does not exist: pass the folder with {CFG_FILENAME}"
        )
    cfg = _read_cfg(path)
    tensors = _read_tensors(path)
    architecture = _architecture(cfg)
    _normalization(cfg)
    d_in, d_sae = _positive_int(cfg, "d_in"), _positive_int(cfg, "d_sae")
    if "log_threshold" in tensors and "threshold" not in tensors:
        tensors["threshold"] = torch.exp(tensors.pop("log_threshold"))
    scaling = tensors.pop("scaling_factor", None)
    if scaling is not None and not torch.all(scaling == 1):
        raise ConfigError(
            "SAE has a fine-tuning scaling_factor that is not all ones: fold it into W_dec first"
        )
    expected = _expected_shapes(architecture, d_in, d_sae)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unexpected {', '.join(extra)}"] if extra else []
        )
        raise ConfigError(
            f"{WEIGHTS_FILENAME} does not fit a {architecture} SAE ({'; '.join(parts)}): check "
            f"that the architecture in {CFG_FILENAME} is right"
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ConfigError(
                f"SAE tensor {name} has shape {tuple(tensors[name].shape)} but {CFG_FILENAME} "
                f"(d_in={d_in}, d_sae={d_sae}) needs {shape}: the files do not belong together"
            )
        if not torch.isfinite(tensors[name]).all():
            raise ConfigError(f"SAE tensor {name} holds NaN or infinite values")
    metadata = dict(cfg.get("metadata") or {})
    names = {}
    for key in _TOP_LEVEL_METADATA:
        names[key] = metadata.pop(key, None) or cfg.get(key)
    if names["hook_name"] is None:
        names["hook_name"] = cfg.get("hook_point")  # pre-6.0 name
    target_dtype = dtype or _dtype_from_name(cfg.get("dtype", "float32"))
    sae = SparseAutoencoder(
        d_in=d_in,
        d_sae=d_sae,
        architecture=architecture,
        k=_topk_k(cfg) if architecture == ARCHITECTURE_TOPK else None,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        rescale_acts_by_decoder_norm=bool(cfg.get("rescale_acts_by_decoder_norm", False)),
        reshape_activations=cfg.get("reshape_activations") or "none",
        hook_name=names["hook_name"],
        model_name=names["model_name"],
        dtype=target_dtype,
        metadata=metadata,
    )
    with torch.no_grad():
        for name, parameter in sae.tensors().items():
            parameter.copy_(tensors[name].to(target_dtype))
    return sae


def save_sae(sae: SparseAutoencoder, path: str | Path) -> Path:
    """Write ``sae`` to directory ``path`` (created if needed) as cfg.json +
    sae_weights.safetensors, in the SAE's dtype. Returns the directory."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} exists and is not a directory: choose a directory for the SAE")
    try:
        text = json.dumps(sae.cfg_dict(), indent=2, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"SAE metadata cannot be written to {CFG_FILENAME}: {error}") from None
    path.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.contiguous().cpu() for name, tensor in sae.tensors().items()}
    save_file(tensors, str(path / WEIGHTS_FILENAME))
    (path / CFG_FILENAME).write_text(text + "\n")
    return path
