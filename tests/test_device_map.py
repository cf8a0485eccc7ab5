"""A model dispatched by accelerate (half its blocks offloaded to disk, weights on the meta
device and streamed in by accelerate's hooks, as with device_map="auto" on a model larger
than the GPUs) gives the same captures, edits and gains as the plain model."""

from __future__ import annotations

import copy

import pytest
import torch

from rloop.capture.trace import Trace, address
from rloop.experiments.gain import measure_gain
from rloop.interventions.edits import head_ablation_edit
from tests.test_contraction import prompt_set
from tests.tiny_models import TinyLM, tiny_lm


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("RLOOP_PROGRESS", "0")


def dispatched(lm: TinyLM, offload_dir) -> TinyLM:
    from accelerate import dispatch_model

    device_map = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.layers.2": "disk",
        "model.norm": "cpu",
        "lm_head": "cpu",
    }
    model = dispatch_model(copy.deepcopy(lm.model), device_map, offload_dir=str(offload_dir))
    return TinyLM(model, lm.tokenizer, lm.adapter)


def test_captures_edits_and_gain_survive_offloading(tmp_path) -> None:
    lm = tiny_lm("llama")
    split = dispatched(lm, tmp_path / "offload")
    offloaded = split.adapter.blocks(split.model)[2].self_attn.v_proj.weight
    assert offloaded.device.type == "meta"  # really offloaded, loaded only during forward
    assert hasattr(split.adapter.blocks(split.model)[2], "_hf_hook")

    ids = torch.tensor([[4, 8, 15, 16, 23, 42, 7, 9]])
    points = [address(2, "v"), address(1, "z"), address(2, "resid_post")]
    edits = {address(1, "z"): head_ablation_edit(torch.tensor([[1.0, 0.0, 1.0, 1.0]]))}
    results = []
    for model in (lm.model, split.model):
        with torch.no_grad(), Trace(model, lm.adapter, capture=points, edits=edits) as trace:
            logits = model(input_ids=ids, use_cache=False).logits
        results.append(({p: trace[p] for p in points}, logits))
    (plain, plain_logits), (off, off_logits) = results
    for point in points:
        torch.testing.assert_close(off[point], plain[point], rtol=0, atol=0)
    torch.testing.assert_close(off_logits, plain_logits, rtol=0, atol=0)
    ablated = plain[address(1, "z")][..., 1, :]  # (B, T, D): head 1 removed
    assert torch.equal(ablated, torch.zeros_like(ablated))

    prompts = prompt_set(2)
    a = measure_gain(lm, prompts, batch_size=4)
    b = measure_gain(split, prompts, batch_size=4)
    torch.testing.assert_close(
        torch.tensor(b["gain_last"].to_numpy()), torch.tensor(a["gain_last"].to_numpy())
    )
