"""``dqk report``: one self-contained HTML page over a run's outputs — its warnings, its table, its pictures."""

import base64
import json
import re
import shutil

import numpy as np
import pytest
from conftest_data import (  # noqa: F401
    digits_folder_fixture,
    invoke,
    text_model_path,
    write_instruction_jsonl,
)

from dqkernels import pipeline
from dqkernels.pipeline.report import (
    BinClassTable,
    GatheredOutputs,
    project_2d,
    report_warnings,
)

pytest.importorskip("matplotlib")

PNG_SOURCE = re.compile(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def image_run(tmp_path_factory, digits_folder):
    """A run over the digits plus a class 'zz' whose only image is unreadable; few samples kept."""
    root = tmp_path_factory.mktemp("report-image")
    images = shutil.copytree(digits_folder, root / "images")
    (images / "zz").mkdir()
    (images / "zz" / "broken.png").write_bytes(b"not a png")
    config = pipeline.PipelineConfig(input=str(images), work_dir=str(root / "work"), img_size=32, device="cpu",
                                     random_init=True,
                                     bins=2, ratio=0.1)
    with pytest.warns(UserWarning, match="gives no sample to classes"):
        pipeline.run_pipeline(config, log=lambda line: None)
    return root / "work"


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report-text")
    data = write_instruction_jsonl(root / "data.jsonl", count=24)
    config = pipeline.PipelineConfig(input=str(data), work_dir=str(root / "work"), text_model=str(text_model_path()),
                                     device="cpu", bins=3, ratio=0.25)
    pipeline.run_pipeline(config, log=lambda line: None)
    return root / "work"


def warning_lines(page: str) -> list[str]:
    section = re.search(r'<section class="warnings">(.*?)</section>', page, re.DOTALL)
    return re.findall(r"<li>(.*?)</li>", section.group(1), re.DOTALL) if section else []


def table_cells(page: str) -> dict:
    """{(bin, class): (selected, count)} from the page's bins × classes table."""
    cells = re.findall(r'data-bin="([^"]*)" data-class="([^"]*)" data-selected="(\d+)" data-count="(\d+)"', page)
    return {(b, c): (int(k), int(n)) for b, c, k, n in cells}


def assert_self_contained(page: str, images: int) -> None:
    sources = PNG_SOURCE.findall(page)
    assert len(sources) == images == page.count("<img ")
    for source in sources:
        assert base64.b64decode(source).startswith(b"\x89PNG\r\n\x1a\n")
    for reference in re.findall(r'(?:src|href)\s*=\s*["\']([^"\']*)', page):
        assert reference.startswith("data:") and "http" not in reference
    assert "<script" not in page and "<link" not in page and "url(" not in page


def test_image_run_page_shows_warnings_table_projection_and_thumbnails(image_run, tmp_path):
    out = tmp_path / "report.html"
    result = invoke(["report", image_run, "-o", out])
    assert result.exit_code == 0, result.output
    page = out.read_text(encoding="utf-8")
    warnings = warning_lines(page)
    assert any("random-init network (model resnet18, seed 0)" in line for line in warnings)
    assert any("1 unreadable input(s) were skipped" in line and "zz/broken.png" in line for line in warnings)
    assert "1 class(es) have no sample at all: zz" in warnings
    manifest = json.loads((image_run / "subset.json").read_text())
    unpicked = [str(c["class"]) for c in manifest["classes"] if c["selected"] == 0]
    assert len(unpicked) == 6  # 4 of 40 samples over 10 classes
    assert f"{len(unpicked)} class(es) have no selected sample: {', '.join(unpicked)}" in warnings
    assert table_cells(page) == {(str(c["bin"]), str(c["class"])): (c["selected"], c["count"])
                                 for c in manifest["cells"]}
    assert f"<td class=\"total\">{manifest['n_selected']} / {manifest['n_samples']}</td>" in page
    # projection, heatmap and one thumbnail montage; the bins and classes named on the page
    assert_self_contained(page, images=3)
    assert "2-D projection (PCA)" in page and "Thumbnails per bin" in page
    assert "First two principal components of 40 randomly drawn samples" in page
    assert "warning: Features come from a random-init network" in result.output


def test_a_subset_alone_leads_to_its_bins_and_features(image_run, tmp_path):
    whole, alone = tmp_path / "whole.html", tmp_path / "alone.html"
    assert invoke(["report", image_run, "-o", whole, "-q"]).exit_code == 0
    result = invoke(["report", image_run / "subset.npy", "-o", alone, "-q", "--thumbnails", "0"])
    assert result.exit_code == 0 and result.output == ""
    whole_page, alone_page = whole.read_text(), alone.read_text()
    assert table_cells(alone_page) == table_cells(whole_page)
    assert warning_lines(alone_page) == warning_lines(whole_page)
    assert_self_contained(alone_page, images=2)  # no thumbnails with --thumbnails 0


def test_text_run_page_shows_example_records_per_bin(text_run, tmp_path):
    out = tmp_path / "text.html"
    result = invoke(["report", text_run, "-o", out, "--thumbnails", "3"])
    assert result.exit_code == 0, result.output
    page = out.read_text(encoding="utf-8")
    assert '<section class="ok"><h2>Warnings</h2><p>None.</p>' in page  # a real model, all cells picked
    manifest = json.loads((text_run / "subset.json").read_text())
    assert table_cells(page) == {(str(c["bin"]), "None"): (c["selected"], c["count"]) for c in manifest["cells"]}
    assert_self_contained(page, images=2)  # projection and heatmap
    cards = re.findall(r'<div class="record ?(picked)?"><div class="head">id (\d+) · (selected|not selected)', page)
    assert len(cards) == 3 * 3
    subset = set(np.load(text_run / "subset.npy").tolist())
    assert all((int(row) in subset) == (mark == "selected") == bool(picked) for picked, row, mark in cards)
    assert "instruction</b>: Explain" in page


def test_patch_store_images_show_their_dropped_patches(tmp_path):
    from dqkernels.pixel.patch_store import write_patch_store

    images = np.full((3, 8, 8, 3), 10, dtype=np.uint8)
    keep = np.zeros((3, 4), dtype=bool)
    keep[:, :2] = True
    meta = {"scoring": {"cam_checkpoint": "random-init"}}
    store = write_patch_store(tmp_path / "patches", images, keep, np.array([4, 7, 9]), patch=4, meta=meta)
    out = tmp_path / "patches.html"
    result = invoke(["report", store, "-o", out])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert "3 images of 8×8 px in 4 px patches; 6 of 12 patches kept." in page
    assert any("GradCAM++ scores come from a random-init network" in line for line in warning_lines(page))
    assert_self_contained(page, images=1)


def test_report_never_overwrites_an_input(image_run, tmp_path):
    manifest = image_run / "subset.json"
    before = manifest.read_bytes()
    result = invoke(["report", image_run, "-o", manifest])
    assert result.exit_code == 1 and "an output must not overwrite an input" in result.output
    assert manifest.read_bytes() == before
    features = image_run / "features" / "feats.npy"
    before = features.read_bytes()
    result = invoke(["report", image_run, "-o", features])
    assert result.exit_code == 1 and "an output must not overwrite an input" in result.output
    assert features.read_bytes() == before
    unrelated = tmp_path / "unrelated.html"
    unrelated.write_text("<html>mine</html>")
    result = invoke(["report", image_run, "-o", unrelated])
    assert result.exit_code == 1 and "exists and is not a dqk report" in result.output
    assert unrelated.read_text() == "<html>mine</html>"
    again = tmp_path / "again.html"
    assert invoke(["report", image_run, "-o", again, "-q", "--thumbnails", "0"]).exit_code == 0
    assert invoke(["report", image_run, "-o", again, "-q", "--thumbnails", "0"]).exit_code == 0  # its own page
    stray = tmp_path / "notes.txt"
    stray.write_text("hello")
    result = invoke(["report", stray, "-o", tmp_path / "r.html"])
    assert result.exit_code == 1 and "is not an output of the tool" in result.output
    assert not (tmp_path / "r.html").exists()


def test_warnings_name_empty_bins_tiny_cells_and_unpicked_classes():
    gathered = GatheredOutputs(selected=np.array([0]), class_names=["cat", "dog"])
    table = BinClassTable(bins=[0, 1, 2], classes=[0, 1], counts=np.array([[40, 2], [0, 0], [38, 40]]),
                          selected=np.array([[4, 0], [0, 0], [4, 4]]))
    assert report_warnings(gathered, table) == [
        "1 empty bin(s): 1",
        "1 tiny cell(s), under a quarter of the median cell (39 samples): bin 0 / dog (2)",
    ]
    table.selected[2, 1] = 0
    assert "1 class(es) have no selected sample: dog" in report_warnings(gathered, table)


def test_projection_matches_the_leading_principal_components():
    rng = np.random.default_rng(3)
    features = (rng.standard_normal((400, 64)) * (1.0 / np.arange(1, 65))).astype(np.float32)
    rows = np.arange(400)
    coordinates = project_2d(features, rows[::-1], rows, seed=0, normalize=False)
    centred = features - features.mean(axis=0)
    _, _, components = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
    expected = centred[::-1] @ components[:2].T
    np.testing.assert_allclose(np.abs(coordinates), np.abs(expected), atol=1e-4)
