"""Sample ids and the data they name (docs/method.md §3.5): the image-folder listing against
torchvision's, items.jsonl, paths that must stay inside their root, and every consumer of ids —
DQSubset, export, ``dqk quantize`` — resolving ids by recorded path and size."""

import filecmp
import json
import os
import shutil
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest
from conftest_data import invoke, snapshot_files
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

import dqkernels
from dqkernels import pipeline
from dqkernels.core.errors import InputError
from dqkernels.data import DQSubset
from dqkernels.formats.feature_set import (
    id_origin,
    open_feature_set,
    read_feature_items,
    read_sidecar,
)
from dqkernels.formats.items import (
    EXPORT_MANIFEST,
    Item,
    check_item_path,
    list_image_folder,
    read_export_manifest,
    read_items,
    resolve_items,
    write_items,
)
from dqkernels.pixel.gradcam import select_samples

BROKEN = "a/0_broken.png"
FOLDER_FILES = [  # torchvision ImageFolder order: see test_listing_follows_torchvision_on_the_test_folder
    BROKEN, "a/a1.png", "a/a2.png", "a/sub/a3.png", "a/sub-x/a4.png",
    "b/b1.png", "b/b2.png", "b/b3.png",
    "c/c1.png", "c/deep/c2.png", "c/deep-er/c4.png", "c/deep/er/c3.png",
]


def _png(path: Path, seed: int, size: int = 16) -> None:
    """A noise PNG (seeded), so that files differ in content and, usually, in size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _write_folder(root: Path) -> Path:
    for seed, relative in enumerate(FOLDER_FILES):
        if relative == BROKEN:
            (root / "a").mkdir(parents=True, exist_ok=True)
            (root / relative).write_bytes(b"\x89PNG\r\n\x1a\n cut short")
        else:
            _png(root / relative, seed)
    return root


def _ok(args):
    result = invoke(args)
    assert result.exit_code == 0, result.output
    return result


def _draw_subset(features: Path, ratio: float = 0.5, seed: int = 0) -> Path:
    """bins.npz and subset.npy (+ manifest) inside the feature-set directory, as `dqk bin/sample` do."""
    outcome = pipeline.make_bins(features, 2)
    subset = pipeline.draw_subset(outcome.path, ratio, seed=seed)
    return pipeline.save_subset(subset, outcome.path)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """An image folder with nested class folders and one unreadable image, its feature set
    (resnet18, random init, 32 px) and a subset drawn from it."""
    base = tmp_path_factory.mktemp("items")
    root = _write_folder(base / "images")
    features = base / "feats"
    pipeline.extract_features(root, features, model="resnet18", img_size=32, device="cpu", random_init=True)
    subset_path = _draw_subset(features)
    return types.SimpleNamespace(
        root=root, features=features, subset=subset_path, ids=np.load(subset_path),
        items=read_items(features / "items.jsonl"),
    )


def _copy_features(extracted, dest: Path, ratio: float = 0.5) -> Path:
    """A private copy of the feature set (no bins or subset) with its own bins and subset."""
    shutil.copytree(extracted.features, dest, ignore=shutil.ignore_patterns("bins.*", "subset.*"))
    return _draw_subset(dest, ratio)


# --------------------------------------------------------------------------- listing


def _torchvision_listing(root: Path):
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(root))
    relative = [os.path.relpath(path, root).replace(os.sep, "/") for path, _ in dataset.samples]
    return relative, [label for _, label in dataset.samples], dataset.classes


def test_listing_follows_torchvision_on_nested_class_folders(tmp_path):
    root = tmp_path / "data"
    for relative in ("c/a/x.png", "c/sub-a/y.png", "c/sub/w.png", "c/z.png", "c/sub/deeper/v.JPG",
                     "b/B.PnG", "b/a.webp", "b/notes.txt"):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(b"x" * (len(relative) + 3))
    (root / "stray.png").write_bytes(b"not in a class folder")
    outside = tmp_path / "elsewhere"
    (outside / "inner").mkdir(parents=True)
    (outside / "q.png").write_bytes(b"qq")
    (outside / "inner" / "p.png").write_bytes(b"ppp")
    os.symlink(outside, root / "d")  # a linked class folder is followed, as torchvision does

    listing = list_image_folder(root)
    paths, labels, classes = _torchvision_listing(root)
    assert listing.relative_paths == paths
    assert listing.labels.tolist() == labels and listing.class_names == classes
    # Sorted os.walk orders directories by their whole path: 'sub-a' < 'sub/deeper' ('-' < '/').
    assert listing.relative_paths[2:7] == [
        "c/z.png", "c/a/x.png", "c/sub/w.png", "c/sub-a/y.png", "c/sub/deeper/v.JPG"
    ]
    assert listing.sizes.tolist() == [(root / p).stat().st_size for p in paths]
    assert listing.items[0] == Item("b/B.PnG", len("b/B.PnG") + 3)


def test_listing_follows_torchvision_on_the_test_folder(tmp_path):
    root = _write_folder(tmp_path / "images")
    assert list_image_folder(root).relative_paths == FOLDER_FILES == _torchvision_listing(root)[0]


def test_listing_skips_class_folders_without_images(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"1")
    (tmp_path / "b").mkdir()  # torchvision refuses an empty class; the listing leaves it out
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "y.bmp").write_bytes(b"22")
    listing = list_image_folder(tmp_path)
    assert listing.class_names == ["a", "c"] and listing.labels.tolist() == [0, 1]


# Few, similar names, so that sibling folders whose order depends on '-', '.', '_' and case are common.
FOLDER = st.sampled_from(["a", "a-b", "a.b", "a_b", "ab", "A", "b", "0"])
STEM = st.text(alphabet="ab-_.0A", min_size=1, max_size=3).filter(lambda name: name not in (".", ".."))
EXTENSION = st.sampled_from([".png", ".JPG", ".Webp", ".txt"])


@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c-d"]), st.lists(FOLDER, max_size=3), STEM, EXTENSION),
                min_size=1, max_size=16))
def test_listing_matches_torchvision_on_random_trees(files):
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        written = 0
        for class_name, folders, stem, extension in files:
            path = root.joinpath(class_name, *folders, stem + extension)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"")
            except (FileExistsError, NotADirectoryError, IsADirectoryError):
                continue  # a name already taken by a file or a folder
            written += extension != ".txt"
        try:
            expected = _torchvision_listing(root)
        except FileNotFoundError:  # torchvision refuses a tree with an image-less class folder
            return
        listing = list_image_folder(root)
        assert (listing.relative_paths, listing.labels.tolist(), listing.class_names) == expected
        assert written >= len(listing.relative_paths)


# --------------------------------------------------------------------------- item paths and items.jsonl


@pytest.mark.parametrize("path, reason", [
    ("../outside/pwn.png", "'..' component"),
    ("a/../../pwn.png", "'..' component"),
    ("/etc/passwd", "is absolute"),
    ("a//b.png", "not normalised"),
    ("./a.png", "not normalised"),
    ("a/", "not normalised"),
    ("", "non-empty string"),
    ("a\x00.png", "NUL"),
])
def test_item_paths_must_stay_inside_their_root(path, reason):
    with pytest.raises(InputError, match=reason):
        check_item_path(path, "here")
    assert check_item_path("a/b-c/..d.png", "here") == "a/b-c/..d.png"


def test_items_file_round_trip_and_the_older_form(tmp_path):
    items = [Item("a/x.png", 10), Item("b/ü ✓.png", 0), Item("b/\udcff.png", 3)]  # an undecodable name too
    write_items(tmp_path / "items.jsonl", items)
    assert read_items(tmp_path / "items.jsonl") == items
    assert json.loads((tmp_path / "items.jsonl").read_text().splitlines()[0]) == {"path": "a/x.png", "size": 10}
    (tmp_path / "old.jsonl").write_text('"a/x.png"\n"b/y.png"\n')
    assert read_items(tmp_path / "old.jsonl") == [Item("a/x.png"), Item("b/y.png")]


@pytest.mark.parametrize("text, message", [
    ("a/x.png\n", "not a JSON item"),
    ("[" * 100000 + "\n", "nested too deeply"),
    ("3\n", "an item is a JSON object"),
    ('{"path": "a.png", "size": 1, "extra": 2}\n', "an item is a JSON object"),
    ('{"size": 1}\n', "an item is a JSON object"),
    ('{"path": "a.png", "size": -1}\n', "non-negative integer"),
    ('{"path": "a.png", "size": true}\n', "non-negative integer"),
    ('{"path": "a.png", "size": 1.5}\n', "non-negative integer"),
    ('{"path": 7, "size": 1}\n', "non-empty string"),
    ('"a.png"\n\n"b.png"\n', "line 2"),
    ('"a.png"\n"a.png"\n', "appears twice"),
    ('"../x.png"\n', "'..' component"),
])
def test_invalid_items_files_are_one_input_error(tmp_path, text, message):
    (tmp_path / "items.jsonl").write_text(text)
    with pytest.raises(InputError, match=message):
        read_items(tmp_path / "items.jsonl")
    (tmp_path / "items.jsonl").write_bytes(b'"\xff.png"\n')
    with pytest.raises(InputError, match="not UTF-8"):
        read_items(tmp_path / "items.jsonl")


def test_resolving_items_checks_presence_size_and_links(tmp_path):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.png").write_bytes(b"12345")
    (tmp_path / "secret.png").write_bytes(b"s")
    os.symlink(tmp_path / "secret.png", root / "a" / "out.png")
    os.symlink(root / "a" / "x.png", root / "a" / "in.png")
    items = [Item("a/x.png", 5), Item("a/x.png", 4), Item("a/gone.png"), Item("a/out.png", 1), Item("a/in.png", 5)]
    assert resolve_items(root, items, [0, 4]) == [(root / "a" / "x.png").resolve()] * 2
    with pytest.raises(InputError, match="sample id 1: item 'a/x.png' .* has 5 bytes but 4 were recorded"):
        resolve_items(root, items, [0, 1])
    with pytest.raises(InputError, match="sample id 2: item 'a/gone.png' is not found"):
        resolve_items(root, items, [2])
    with pytest.raises(InputError, match="sample id 3: item 'a/out.png' is a link leading outside"):
        resolve_items(root, items, [3])


# --------------------------------------------------------------------------- feature-set hardening


@pytest.fixture
def small_feature_set(tmp_path):
    directory = tmp_path / "fs"
    directory.mkdir()
    np.save(directory / "feats.npy", np.ones((5, 3), np.float32))
    sidecar = {"format": "dqkernels.features", "count": 5, "files": {"features": "feats.npy"},
               "source": {"path": str(tmp_path / "images"), "kind": "image-folder"}}
    (directory / "features.json").write_text(json.dumps(sidecar))
    return directory, sidecar


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("files"), "no 'files' object"),
    (lambda s: s.update(files=["feats.npy"]), "no 'files' object"),
    (lambda s: s.update(files={"features": 3}), "non-empty string"),
    (lambda s: s.update(files={"features": "../feats.npy"}), "'..' component"),
    (lambda s: s.update(files={"features": "/etc/passwd"}), "is absolute"),
    (lambda s: s.update(files={"labels": "labels.npy"}), "names neither"),
    (lambda s: s.update(count="5"), "'count' must be"),
    (lambda s: s.update(count=6), "records 6 rows but its arrays have 5"),
    (lambda s: s.update(source="images"), "'source' must be an object"),
    (lambda s: s["source"].update(classes="abc"), "list of class names"),
    (lambda s: s.update(skipped=[]), "'skipped' must be"),
])
def test_malformed_sidecars_are_one_input_error(small_feature_set, change, message):
    directory, sidecar = small_feature_set
    assert open_feature_set(directory).count == 5
    change(sidecar)
    (directory / "features.json").write_text(json.dumps(sidecar))
    with pytest.raises(InputError, match=message):
        open_feature_set(directory)


def test_deeply_nested_or_truncated_inputs_are_one_input_error(small_feature_set, tmp_path):
    directory, sidecar = small_feature_set
    (directory / "features.json").write_text("[" * 100000)
    with pytest.raises(InputError, match="nested too deeply"):
        open_feature_set(directory)
    (directory / "features.json").write_text(json.dumps(sidecar))

    _truncate(directory / "feats.npy", 140)
    with pytest.raises(InputError, match="is not a readable .npy file"):
        open_feature_set(directory)
    np.savez(tmp_path / "feats.npz", features=np.ones((50, 8), np.float32))
    _truncate(tmp_path / "feats.npz", 300)
    with pytest.raises(InputError, match="is not a readable .npy file"):
        open_feature_set(tmp_path / "feats.npz")
    sidecar["files"]["features"] = "feats.npz"
    shutil.copy(tmp_path / "feats.npz", directory / "feats.npz")
    (directory / "features.json").write_text(json.dumps(sidecar))
    with pytest.raises(InputError, match="is not a readable .npy file"):
        open_feature_set(directory)
    np.save(tmp_path / "ok.npy", np.ones((5, 2), np.float32))
    np.savez(tmp_path / "labels.npz", labels=np.zeros(5, np.int64))
    _truncate(tmp_path / "labels.npz", 100)
    with pytest.raises(InputError, match="labels .* is not a readable"):
        open_feature_set(tmp_path / "ok.npy", labels=tmp_path / "labels.npz")

    result = invoke(["bin", "--features", tmp_path / "feats.npz", "--bins", 2])
    assert result.exit_code == 1 and result.stderr.startswith("Error: ") and len(result.stderr.splitlines()) == 1


def test_items_must_match_the_feature_set(small_feature_set):
    directory, sidecar = small_feature_set
    sidecar["files"]["items"] = "items.jsonl"
    write_items(directory / "items.jsonl", [Item(f"a/{k}.png", 1) for k in range(4)])
    with pytest.raises(InputError, match="has 5 rows but its items file lists 4 items"):
        read_feature_items(directory / "features.json", sidecar)
    (directory / "items.jsonl").write_text("{not json\n")
    with pytest.raises(InputError, match="line 1: not a JSON item"):
        read_feature_items(directory / "features.json", sidecar)


# --------------------------------------------------------------------------- consumers resolve by path


def test_extraction_skips_the_unreadable_image_and_records_items_with_sizes(extracted):
    sidecar = read_sidecar(extracted.features / "features.json")
    readable = [path for path in FOLDER_FILES if path != BROKEN]
    assert [item.path for item in extracted.items] == readable and sidecar["count"] == len(readable)
    assert [item.size for item in extracted.items] == [(extracted.root / p).stat().st_size for p in readable]
    assert BROKEN in json.dumps(sidecar["skipped"])


def _names(dataset, positions):
    return [os.path.relpath(dataset.samples[p][0], dataset.root).replace(os.sep, "/") for p in positions]


def test_dqsubset_finds_the_right_images_in_a_torchvision_image_folder(extracted):
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(extracted.root))
    assert len(dataset) == len(extracted.items) + 1  # torchvision lists the unreadable image too
    subset = DQSubset(dataset, extracted.subset)
    expected = [extracted.items[row].path for row in extracted.ids]
    assert _names(dataset, subset.positions) == expected
    assert subset.positions.tolist() != extracted.ids.tolist()  # positions alone would be wrong
    image, label = subset[0]
    assert dataset.classes[label] == expected[0].split("/")[0]
    with Image.open(extracted.root / expected[0]) as original:
        assert np.array_equal(np.asarray(image), np.asarray(original.convert("RGB")))

    every_row = DQSubset(dataset, np.arange(len(extracted.items)), features=extracted.features)
    assert _names(dataset, every_row.positions) == [item.path for item in extracted.items]


def test_export_and_quantize_selection_name_the_right_images(extracted, tmp_path):
    expected = [extracted.items[row].path for row in extracted.ids]
    dest = pipeline.export_subset(
        extracted.ids, tmp_path / "export", features_sidecar=extracted.features / "features.json",
        bins_file=extracted.features / "bins.npz",
    )
    exported = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*.png"))
    assert exported == sorted(expected)
    for relative in exported:
        assert filecmp.cmp(dest / relative, extracted.root / relative, shallow=False)

    samples = select_samples(extracted.root, extracted.subset)
    assert samples.items == expected and samples.sample_ids.tolist() == extracted.ids.tolist()
    assert samples.features_sidecar == extracted.features / "features.json"


def test_ids_resolve_by_path_after_a_class_folder_is_added(extracted, tmp_path):
    from torchvision.datasets import ImageFolder

    root = shutil.copytree(extracted.root, tmp_path / "images")
    _png(root / "0_new" / "n1.png", 100)  # a class sorting first: every later position shifts
    _png(root / "b" / "0_new.png", 101)
    expected = [extracted.items[row].path for row in extracted.ids]

    dataset = ImageFolder(str(root))
    assert _names(dataset, DQSubset(dataset, extracted.subset).positions) == expected
    dest = pipeline.export_subset(extracted.ids, tmp_path / "export", source=root,
                                  features_sidecar=extracted.features / "features.json")
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*.png")) == sorted(expected)
    assert select_samples(root, extracted.subset).items == expected


def test_a_missing_or_changed_image_is_named(extracted, tmp_path):
    from torchvision.datasets import ImageFolder

    sidecar = extracted.features / "features.json"
    first = extracted.items[extracted.ids[0]].path
    root = shutil.copytree(extracted.root, tmp_path / "images")
    (root / first).unlink()
    with pytest.raises(InputError, match=f"subset id {extracted.ids[0]}: item '{first}' is not among"):
        DQSubset(ImageFolder(str(root)), extracted.subset)
    with pytest.raises(InputError, match=f"sample id {extracted.ids[0]}: item '{first}' is not found"):
        pipeline.export_subset(extracted.ids, tmp_path / "export", source=root, features_sidecar=sidecar)
    with pytest.raises(InputError, match=f"item '{first}' is not found"):
        select_samples(root, extracted.subset)
    assert not (tmp_path / "export").exists()

    _png(root / first, 7, size=24)  # same name, other content and size
    with pytest.raises(InputError, match=f"item '{first}' .* bytes but .* were recorded"):
        DQSubset(ImageFolder(str(root)), extracted.subset)
    with pytest.raises(InputError, match=f"item '{first}' .* bytes but .* were recorded"):
        pipeline.export_subset(extracted.ids, tmp_path / "export", source=root, features_sidecar=sidecar)


def test_datasets_without_paths_are_matched_by_position_only_when_the_counts_agree(extracted):
    import torch
    from torch.utils.data import TensorDataset

    rows = len(extracted.items)
    subset = DQSubset(TensorDataset(torch.arange(rows)), extracted.subset)
    assert subset.positions.tolist() == extracted.ids.tolist()
    with pytest.raises(InputError, match=f"has {rows} rows but the dataset has {rows + 1}"):
        DQSubset(TensorDataset(torch.arange(rows + 1)), extracted.subset)
    assert len(DQSubset(TensorDataset(torch.arange(rows + 1)), extracted.subset, positional=True)) == len(subset)


def test_quantize_follows_the_recorded_items_after_the_feature_folder_moved(extracted, tmp_path):
    from dqkernels.pixel.patch_store import PatchStore

    subset_path = _copy_features(extracted, tmp_path / "feats")
    ids = np.load(subset_path)
    moved = tmp_path / "feats-moved"
    os.rename(tmp_path / "feats", moved)
    quantize = ["quantize", "--images", extracted.root, "--img-size", 28, "--grid", 14, "--drop", 0.5,
                "--device", "cpu"]
    _ok([*quantize, "--subset", moved / "subset.npy", "-o", tmp_path / "patches"])
    store = PatchStore(tmp_path / "patches")
    assert store.sample_ids.tolist() == ids.tolist()
    assert store.items == [extracted.items[row].path for row in ids]
    assert store.header["source"]["features_sidecar"] == str((moved / "features.json").resolve())

    # The subset alone, moved away from its feature set: an error, then the feature set given.
    os.rename(moved / "subset.npy", tmp_path / "subset.npy")
    os.rename(moved / "subset.json", tmp_path / "subset.json")
    result = invoke([*quantize, "--subset", tmp_path / "subset.npy", "-o", tmp_path / "p2"])
    assert result.exit_code == 1 and "no longer exists; give the feature set" in result.stderr
    assert not (tmp_path / "p2").exists()
    _ok([*quantize, "--subset", tmp_path / "subset.npy", "--features", moved, "-o", tmp_path / "p2"])
    assert PatchStore(tmp_path / "p2").items == store.items


def test_a_moved_subset_is_not_tied_to_a_feature_set_of_another_size(extracted, tmp_path):
    subset_path = _copy_features(extracted, tmp_path / "feats")
    os.rename(tmp_path / "feats", tmp_path / "moved")
    sidecar = json.loads((tmp_path / "moved" / "features.json").read_text())
    sidecar["count"] = 99
    (tmp_path / "moved" / "features.json").write_text(json.dumps(sidecar))
    with pytest.raises(InputError, match="no longer exists"):
        id_origin(tmp_path / "moved" / subset_path.name)


# --------------------------------------------------------------------------- export: paths and manifest


def _evil_feature_set(extracted, tmp_path, evil: Item) -> Path:
    """A copy of the feature set whose first item is ``evil``, with bins of its own."""
    features = tmp_path / "feats"
    shutil.copytree(extracted.features, features, ignore=shutil.ignore_patterns("bins.*", "subset.*"))
    lines = [{"path": item.path, "size": item.size} for item in [evil, *extracted.items[1:]]]
    (features / "items.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    # A crafted set is consistent with itself: its sidecar records the crafted file's size.
    sidecar = json.loads((features / "features.json").read_text())
    if "integrity" in sidecar:
        sidecar["integrity"]["items.jsonl"]["size"] = (features / "items.jsonl").stat().st_size
        (features / "features.json").write_text(json.dumps(sidecar))
    pipeline.make_bins(features, 2)
    return features


@pytest.mark.parametrize("link", [False, True])
@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_export_refuses_items_leaving_the_root(extracted, tmp_path, kind, link):
    root = shutil.copytree(extracted.root, tmp_path / "images")
    outside = tmp_path / "outside"
    outside.mkdir()
    _png(outside / "pwn.png", 5)
    size = (outside / "pwn.png").stat().st_size
    if kind == "symlink":
        os.symlink(outside / "pwn.png", root / "a" / "evil.png")
    evil = {"dotdot": Item("../outside/pwn.png", size), "absolute": Item(str(outside / "pwn.png"), size),
            "symlink": Item("a/evil.png", size)}[kind]
    features = _evil_feature_set(extracted, tmp_path, evil)
    before = snapshot_files(tmp_path)
    folders = sorted(p for p in tmp_path.rglob("*") if p.is_dir())

    result = invoke(["sample", "--bins", features / "bins.npz", "--ratio", 1, "--source", root,
                     "--export", tmp_path / "out" / "ex", *(["--link"] if link else [])])
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("Error: ") and len(result.stderr.splitlines()) == 1
    assert {"dotdot": "'..' component", "absolute": "is absolute", "symlink": "link leading outside"}[kind] \
        in result.stderr
    assert snapshot_files(tmp_path) == before and sorted(p for p in tmp_path.rglob("*") if p.is_dir()) == folders


@pytest.mark.parametrize("link", [False, True])
def test_export_manifest_ties_every_file_to_its_id_bin_and_class(extracted, tmp_path, link):
    bins = dqkernels.load_bins(extracted.features / "bins.npz")
    classes = read_sidecar(extracted.features / "features.json")["source"]["classes"]
    dest = pipeline.export_subset(
        extracted.ids, tmp_path / "export", features_sidecar=extracted.features / "features.json",
        bins_file=extracted.features / "bins.npz", link=link,
    )
    manifest = read_export_manifest(dest)
    assert manifest["kind"] == "image-folder" and manifest["link"] is link
    assert manifest["source"] == str(extracted.root.resolve())
    assert manifest["bins_file"] == str((extracted.features / "bins.npz").resolve())
    assert manifest["count"] == len(extracted.ids)
    expected = []
    for row in extracted.ids.tolist():
        item = extracted.items[row]
        class_name = item.path.split("/")[0]
        expected.append({"id": row, "path": item.path, "size": item.size, "class": class_name,
                         "label": classes.index(class_name), "bin": int(bins.bin_of[row])})
    assert manifest["samples"] == expected
    for record in manifest["samples"]:
        target = dest / record["path"]
        assert target.is_symlink() is link
        if link:
            assert os.readlink(target) == str((extracted.root / record["path"]).resolve())
        assert filecmp.cmp(target, extracted.root / record["path"], shallow=False)
    assert sorted(p.name for p in dest.iterdir() if p.is_file()) == [EXPORT_MANIFEST]


def test_export_of_features_without_items_needs_the_row_count_of_the_folder(extracted, tmp_path):
    listing = list_image_folder(extracted.root)
    for rows in (len(listing.relative_paths) - 1, len(listing.relative_paths)):
        features = np.random.default_rng(rows).standard_normal((rows, 4))
        dqkernels.graphcut_bins(features, bins=2).save(tmp_path / f"bins{rows}.npz")
    ids = np.array([0, 3, 5])
    with pytest.raises(InputError, match="record no items"):
        pipeline.export_subset(ids, tmp_path / "a", source=extracted.root)
    with pytest.raises(InputError, match="record no items, so their 11 rows"):
        pipeline.export_subset(ids, tmp_path / "a", source=extracted.root, bins_file=tmp_path / "bins11.npz")
    dest = pipeline.export_subset(ids[1:], tmp_path / "a", source=extracted.root, bins_file=tmp_path / "bins12.npz")
    assert [record["path"] for record in read_export_manifest(dest)["samples"]] == [FOLDER_FILES[3], FOLDER_FILES[5]]
