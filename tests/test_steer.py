"""rloop steer on a tiny model: the hook adds exactly alpha * norm_ref * u at every prompt
position and every generated token; unsteered rows equal plain greedy generation; R_V and the
direction equal independent re-computations (raw PyTorch hooks, numpy); bad input is refused
before a run directory exists."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from rloop.capture import Trace, address
from rloop.capture.batching import encode, gather_windows
from rloop.capture.generation import SamplingConfig
from rloop.errors import ConfigError
from rloop.experiments.steer import SteerConfig, run_steer, steered_generate, steering_direction
from tests.test_contraction import prompt_set
from tests.tiny_models import tiny_lm

WINDOW = 4


def _file(tmp_path, n=4):
    path = tmp_path / "prompts.jsonl"
    with path.open("w") as f:
        for p in prompt_set(n):
            f.write(json.dumps({"id": p.id, "group": p.group, "text": p.text}) + "\n")
    return path


def _ids(text: str) -> list[int]:
    return [int(w) % 97 for w in text.split()]


class _RawSteer:
    """A raw forward hook on block ``layer`` adding ``vector`` to its output, and raw hooks
    recording v_proj outputs: independent of rloop's Trace."""

    def __init__(self, model, layer: int, vector: torch.Tensor | None):
        self.model, self.layer, self.vector, self.v = model, layer, vector, {}

    def __enter__(self):
        layers = self.model.model.layers
        self.handles = []
        if self.vector is not None:

            def add(module, args, output):
                if isinstance(output, tuple):
                    return (output[0] + self.vector, *output[1:])
                return output + self.vector

            self.handles.append(layers[self.layer].register_forward_hook(add))
        for i, block in enumerate(layers):

            def record(module, args, output, i=i):
                self.v[i] = output.detach()

            self.handles.append(block.self_attn.v_proj.register_forward_hook(record))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def _plain_greedy(model, ids, n_new, layer=1, vector=None) -> list[int]:
    """Greedy tokens by full forwards without a KV cache (plain HF forward per step)."""
    seq = list(ids)
    with torch.no_grad(), _RawSteer(model, layer, vector):
        for _ in range(n_new):
            logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
            seq.append(int(logits.argmax()))
    return seq[len(ids) :]


def _numpy_pr(x: np.ndarray) -> float:
    s = np.linalg.svd(x.astype(np.float64), compute_uv=False)
    return float((s**2).sum() ** 2 / (s**4).sum())


def _prompt_r_v(model, ids, vector, early=0, late=2, layer=1) -> float:
    """Per-head R_V of the last W prompt tokens under a raw steering hook, in numpy."""
    with torch.no_grad(), _RawSteer(model, layer, vector) as raw:
        model(input_ids=torch.tensor([ids]), use_cache=False)
    per_head = []
    for lay in (early, late):
        v = raw.v[lay][0, -WINDOW:].double().numpy().reshape(WINDOW, 2, 16)  # (W, Hkv, D)
        per_head.append(np.mean([_numpy_pr(v[:, h]) for h in range(2)]))
    return per_head[1] / per_head[0]


def test_steered_generation_adds_the_vector_at_every_position() -> None:
    lm = tiny_lm("llama")
    texts = [p.text for p in prompt_set(2)][:3]
    rows = [_ids(t) for t in texts]
    torch.manual_seed(1)
    vectors = torch.randn(3, 64) * 2.0
    vectors[0] = 0.0  # an unsteered row in the same batch
    sampling = SamplingConfig(max_new_tokens=5)
    point = address(1, "resid_post")
    result = steered_generate(lm, rows, vectors, 1, "resid_post", sampling, [point])
    for b, ids in enumerate(rows):
        expected = _plain_greedy(lm.model, ids, 5, vector=vectors[b] if b else None)
        assert result.new_tokens[b].tolist() == expected
        # Unsteered forward over prompt + generated tokens, plus the vector = what was captured.
        full = torch.tensor([ids + result.new_tokens[b].tolist()])
        with torch.no_grad(), Trace(lm.model, lm.adapter, capture=[point]) as tr:
            lm.model(input_ids=full, use_cache=False)
        real = result.attention_mask[b].bool()
        captured = result.captured[point][b][real]  # (n + N, d)
        torch.testing.assert_close(captured, tr[point][0] + vectors[b], atol=2e-5, rtol=1e-5)


def test_run_steer_equals_independent_computations(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    lm = tiny_lm("llama")
    config = SteerConfig(
        prompts=str(_file(tmp_path)), window=WINDOW, max_new_tokens=5, alphas=[0.5, 0, 2],
        n_random=2, n_boot=200, semantic="none",
    )  # fmt: skip
    run_dir, _, headline = run_steer(config, out=tmp_path / "run", lm=lm)
    prompts = list(prompt_set(4))
    rec = [p.text for p in prompts if p.group == "L5"]
    base = [p.text for p in prompts if p.group == "factual"]
    # u and norm_ref from windows captured with a plain Trace, in float64.
    windows = []
    for texts in (rec, base):
        batch = encode(lm.tokenizer, texts)
        point = address(1, "resid_post")
        with torch.no_grad(), Trace(lm.model, lm.adapter, capture=[point]) as tr:
            lm.model(**batch.model_inputs(), use_cache=False)
        windows.append(gather_windows(tr[point], batch.n_tokens, WINDOW).double())
    diff = windows[0].mean(dim=(0, 1)) - windows[1].mean(dim=(0, 1))
    u = (diff / diff.norm()).numpy()
    np.testing.assert_allclose(pd.read_csv(run_dir / "direction.csv")["u"], u, atol=1e-6)
    norm_ref = float(torch.cat(windows).flatten(0, 1).norm(dim=-1).median())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["steering"]["layer"] == 1
    assert manifest["steering"]["norm_ref"] == pytest.approx(norm_ref, rel=1e-6)

    grid = pd.read_csv(run_dir / "generations.csv", keep_default_na=False)
    assert len(grid) == 4 * (1 + 2 * 3) + 4  # steered x (none + 2 alphas x (u + 2 random)) + rec
    for p in prompts[4:6]:  # two factual prompts
        ids = _ids(p.text)
        rows = grid[grid.prompt_id == p.id].set_index("condition")
        none, steered = rows[rows.alpha == 0].loc["none"], rows[rows.alpha == 2].loc["direction"]
        assert none["new_tokens"] == " ".join(map(str, _plain_greedy(lm.model, ids, 5)))
        vector = torch.from_numpy(2.0 * norm_ref * u).float()
        assert steered["new_tokens"] == " ".join(
            map(str, _plain_greedy(lm.model, ids, 5, vector=vector))
        )
        assert float(none["r_v_prompt"]) == pytest.approx(
            _prompt_r_v(lm.model, ids, None), rel=1e-4
        )
        assert float(steered["r_v_prompt"]) == pytest.approx(
            _prompt_r_v(lm.model, ids, vector), rel=1e-4
        )
        assert float(steered["push_norm"]) == pytest.approx(2.0 * norm_ref, rel=1e-6)
    spearman = pd.read_csv(run_dir / "spearman.csv")
    assert set(spearman.series) == {"direction", "random (pooled)", "random-0", "random-1"}
    assert spearman["r"].dropna().between(-1, 1).all()
    assert set(pd.read_csv(run_dir / "versus_random.csv")["alpha"]) == {0.5, 2.0}
    assert (run_dir / "plots" / "dose_response.png").exists()
    assert headline["layer"] == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"alphas": []}, "alpha grid is empty"),
        ({"layer": 7}, "layer 7 is out of range"),
        ({"layer": 2}, "cannot change V at the late"),
        ({"point": "v"}, "not a residual-stream point"),
        ({"max_new_tokens": 2}, "below the 4-token window"),
    ],
)
def test_bad_input_is_refused_before_a_run_exists(tmp_path, change, message) -> None:
    out = tmp_path / "never"
    settings = {"window": WINDOW, "max_new_tokens": 5, **change}
    config = SteerConfig(prompts=str(_file(tmp_path)), **settings)
    with pytest.raises(ConfigError, match=message):
        run_steer(config, out=out, lm=tiny_lm())
    assert not out.exists()


def test_subspace_direction_is_the_top_singular_vector_signed_toward_recursive() -> None:
    generator = torch.Generator().manual_seed(0)
    rec = torch.randn(5, 4, 6, generator=generator, dtype=torch.float64) + 3.0
    base = torch.randn(6, 4, 6, generator=generator, dtype=torch.float64)
    found = steering_direction(rec, base, "subspace", 2)
    vt = np.linalg.svd(rec.reshape(-1, 6).numpy(), full_matrices=False)[2]
    diff = (rec.mean(dim=(0, 1)) - base.mean(dim=(0, 1))).numpy()
    expected = vt[1] if vt[1] @ diff >= 0 else -vt[1]
    np.testing.assert_allclose(found.u.numpy(), expected, atol=1e-10)
    assert found.cos_with_mean_diff == pytest.approx(expected @ diff / np.linalg.norm(diff))
    norms = np.linalg.norm(torch.cat([rec, base]).reshape(-1, 6).numpy(), axis=1)
    assert found.norm_ref == pytest.approx(float(torch.tensor(norms).median()))
