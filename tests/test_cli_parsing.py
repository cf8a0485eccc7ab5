"""The CLI's one reader of integer lists, ranges, layer pairs, numbers and prompt limits, and
that every command rejects bad input in one line (exit 2) before it computes anything."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

import rloop.models
from rloop.cli import app
from rloop.cli.options import RunOptions, print_outcome, run_guarded
from rloop.cli.parsing import (
    parse_float_list,
    parse_int_list,
    parse_layer_pair,
    parse_layer_ranges,
    parse_max_prompts,
    parse_names,
)
from rloop.errors import ConfigError

LIST_LAYER_COMMANDS = [
    ["ablate"],
    ["ablate-layer"],
    ["attn-vs-mlp"],
    ["heads"],
    ["saliency"],
    ["patch"],
    ["attribution"],
]
PAIR_LAYER_COMMANDS = [
    ["contraction"],
    ["temporal"],
    ["kv-patch"],
    ["scaling", "--models", "a,b"],
    ["checkpoints", "--model", "m", "--revisions", "step0,step1"],
]
MEASURE_COMMANDS = [["ablate"], ["ablate-group"], ["saliency"], ["patch"], ["attribution"]]
MEASURE_COMMANDS.append(["ablate-layer", "--layers", "1"])
CAUSAL_COMMANDS = [*MEASURE_COMMANDS, ["attn-vs-mlp"], ["heads"]]


# ----------------------------------------------------------------------------- the readers
def test_integer_lists_and_ranges() -> None:
    assert parse_int_list("5,28", "--layers") == [5, 28]
    assert parse_int_list("15-18", "--layers") == [15, 16, 17, 18]
    assert parse_int_list("3,7,10-12", "--layers") == [3, 7, 10, 11, 12]
    assert parse_int_list(" 4 , 6 - 7 ", "--layers") == [4, 6, 7]
    assert parse_int_list("9-9", "--layers") == [9]
    assert parse_int_list(None, "--layers") is None


@pytest.mark.parametrize("text", ["", "5,,7", "a", "1-2-3", "-1", "5-", "1.5"])
def test_unreadable_integer_list_names_the_flag(text: str) -> None:
    with pytest.raises(ConfigError, match=r"cannot read --layers .*e\.g\. 3,7,10-12"):
        parse_int_list(text, "--layers")


def test_reversed_range_is_an_error_with_the_fixed_range() -> None:
    with pytest.raises(ConfigError) as err:
        parse_int_list("3,22-20", "--layers")
    assert str(err.value) == "reversed range 22-20 in --layers: write LOW-HIGH, e.g. 20-22"


def test_layer_pair() -> None:
    assert parse_layer_pair("5,28", "--measure-layers") == [5, 28]
    assert parse_layer_pair(" 0 , 2 ", "--layers") == [0, 2]
    assert parse_layer_pair(None, "--layers") is None
    for bad in ["5", "5,6,7", "5-28", "a,b", ""]:
        with pytest.raises(ConfigError, match=r"^--measure-layers needs two layers EARLY,LATE"):
            parse_layer_pair(bad, "--measure-layers")
    with pytest.raises(ConfigError) as err:
        parse_layer_pair("25,5", "--measure-layers")
    assert str(err.value) == (
        "--measure-layers 25,5: the early layer 25 must be below the late layer 5; "
        "write EARLY,LATE, e.g. 5,25"
    )
    with pytest.raises(ConfigError, match=r"^--layers 4,4: .* e\.g\. 4,5$"):
        parse_layer_pair("4,4", "--layers")


def test_layer_ranges_names_and_numbers() -> None:
    assert parse_layer_ranges("15-29;23-27; 25", "--ranges") == ["15-29", "23-27", "25"]
    assert parse_layer_ranges(None, "--ranges") is None
    with pytest.raises(ConfigError, match="reversed range 29-15 in --ranges"):
        parse_layer_ranges("29-15;3", "--ranges")
    with pytest.raises(ConfigError, match="cannot read --ranges"):
        parse_layer_ranges("1,2", "--ranges")
    assert parse_names("L5, factual,") == ["L5", "factual"]
    assert parse_names(None) is None and parse_names(" , ") is None
    assert parse_float_list("0,0.25, 1", "--alphas") == [0.0, 0.25, 1.0]
    assert parse_float_list(None, "--alphas") is None
    for empty in ["", " ", ","]:
        with pytest.raises(ConfigError, match="--alphas is empty"):
            parse_float_list(empty, "--alphas")
    with pytest.raises(ConfigError, match="cannot read --alphas '0,x'"):
        parse_float_list("0,x", "--alphas")


def test_prompt_limit() -> None:
    assert parse_max_prompts(0) is None
    assert parse_max_prompts(7) == 7
    with pytest.raises(ConfigError) as err:
        parse_max_prompts(-3)
    assert str(err.value) == "--max-prompts must be 0 (all prompts) or a positive count, got -3"


# ----------------------------------------------------------------------------- printing
def test_error_text_is_printed_literally() -> None:
    tiny = typer.Typer()

    @tiny.command()
    def broken() -> None:
        def action() -> None:
            raise ConfigError("--executor ray needs Ray: pip install 'rloop[ray]'")

        run_guarded(action)

    result = CliRunner().invoke(tiny, [])
    assert result.exit_code == 2
    assert result.stderr == "error: --executor ray needs Ray: pip install 'rloop[ray]'\n"


def test_outcome_skips_none_values(capsys) -> None:
    run_dir = print_outcome(("runs/x", False, {"note": None, "transfer": 0.5, "n": 3}))
    assert capsys.readouterr().out.splitlines() == [
        "  transfer: 0.5000",
        "  n: 3",
        "report: runs/x/summary.md",
    ]
    assert str(run_dir) == "runs/x"


def test_validate_help_shows_the_config_keys() -> None:
    result = CliRunner().invoke(app, ["validate", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "Override [model] name." in result.output
    assert "Override [prompts] n_pairs." in result.output


# ----------------------------------------------------------------------------- commands
@pytest.fixture
def calls(monkeypatch, tmp_path) -> list[tuple[str, object]]:
    """Replace the launch of every experiment run (and the model loader) by a recorder that
    raises: a command that gets that far exits 1, not 2, and the test sees the config."""
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    seen: list[tuple[str, object]] = []

    def launch(self, run, config=None, **extra):
        seen.append((run.__name__, config))
        raise AssertionError(f"{run.__name__} was called")

    def load_model(*args, **kwargs):
        seen.append(("load_model", args[0] if args else None))
        raise AssertionError("load_model was called")

    monkeypatch.setattr(RunOptions, "launch", launch)
    monkeypatch.setattr(rloop.models, "load_model", load_model)
    return seen


def _rejected(args: list[str], tmp_path, calls) -> str:
    """Run the command; check exit 2, one stderr line, nothing computed or written."""
    out = tmp_path / "never"
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 2, (args, result.output)
    assert result.stdout == "", args
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr)
    assert "Traceback" not in result.output
    assert calls == [] and not out.exists(), args
    return lines[0]


@pytest.mark.parametrize("args", LIST_LAYER_COMMANDS, ids=lambda a: a[0])
def test_reversed_layer_range_in_every_layer_list_command(args, tmp_path, calls) -> None:
    line = _rejected([*args, "--layers", "22-20"], tmp_path, calls)
    assert line == "error: reversed range 22-20 in --layers: write LOW-HIGH, e.g. 20-22"


@pytest.mark.parametrize("args", PAIR_LAYER_COMMANDS, ids=lambda a: a[0])
def test_layer_pair_commands_reject_ranges_and_reversed_pairs(args, tmp_path, calls) -> None:
    line = _rejected([*args, "--layers", "22-20"], tmp_path, calls)
    assert line.startswith("error: --layers needs two layers EARLY,LATE")
    line = _rejected([*args, "--layers", "25,5"], tmp_path, calls)
    assert line.startswith("error: --layers 25,5: the early layer 25 must be below")


@pytest.mark.parametrize("args", MEASURE_COMMANDS, ids=lambda a: a[0])
def test_reversed_measure_layers_names_that_flag(args, tmp_path, calls) -> None:
    line = _rejected([*args, "--measure-layers", "25,5"], tmp_path, calls)
    assert line.startswith("error: --measure-layers 25,5: the early layer 25 must be below")
    assert "--layers" not in line.replace("--measure-layers", "")


@pytest.mark.parametrize("args", CAUSAL_COMMANDS, ids=lambda a: a[0])
def test_negative_max_prompts(args, tmp_path, calls) -> None:
    line = _rejected([*args, "--max-prompts", "-1"], tmp_path, calls)
    assert line == "error: --max-prompts must be 0 (all prompts) or a positive count, got -1"


def test_kv_patch_alphas_and_ranges(tmp_path, calls) -> None:
    line = _rejected(["kv-patch", "--alphas", ""], tmp_path, calls)
    assert line.startswith("error: --alphas is empty")
    line = _rejected(["kv-patch", "--ranges", "15-29;27-25"], tmp_path, calls)
    assert line == "error: reversed range 27-25 in --ranges: write LOW-HIGH, e.g. 25-27"


def test_good_input_reaches_the_experiment_parsed(tmp_path, calls) -> None:
    args = ["ablate", "--layers", "3,7,10-12", "--measure-layers", "0,2", "--max-prompts", "0"]
    result = CliRunner().invoke(app, [*args, "--groups", "L5, factual", "--out", str(tmp_path)])
    assert result.exit_code == 1 and isinstance(result.exception, AssertionError)
    [(name, config)] = calls
    assert name == "run_head_sweep"
    assert config.layers == [3, 7, 10, 11, 12] and config.measure_layers == [0, 2]
    assert config.max_prompts is None and config.groups == ["L5", "factual"]
    assert config.model == "smollm2-135m" and config.window == 16
    calls.clear()
    result = CliRunner().invoke(app, ["kv-patch", "--alphas", "1", "--ranges", "20-22;25"])
    [(name, config)] = calls
    assert config.alphas == [1.0] and config.ranges == ["20-22", "25"]
    assert (config.max_new_tokens, config.temperature, config.top_p) == (64, 0.0, 1.0)
    calls.clear()
    result = CliRunner().invoke(app, ["scaling", "--models", "a,b", "--layers", "1,2"])
    [(name, config)] = calls
    assert config.models == ["a", "b"] and config.settings.layers == [1, 2]
    assert config.settings.pr_modes == ["per-head", "whole"]


def test_every_experiment_option_reaches_its_config(tmp_path, calls) -> None:
    """Options read through the option groups and the experiment decorator arrive in the
    config: groups (model, contrast, window), plain fields, readers and derived values."""
    cases = [
        (
            ["contraction", "--twin-group", "none", "--recursive-group", "L3"],
            {"twin_group": None, "recursive_group": "L3", "pr_modes": ["per-head", "whole"]},
        ),
        (["contraction", "--twin-group", "L3_twin"], {"twin_group": "L3_twin"}),
        (
            ["temporal", "--revision", "step10", "--layers", "1,3", "--groups", "L5,factual"],
            {"revision": "step10", "layers": [1, 3], "groups": ["L5", "factual"]},
        ),
        (["ablate-layer", "--layers", "2-3", "--component", "both"], {"layers": [2, 3]}),
        (["verify", "--layers", "0,2", "--seed", "4"], {"layers": [0, 2], "seed": 4}),
        (
            ["gain", "--prompts", str(tmp_path / "p.txt"), "--groups", "a"],
            {"models": ["smollm2-135m"], "prompts": str(tmp_path / "p.txt"), "groups": ["a"]},
        ),
        (["ablate", "--mode", "mean", "--reference-group", "L1"], {"mode": "mean"}),
        (
            ["ablate", "--mode", "zero,mean,resample", "--n-resample", "5"],
            {"mode": "zero,mean,resample", "n_resample": 5},
        ),
        (["ablate", "--compile"], {"compile": True}),
        (["ablate", "--no-compile"], {"compile": False}),
        (["ablate"], {"compile": None}),
        (
            ["robustness", "--windows", "8,16", "--points", "v", "--early-layers", "1-3"],
            {"windows": [8, 16], "points": ["v"], "early_layers": [1, 2, 3], "twin_group": None},
        ),
        (
            ["robustness", "--twin-group", "L5_twin", "--max-prompts", "0"],
            {"twin_group": "L5_twin", "max_prompts": None, "estimators": ["plain", "corrected"]},
        ),
    ]
    for args, expected in cases:
        calls.clear()
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        [(_, config)] = calls
        for field, value in expected.items():
            assert getattr(config, field) == value, (args, field)
    calls.clear()
    CliRunner().invoke(app, ["ablate-layer", "--layers", "2", "--component", "both"])
    assert calls[0][1].components == ["attn", "mlp"]


def test_robustness_refuses_an_empty_grid_before_loading(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RLOOP_RUNS", str(tmp_path / "store"))
    out = tmp_path / "never"
    for args, message in (
        (["--windows", ""], "error: cannot read --windows ''"),
        (["--points", ""], "error: give at least one hook point with --points"),
        (["--estimators", "median"], "error: unknown PR estimator 'median'"),
    ):
        result = CliRunner().invoke(app, ["robustness", *args, "--out", str(out)])
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.startswith(message), (args, result.stderr)
        assert not out.exists() and not (tmp_path / "store").exists()
