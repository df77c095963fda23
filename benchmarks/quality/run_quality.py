"""Does DQ (or DQ-V2) pick better training subsets than a GraphCut coreset or random sampling?

    python benchmarks/quality/run_quality.py

scikit-learn's digits (1 797 images, 8×8) are split once into a stratified train split (70%)
and a held-out test split (30%, never selected from). At every keep ratio and seed, three
subsets of the train split with identical per-class counts are selected — DQ (10 per-class
GraphCut bins, the ratio of every (bin, class) cell drawn at random), a GraphCut coreset (one
greedy GraphCut selection of each class's whole budget) and stratified uniform random — and the
same small CNN is trained from scratch on each and scored on the test split. A fourth subset,
DQ-V2, has the same total size and is drawn the same way from a larger pool: the train split
plus half as many Tobias background-swap images of it (docs/method.md §5, built once). DQ here never
reconstructs patches, so "DQ" is DQ without MAE. The seed drives the sampling, the CNN's
initial weights and its mini-batch order; runs are deterministic given it. Writes every raw
number to ``--out`` (JSON) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from datetime import datetime, timezone

import numpy as np
import sklearn
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import dqkernels

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import selection
import training

TEST_FRACTION = 0.3
SPLIT_SEED = 0
N_BINS = 10
# The CNN whose penultimate features are binned with --features cnn (trained on the whole
# train split, as DQ bins on the features of a model trained on the full data).
FEATURE_MODEL_SEED = 0
METHODS = ("DQ", "GraphCut coreset", "random", "DQ-V2")
# The DQ-V2 pool, built once: round(0.5·M) Tobias images of the train split, 4×4 grid swapped at
# the digits' own 8×8 pixels (2 px cells), masks from the seeded random ResNet-50 at 224 px.
V2_POOL = {"mix": 0.5, "grid": 4, "cell_px": 2, "bg_prob": 1.0, "mask_px": 224, "seed": 0}
FULL = "full train set"
FEATURE_CHOICES = {
    "pixels": "raw pixels scaled to [0, 1] (64-d), cosine metric",
    "cnn": (
        "penultimate features (512-d) of the benchmark CNN trained on the whole train split "
        f"(seed {FEATURE_MODEL_SEED}, same training protocol), cosine metric"
    ),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per cell (default 5)")
    parser.add_argument(
        "--ratios",
        default="0.05,0.1,0.2,0.3,0.5",
        help="comma-separated keep ratios in (0, 1) (default 0.05,0.1,0.2,0.3,0.5)",
    )
    parser.add_argument("--epochs", type=int, default=training.TrainConfig.epochs)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument(
        "--features",
        choices=sorted(FEATURE_CHOICES),
        default="pixels",
        help="features to select in (default pixels)",
    )
    parser.add_argument(
        "--v2-mask-px",
        type=int,
        default=V2_POOL["mask_px"],
        help=f"input side of the DQ-V2 mask model in pixels (default {V2_POOL['mask_px']}, as Tobias)",
    )
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.json"),
        help="JSON file for all raw numbers (default results.json beside this script)",
    )
    args = parser.parse_args(argv)
    args.ratios = [float(r) for r in args.ratios.split(",")]
    if not all(0 < r < 1 for r in args.ratios):
        parser.error("--ratios must lie in (0, 1)")
    if args.v2_mask_px < 32:
        parser.error("--v2-mask-px must be >= 32")
    if args.seeds < 1 or args.epochs < 1:
        parser.error("--seeds and --epochs must be >= 1")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        parser.error("--device must be cpu or cuda")
    return args


def load_split() -> dict:
    """Train/test split of digits: pixels (N, 64) float64 in [0, 1], labels (N,) int64."""
    digits = load_digits()
    pixels = digits.data.astype(np.float64) / 16.0
    labels = digits.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        pixels, labels, test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


def digest(indices: np.ndarray) -> str:
    """Short checksum of a subset's sorted int64 ids, to compare subsets across runs."""
    return hashlib.blake2b(indices.astype(np.int64).tobytes(), digest_size=8).hexdigest()


def run(args: argparse.Namespace) -> dict:
    """Select, train and score every (method, ratio, seed); returns the results document."""
    started = time.perf_counter()
    training.make_deterministic(args.device)
    config = training.TrainConfig(epochs=args.epochs, device=args.device)
    data = load_split()
    train_y, classes = data["train_y"], np.unique(data["train_y"])
    train_images = training.as_image_tensor(data["train_x"], args.device)
    test_images = training.as_image_tensor(data["test_x"], args.device)
    train_labels = torch.as_tensor(train_y, device=args.device)
    test_labels = torch.as_tensor(data["test_y"], device=args.device)

    if args.features == "pixels":
        features = data["train_x"]
    else:
        feature_model = training.train_model(
            train_images, train_labels, FEATURE_MODEL_SEED, config
        )
        features = training.penultimate_features(feature_model, train_images)
    unit_features = selection.unit_rows(features)
    bins = selection.dq_bins(features, train_y, N_BINS)

    pool_started = time.perf_counter()
    v2_pool = dict(V2_POOL, mask_px=args.v2_mask_px)
    pool = selection.tobias_pool(data["train_x"], train_y, **v2_pool, device=args.device)
    pool_images = training.as_image_tensor(pool.pixels, args.device)
    pool_labels = torch.as_tensor(pool.labels, device=args.device)
    pool_features = (
        pool.pixels if args.features == "pixels"
        else training.penultimate_features(feature_model, pool_images)
    )
    unit_pool = selection.unit_rows(pool_features)
    pool_bins = selection.dq_bins(pool_features, pool.labels, N_BINS)
    train_rows = np.arange(len(train_y))
    pool_seconds = round(time.perf_counter() - pool_started, 1)
    print(f"DQ-V2 pool: {len(train_y)} + {len(pool.recipes)} Tobias images ({pool_seconds} s)",
          file=sys.stderr)

    runs = []

    def train_and_score(method: str, ratio: float, seed: int, indices: np.ndarray) -> None:
        if method == "DQ-V2":  # ids into the pool; coverage is of the train split
            images, labels, label_array = pool_images, pool_labels, pool.labels
            mean_pairwise, coverage = selection.diversity(unit_pool, indices, covered=train_rows)
        else:
            images, labels, label_array = train_images, train_labels, train_y
            mean_pairwise, coverage = selection.diversity(unit_features, indices)
        model = training.train_model(images[indices], labels[indices], seed, config)
        record = {
            "method": method,
            "ratio": ratio,
            "seed": seed,
            "n_selected": len(indices),
            "class_counts": selection.class_counts(indices, label_array, classes).tolist(),
            "subset_digest": digest(indices),
            "test_accuracy": training.accuracy(model, test_images, test_labels),
            "train_accuracy": training.accuracy(model, images[indices], labels[indices]),
            "mean_pairwise_distance": mean_pairwise,
            "coverage": coverage,
        }
        if method == "DQ-V2":
            record["n_tobias"] = int((indices >= len(train_y)).sum())
        runs.append(record)
        print(
            f"{method:>16} ratio {ratio:<5} seed {seed}: test {record['test_accuracy']:.4f} "
            f"(n={record['n_selected']})",
            file=sys.stderr,
        )

    coresets = {}
    for ratio in args.ratios:
        for seed in range(args.seeds):
            dq = selection.select_dq(bins, ratio, seed)
            budgets = selection.class_counts(dq, train_y, classes)
            key = (ratio, tuple(budgets.tolist()))
            if key not in coresets:
                coresets[key] = selection.select_graphcut_coreset(
                    features, train_y, classes, budgets
                )
            subsets = {
                "DQ": dq,
                "GraphCut coreset": coresets[key],
                "random": selection.select_random(train_y, classes, budgets, seed),
                "DQ-V2": selection.select_dq_v2(pool_bins, len(dq), seed),
            }
            for method in METHODS:
                train_and_score(method, ratio, seed, subsets[method])
    everything = np.arange(len(train_y), dtype=np.int64)
    for seed in range(args.seeds):
        train_and_score(FULL, 1.0, seed, everything)

    return {
        "config": {
            "dataset": "sklearn.datasets.load_digits (1797 images, 8x8, 10 classes)",
            "split": {
                "test_fraction": TEST_FRACTION,
                "stratified": True,
                "seed": SPLIT_SEED,
                "n_train": len(train_y),
                "n_test": len(data["test_y"]),
            },
            "selection_features": args.features,
            "selection_features_description": FEATURE_CHOICES[args.features],
            "diversity_space": "euclidean distance between L2-normalised selection features",
            "dq": {"bins": N_BINS, "per_class": True, "metric": "cosine", "lam": 1.0,
                   "sizes": "split", "allocation": "exact"},
            "per_class_counts": "DQ's exact allocation; coreset and random use the same counts",
            "dq_v2": {
                **v2_pool,
                "mask_model": "random-init timm resnet50 (zero_init_last=False), eval mode",
                "pool_size": len(pool.labels),
                "swapped": int(pool.recipes.swapped.sum()),
                "pool_seconds": pool_seconds,
                "bins": "as dq, on the pool's selection features (Tobias pixels / CNN features)",
                "budget": "same total as DQ at that ratio and seed: ratio n_DQ/|pool| of every "
                          "(bin, class) cell of the pool, exact allocation; its own per-class counts",
                "coverage": "over the train split, nearest selected pool sample",
            },
            "ratios": args.ratios,
            "seeds": list(range(args.seeds)),
            "model": "SmallCNN: conv3x3(1->16) ReLU conv3x3(16->32) ReLU maxpool2 linear(512->10)",
            "training": config.as_dict(),
            "deterministic": "torch.manual_seed(seed), use_deterministic_algorithms, 1 thread",
        },
        "versions": {
            "dqkernels": dqkernels.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "scikit-learn": sklearn.__version__,
        },
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "runtime_seconds": round(time.perf_counter() - started, 1),
        "runs": runs,
    }


def _mean_std(values) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def summarise(results: dict) -> list:
    """One row per (ratio, method): accuracy mean/std, paired difference to random (same seed:
    same initial weights and batch order), in how many seeds it is higher/equal/lower than
    random, and the mean over seeds of the diversity measures."""
    by_cell = {}
    for record in results["runs"]:
        by_cell.setdefault((record["ratio"], record["method"]), {})[record["seed"]] = record
    rows = []
    for (ratio, method), per_seed in by_cell.items():
        seeds = sorted(per_seed)
        accuracy = [per_seed[s]["test_accuracy"] for s in seeds]
        random_cell = by_cell.get((ratio, "random"))
        paired = (
            [per_seed[s]["test_accuracy"] - random_cell[s]["test_accuracy"] for s in seeds]
            if random_cell is not None and method != "random"
            else None
        )
        rows.append({
            "ratio": ratio,
            "method": method,
            "n_seeds": len(seeds),
            "n_selected": per_seed[seeds[0]]["n_selected"],
            "accuracy": _mean_std(accuracy),
            "paired_vs_random": _mean_std(paired) if paired else None,
            "higher_equal_lower_than_random": (
                [sum(d > 0 for d in paired), sum(d == 0 for d in paired),
                 sum(d < 0 for d in paired)]
                if paired
                else None
            ),
            "mean_pairwise_distance": _mean_std(
                [per_seed[s]["mean_pairwise_distance"] for s in seeds])[0],
            "coverage": _mean_std([per_seed[s]["coverage"] for s in seeds])[0],
        })
    return rows


def markdown_table(results: dict) -> str:
    """The summary as a markdown table (accuracy in %, std over seeds with ddof=1)."""
    config = results["config"]
    lines = [
        (
            f"Selection features: {config['selection_features_description']}. "
            f"{config['split']['n_train']} train / {config['split']['n_test']} test images; "
            f"{config['training']['epochs']} epochs; mean ± std over seeds."
        ),
        "",
        (
            "| keep ratio | method | n | test acc. % | Δ vs random (paired), pts "
            "| seeds higher/equal/lower | mean pairwise dist. | coverage (lower better) |"
        ),
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summarise(results):
        mean, std = row["accuracy"]
        if row["paired_vs_random"] is None:
            paired = higher = "–"
        else:
            paired_mean, paired_std = row["paired_vs_random"]
            paired = f"{100 * paired_mean:+.2f} ± {100 * paired_std:.2f}"
            higher = "/".join(str(n) for n in row["higher_equal_lower_than_random"])
        lines.append(
            f"| {row['ratio']:.0%} | {row['method']} | {row['n_selected']} "
            f"| {100 * mean:.2f} ± {100 * std:.2f} ({row['n_seeds']}) | {paired} | {higher} "
            f"| {row['mean_pairwise_distance']:.4f} | {row['coverage']:.4f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    results = run(args)
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=1)
    print(markdown_table(results))
    print(f"\n{len(results['runs'])} training runs in {results['runtime_seconds']} s; "
          f"raw numbers in {os.path.basename(args.out)}")


if __name__ == "__main__":
    main()
