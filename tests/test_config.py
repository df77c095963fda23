"""`dqk run` options: one table of click types checks flags, YAML values and PipelineConfig fields
alike, and the whole config is checked before the first stage runs."""

from dataclasses import fields

import click
import pytest
from conftest_data import digits_folder_fixture, invoke, write_instruction_jsonl  # noqa: F401

from dqkernels.cli.main import run_command
from dqkernels.pipeline.runner import CONFIG_TYPES, PipelineConfig, run_pipeline


def _write_config(directory, body: str):
    path = directory / "dq.yaml"
    path.write_text(body, encoding="utf-8")
    return path


def _run_failure(tmp_path, args):
    """Run ``dqk run ARGS``; it must fail with one Error line and create nothing in tmp_path."""
    before = sorted(p.name for p in tmp_path.iterdir())
    result = invoke(["run", *args])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "the run wrote something"
    return result.exit_code, lines[0]


def test_every_config_field_is_a_run_option_of_its_table_type():
    options = {param.name: param for param in run_command.params if isinstance(param, click.Option)}
    assert set(CONFIG_TYPES) == {f.name for f in fields(PipelineConfig)} == set(options) - {"quiet"}
    for name, param_type in CONFIG_TYPES.items():
        if isinstance(param_type, click.types.BoolParamType):
            assert options[name].is_flag and options[name].secondary_opts, name
        else:
            assert options[name].type is param_type, name


BAD_YAML_VALUES = {
    "string 'no' for a boolean": ('per_class: "no"', "per_class must be true or false, got 'no'"),
    "string 'false' for a boolean": ('link: "false"', "link must be true or false, got 'false'"),
    "number for a boolean": ("strict: 1", "strict must be true or false, got 1"),
    "image size below the flag's range": ("img_size: 3", "img_size: 3 is not in the range x>=8"),
    "negative workers": ("workers: -1", "workers: -1 is not in the range x>=0"),
    "zero batch size": ("batch_size: 0", "batch_size: 0 is not in the range x>=1"),
    "percent ratio": ("ratio: 20%", "ratio must be a number, got '20%'"),
    "ratio above one": ("ratio: 1.5", "ratio: 1.5 is not in the range 0<x<=1"),
    "fractional bins": ("bins: 2.5", "bins must be an integer, got 2.5"),
    "number for a model name": ("model: 123", "model must be a string, got 123"),
    "unknown metric": ("metric: manhattan", "metric: 'manhattan' is not one of 'cosine', 'euclidean'"),
    "drop of one": ("drop: 1.0", "drop: 1.0 is not in the range 0<=x<1"),
    "zero lambda": ("lam: 0", "lam: 0.0 is not in the range x>0"),
    "device name": ("device: gpu", "device: 'gpu' is not a device"),
    "negative seed": ("seed: -1", "seed: -1 is not in the range x>=0"),
    "missing checkpoint": ("checkpoint: nowhere.pth", "nowhere.pth' does not exist"),
    "list for a path": ("export: [a, b]", "export must be a path, got ['a', 'b']"),
    "null for a required value": ("bins: null", "bins needs a value"),
    "unknown key": ("ratoi: 0.2", "unknown key 'ratoi'"),
    "key given twice": ("per_class: true\nper-class: false", "'per_class' is given twice"),
}


@pytest.mark.parametrize("case", list(BAD_YAML_VALUES))
def test_bad_yaml_value_is_refused_before_any_stage(tmp_path, digits_folder, case):
    line, expected = BAD_YAML_VALUES[case]
    config = _write_config(tmp_path, f"input: {digits_folder}\nwork_dir: work\ndevice: cpu\n{line}\n")
    exit_code, message = _run_failure(tmp_path, [config])
    assert exit_code == 1 and f"config {str(config)!r}" in message and expected in message, message


@pytest.mark.parametrize("flag,value,key", [
    ("--img-size", "3", "img_size"), ("--workers", "-1", "workers"), ("--batch-size", "0", "batch_size"),
    ("--ratio", "20%", "ratio"), ("--lam", "0", "lam"), ("--device", "gpu", "device"),
])
def test_flag_and_yaml_refuse_the_same_values(tmp_path, digits_folder, flag, value, key):
    exit_code, message = _run_failure(tmp_path, ["--input", digits_folder, "--work-dir", tmp_path / "w", flag, value])
    assert exit_code == 2 and f"'{flag}'" in message
    config = _write_config(tmp_path, f"input: {digits_folder}\nwork_dir: w\n{key}: {value}\n")
    exit_code, message = _run_failure(tmp_path, [config])
    assert exit_code == 1 and f"{key}" in message


def test_yaml_booleans_are_real_booleans(tmp_path, digits_folder):
    config = _write_config(tmp_path, f"input: {digits_folder}\nper_class: no\nlink: true\nstrict: off\n")
    loaded = PipelineConfig.from_yaml(config)
    assert (loaded.per_class, loaded.link, loaded.strict) == (False, True, False)


def test_yaml_that_is_not_a_mapping_or_not_yaml_is_one_error_line(tmp_path):
    for body, expected in [("- input: x\n", "must be a mapping"), ("input: [unclosed\n", "cannot read config"),
                           ("[" * 5000 + "]" * 5000 + "\n", "cannot read config")]:
        exit_code, message = _run_failure(tmp_path, [_write_config(tmp_path, body)])
        assert exit_code == 1 and expected in message, message


def test_flags_override_yaml_and_are_checked_with_it(tmp_path, digits_folder):
    config = _write_config(tmp_path, f"input: {digits_folder}\nwork_dir: work\nratio: 20%\n")
    exit_code, message = _run_failure(tmp_path, [config, "--ratio", "0.5"])
    assert exit_code == 1 and "ratio must be a number" in message  # the file is checked as a whole


def test_config_built_in_python_is_checked_by_the_same_types(tmp_path, digits_folder):
    for field, value, expected in [("per_class", "no", "per_class must be true or false"),
                                   ("img_size", 3, "img_size: 3 is not in the range"),
                                   ("ratio", "0.2", "ratio must be a number")]:
        config = PipelineConfig(input=str(digits_folder), work_dir=str(tmp_path / "work"), **{field: value})
        with pytest.raises(ValueError, match=expected):
            run_pipeline(config, log=lambda line: None)
    assert not (tmp_path / "work").exists()


def test_combinations_are_checked_before_any_stage(tmp_path, digits_folder):
    text = write_instruction_jsonl(tmp_path / "data.jsonl", count=6)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("keep")
    cases = [
        (["--input", digits_folder], "the image model has no weights"),
        (["--input", text, "--text-model", tmp_path / "taken", "--drop", "0.5"], "pixel quantization needs images"),
        (["--input", text, "--text-model", tmp_path / "taken", "--mode", "gradient"], "mode 'pooled' only"),
        (["--input", digits_folder, "--grad-delta", "official"], "grad_delta applies to mode 'gradient' only"),
        (["--input", digits_folder, "--model", "resnet19"], "unknown timm model 'resnet19'"),
        (["--input", digits_folder, "--drop", "0.5", "--quantize-grid", "10"], "quantize_grid must divide 224"),
        (["--input", digits_folder, "--drop", "0.5", "--quantize-img-size", "30"], "multiple of quantize_grid"),
        (["--input", digits_folder, "--export", tmp_path / "taken"], "already exists and is not empty"),
        (["--input", digits_folder], "run needs a work directory"),
    ]
    for args, expected in cases:
        work = [] if expected == "run needs a work directory" else ["--work-dir", tmp_path / "work"]
        exit_code, message = _run_failure(tmp_path, [*args, *work, "--device", "cpu"])
        assert exit_code == 1 and expected in message, (args, message)
