"""Residual gain: what transformers' hidden_states holds (per family), gain from block hooks vs
an independent float64 reference, the H25 tables on a hand-computed case, and the run record
with a failing model and resume."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch

from rloop.capture.trace import Trace, address
from rloop.errors import ConfigError, ModelLoadError
from rloop.experiments.gain import GainConfig, h25_predictions, measure_gain, run_gain
from rloop.experiments.verify import VerifyConfig, load_prompts
from rloop.models.architecture import architecture_facts, facts_of_model
from rloop.prompts import DEFAULT_BANK_VERSION, load_bank
from tests.test_contraction import prompt_set
from tests.test_sweeps import write_prompts
from tests.tiny_models import FAMILIES, VOCAB, tiny_config, tiny_lm


@pytest.fixture(autouse=True)
def _isolated_store(tmp_path, monkeypatch):
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    monkeypatch.setenv("RLOOP_PROGRESS", "0")


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_states_layout(family: str) -> None:
    """hidden_states[0] = block 0 input, [l+1] = block l output for l < n-1, and the last
    entry = final_norm(last block output): the last block's raw output is not in the tuple."""
    lm = tiny_lm(family)
    n = lm.adapter.n_layers
    ids = torch.tensor([[5, 17, 3, 44, 9, 61, 2]])
    points = [address(layer, p) for layer in range(n) for p in ("resid_pre", "resid_post")]
    with torch.no_grad(), Trace(lm.model, lm.adapter, capture=points) as trace:
        hidden = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
    norm = lm.model.get_submodule(lm.adapter.final_norm_path)
    last_out = trace[address(n - 1, "resid_post")]
    assert len(hidden) == n + 1
    torch.testing.assert_close(hidden[0], trace[address(0, "resid_pre")], rtol=0, atol=0)
    for layer in range(n - 1):
        torch.testing.assert_close(hidden[layer + 1], trace[address(layer, "resid_post")])
    with torch.no_grad():
        torch.testing.assert_close(hidden[-1], norm(last_out))
    assert not torch.allclose(hidden[-1], last_out)


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gpt2"])
def test_gain_equals_float64_reference(family: str) -> None:
    """Reference: the same weights with the final norm replaced by Identity, so the HF
    hidden_states tuple holds every block output; norms in float64 numpy."""
    lm = tiny_lm(family)
    prompts = prompt_set(3)
    table = measure_gain(lm, prompts, batch_size=4)
    single = measure_gain(lm, prompts, batch_size=1)
    np.testing.assert_allclose(table["gain_last"], single["gain_last"], rtol=1e-6)

    bare = copy.deepcopy(lm.model)
    parent, _, leaf = lm.adapter.final_norm_path.rpartition(".")
    setattr(bare.get_submodule(parent), leaf, torch.nn.Identity())
    norm = lm.model.get_submodule(lm.adapter.final_norm_path)
    n = lm.adapter.n_layers
    for prompt in list(prompts)[:3]:
        ids = torch.tensor([lm.tokenizer(prompt.text)["input_ids"]])
        with torch.no_grad():
            hidden = bare(input_ids=ids, output_hidden_states=True).hidden_states
            normed = norm(hidden[n]).double().numpy()[0]  # (T, d)
        h = [x.double().numpy()[0] for x in hidden]  # n+1 x (T, d)
        rows = table[table.prompt_id == prompt.id].set_index(["stage", "layer"])
        for layer in range(n):
            per_token = np.linalg.norm(h[layer + 1], axis=-1) / np.linalg.norm(h[layer], axis=-1)
            np.testing.assert_allclose(rows.loc[("block", layer), "gain_last"], per_token[-1],
                                       rtol=1e-5)  # fmt: skip
            np.testing.assert_allclose(rows.loc[("block", layer), "gain_mean"], per_token.mean(),
                                       rtol=1e-5)  # fmt: skip
        final = np.linalg.norm(normed, axis=-1) / np.linalg.norm(h[n], axis=-1)
        np.testing.assert_allclose(rows.loc[("final_norm", n), "gain_last"], final[-1], rtol=1e-5)


def test_architecture_facts() -> None:
    expected = {  # (n_heads, n_kv_heads, d_head, rotary_fraction)
        "llama": (4, 2, 16, 1.0),
        "gemma3": (4, 2, 16, 1.0),
        "gpt_neox": (4, 4, 16, 0.25),
        "gpt2": (4, 4, 16, 0.0),
        "gptj": (4, 4, 16, 8 / 16),
    }
    for family, (heads, kv, d_head, rotary) in expected.items():
        facts = architecture_facts(tiny_config(family))
        assert (facts.n_heads, facts.n_kv_heads, facts.d_head) == (heads, kv, d_head)
        assert facts.rotary_fraction == pytest.approx(rotary)
        assert facts.rho == heads / d_head and facts.n_layers == 3 and facts.d_model == 64
    model = tiny_lm("gpt2").model
    assert facts_of_model(model).n_params == sum(p.numel() for p in model.parameters())


def test_h25_predictions_and_accuracy_hand_computed() -> None:
    models = pd.DataFrame(
        {
            "model": ["a", "b", "c", "d"],
            "rho": [0.05, 0.1, 0.25, 0.5],
            "gain": [1.2, 0.9, 0.8, 1.1],
            "gain_ci_low": [1.1, 0.7, 0.7, 0.95],
            "gain_ci_high": [1.3, 1.05, 0.9, 1.2],
        }
    )
    table, accuracy = h25_predictions(models, threshold=0.2)
    assert table["predicted"].tolist() == ["expansion", "expansion", "dampening", "dampening"]
    assert table["correct"].tolist() == [True, False, True, False]
    assert table["ci_includes_1"].tolist() == [False, True, False, True]
    assert accuracy == 0.5


def test_run_gain_records_failure_correlation_and_resumes(tmp_path) -> None:
    prompts = write_prompts(tmp_path / "p.csv", n_per_group=3)
    loads: list[str] = []

    def loader(name, **kwargs):
        loads.append(name)
        if name == "broken":
            raise ModelLoadError("broken: no such model; check the name")
        return tiny_lm(name)

    families = ["llama", "gpt_neox", "gpt2", "gemma3"]
    config = GainConfig(models=[*families[:2], "broken", *families[2:]], prompts=str(prompts),
                        n_boot=200)  # fmt: skip
    run_dir, _, headline = run_gain(config, out=tmp_path / "g", loader=loader)
    models = pd.read_csv(run_dir / "models.csv")
    assert models["model"].tolist() == families
    failures = pd.read_csv(run_dir / "failures.csv")
    assert failures["model"].tolist() == ["broken"] and "no such model" in failures.error[0]
    layers = pd.read_csv(run_dir / "layers.csv")
    for row in models.itertuples():
        last = layers[(layers.model == row.model) & (layers.layer == 2) & (layers.stage == "block")]
        np.testing.assert_allclose(row.gain, last["gain_last"].mean(), rtol=1e-9)
    correlations = pd.read_csv(run_dir / "correlations.csv")
    pearson = correlations[(correlations.y == "gain") & (correlations.method == "pearson")]
    rho = models["rho"].to_numpy()
    if np.ptp(rho) > 0:
        expected = scipy.stats.pearsonr(rho, models["gain"]).statistic
        np.testing.assert_allclose(pearson["r"].iloc[0], expected, rtol=1e-9)
    else:  # every tiny model has rho = 4/16: the correlation is undefined, not 0
        assert np.isnan(pearson["r"].iloc[0]) and np.isnan(headline["pearson_r_rho_gain"])
    assert (run_dir / "plots" / "h25.png").stat().st_size > 0
    loads.clear()
    assert run_gain(config, out=tmp_path / "g", loader=loader)[1]  # complete: nothing loads
    assert loads == []


def test_gain_rejects_duplicates_before_writing(tmp_path) -> None:
    with pytest.raises(ConfigError, match="more than once: llama"):
        run_gain(GainConfig(models=["llama", "gpt2", "llama"]), out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


class _WordHashTokenizer:
    """Each whitespace-separated word -> (sum of its bytes) % VOCAB (1.. VOCAB - 1): English
    prompts of the shipped bank on the tiny models."""

    pad_token_id = 0

    def __call__(self, texts, **kwargs):
        def encode(text):
            return [1 + sum(w.encode()) % (VOCAB - 1) for w in text.split()]

        if isinstance(texts, str):
            return {"input_ids": encode(texts)}
        return {"input_ids": [encode(t) for t in texts]}


def test_gain_and_verify_default_to_bank_v2_and_v1_stays_loadable(tmp_path) -> None:
    assert GainConfig().bank_version == DEFAULT_BANK_VERSION == "v2"
    assert VerifyConfig().bank_version == "v2" and load_prompts(VerifyConfig()).version == "v2"
    assert load_prompts(VerifyConfig(bank_version="v1")).version == "v1"

    def loader(name, **kwargs):
        lm = tiny_lm(name)
        lm.tokenizer = _WordHashTokenizer()
        return lm

    for version, config in (
        ("v2", GainConfig(models=["llama"], groups=["L1_twin"], n_boot=200)),  # v2 only
        ("v1", GainConfig(models=["llama"], groups=["L1"], bank_version="v1", n_boot=200)),
    ):
        run_dir, _, _ = run_gain(config, out=tmp_path / version, loader=loader)
        manifest = json.loads((run_dir / "manifest.json").read_text())
        bank = load_bank(version).select(config.groups)
        assert manifest["prompts"]["version"] == version
        assert manifest["prompts"]["sha256"] == bank.sha256
        layers = pd.read_csv(run_dir / "layers.csv")
        assert set(layers["prompt_id"]) == {p.id for p in bank}
