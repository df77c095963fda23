"""The ``dqk report`` page: one self-contained HTML file drawn from :mod:`dqkernels.pipeline.report`.

Every picture is a matplotlib PNG embedded as a ``data:`` URI and the style sheet is inline, so
the page opens from disk with no server and no network. Sections, top to bottom: what was read,
warnings, a 2-D PCA projection of all samples against the selected ones (coloured by bin), the
bins × classes table of totals and selected counts, thumbnails (images) or example records
(text) per bin, a few patch-store images with their dropped patches greyed, and DQ-V2 Tobias
images beside their originals.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from dqkernels.core.atomic import atomic_output
from dqkernels.core.errors import InputError
from dqkernels.core.paths import refuse_overlap
from dqkernels.pipeline.report import (
    BinClassTable,
    GatheredOutputs,
    bin_class_table,
    gather_outputs,
    image_rows_source,
    project_2d,
    random_init_description,
    report_warnings,
)

THUMB_PIXELS = 96
RECORD_CHARS = 240
GREY = 150
PAGE_START = "<!DOCTYPE html>\n<!-- dqk report -->\n"
FRAME = 4
PICKED_FRAME = (0.10, 0.62, 0.18)
OTHER_FRAME = (0.80, 0.80, 0.80)


@dataclass
class ReportOutcome:
    """A written page: its path, the warnings it shows and how many images it embeds."""

    path: Path
    warnings: list
    images: int


def write_report(paths, out: str | os.PathLike, *, max_points: int = 20000, thumbnails: int = 8,
                 seed: int = 0) -> ReportOutcome:
    """Write the report on ``paths`` (see :func:`dqkernels.pipeline.report.gather_outputs`) to ``out``.

    max_points: at most this many samples (and this many selected ones) are projected and drawn.
    thumbnails: images or records shown per bin (and patch-store / Tobias images).
    seed: which samples are drawn when there are more than shown. The page replaces ``out``
    in one rename; ``out`` must not be any file the report reads.
    """
    for name, value, low in (("max_points", max_points, 10), ("thumbnails", thumbnails, 0), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError("dqk report draws with matplotlib; install it (pip install 'dqkernels[cli]')") from None
    out = Path(out)
    if out.is_dir():
        raise InputError(f"report output {str(out)!r} is a directory; give an .html file name")
    gathered = gather_outputs(paths)
    inputs = {f"input {p!s}": p for p in [*paths, *gathered.read_files]}
    refuse_overlap(inputs, {"--out": out}, shallow=set(inputs))
    if out.is_file() and not _is_report(out):
        raise InputError(f"report output {str(out)!r} exists and is not a dqk report; it is left as it is")
    page = _Page(gathered, max_points=max_points, thumbnails=thumbnails, seed=seed)
    document = page.render()
    with atomic_output(out) as handle:
        handle.write(document.encode("utf-8"))
    return ReportOutcome(out, page.warnings, page.images)


def _is_report(path: Path) -> bool:
    """Whether ``path`` starts like a page this module writes (so replacing it loses nothing)."""
    with open(path, "rb") as handle:
        return handle.read(len(PAGE_START)) == PAGE_START.encode("ascii")


def _escape(value) -> str:
    return html.escape(str(value), quote=True)


def _bin_colors(count: int) -> np.ndarray:
    """(count, 4) RGBA colours, distinct for up to 20 bins."""
    from matplotlib import colormaps

    if count <= 10:
        return colormaps["tab10"](np.arange(count))
    if count <= 20:
        return colormaps["tab20"](np.arange(count))
    return colormaps["turbo"](np.linspace(0.05, 0.95, count))


def _as_display(image: np.ndarray) -> np.ndarray:
    """An (H, W[, C]) uint8 or float image as uint8 RGB for drawing."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.dtype != np.uint8:
        scale = 255.0 if float(np.nanmax(image, initial=0.0)) <= 1.0 else 1.0
        image = np.clip(np.nan_to_num(image.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return image


class _Samples:
    """Images or records of sample ids, read on demand from the input the outputs record."""

    def __init__(self, gathered: GatheredOutputs):
        self.gathered = gathered
        self.kind = None  # "image" or "text"
        self._folder = self._array = self._records = None
        self._tobias = {}  # v2 pool id → its exported file (folder) or (exported array, row)
        self._exported = None  # the exported array of a v2 run on an image array, once read
        self.v2_originals = None
        if gathered.v2 is not None:
            self._open_v2(gathered)
            return
        source = image_rows_source(gathered)
        if source is None:
            return
        what, path, items = source
        if what == "folder":
            self.kind, self._folder = "image", (Path(path).resolve(), items)
        elif what == "array":
            from dqkernels.features.image import load_image_array

            self.kind, self._array = "image", load_image_array(path)[0]
        else:
            from dqkernels.features.text import read_instruction_records

            self.kind, self._records = "text", read_instruction_records(path).records

    def _open_v2(self, gathered: GatheredOutputs) -> None:
        from dqkernels.features.image import list_image_folder, load_image_array
        from dqkernels.formats.items import Item

        summary = gathered.v2
        source = Path(summary["input"]["path"])
        self.v2_originals = int(summary["pool"]["originals"])
        self.kind = "image"
        if not source.exists():
            gathered.notes.append(f"the DQ-V2 input {str(source)!r} no longer exists, so only exported "
                                  "Tobias images are shown")
        elif summary["input"]["kind"] == "image-folder":
            listing = list_image_folder(source)
            self._folder = (source.resolve(), [Item(path) for path in listing.relative_paths])
        else:
            self._array = load_image_array(source)[0]
        directory = Path(self.gathered.paths["v2"])
        self.v2_items = []
        items_path = directory / "subset_items.jsonl"
        if items_path.is_file():
            self.v2_items = [json.loads(line) for line in items_path.read_text(encoding="utf-8").splitlines() if line]
        exported_array = directory / "subset" / source.name
        for item in self.v2_items:
            if item.get("kind") != "tobias":
                continue
            if "file" in item:
                self._tobias[item["pool_id"]] = directory / "subset" / item["file"]
            elif exported_array.is_file():
                self._tobias[item["pool_id"]] = (exported_array, item["row"])

    def available(self, row: int) -> bool:
        """Whether ``row`` can be shown (a Tobias image only when it was exported)."""
        if self.v2_originals is not None and row >= self.v2_originals:
            return row in self._tobias
        return self._folder is not None or self._array is not None or self._records is not None

    def image(self, row: int) -> Optional[np.ndarray]:
        """(h, w, 3) uint8 thumbnail of sample ``row``, or None when it cannot be read."""
        if self.v2_originals is not None and row >= self.v2_originals:
            where = self._tobias.get(row)
            if isinstance(where, tuple):
                from dqkernels.features.image import load_image_array

                if self._exported is None:
                    self._exported = load_image_array(where[0])[0]
                return self._thumbnail(self._exported[where[1]])
            return self._file_thumbnail(where) if where is not None else None
        if self._array is not None:
            return self._thumbnail(self._array[row])
        if self._folder is not None:
            from dqkernels.formats.items import resolve_item

            root, items = self._folder
            try:
                return self._file_thumbnail(resolve_item(root, items[row], f"sample id {row}"))
            except InputError as error:
                self.gathered.notes.append(f"thumbnail of sample {row} not shown: {error}")
        return None

    def record(self, row: int) -> Optional[dict]:
        return self._records[row] if self._records is not None else None

    @staticmethod
    def _thumbnail(array: np.ndarray) -> np.ndarray:
        image = _as_display(array)
        step = max(1, max(image.shape[:2]) // (2 * THUMB_PIXELS))
        return image[::step, ::step]

    @staticmethod
    def _file_thumbnail(path: Path) -> Optional[np.ndarray]:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
                image.thumbnail((2 * THUMB_PIXELS, 2 * THUMB_PIXELS))
                return np.asarray(image)
        except (OSError, UnidentifiedImageError):
            return None


class _Page:
    """Builds the page's sections from the gathered outputs."""

    def __init__(self, gathered: GatheredOutputs, *, max_points: int, thumbnails: int, seed: int):
        self.gathered = gathered
        self.max_points, self.thumbnails, self.seed = max_points, thumbnails, seed
        self.table = bin_class_table(gathered)
        self.ratio = None  # the subset's share of the samples, when a subset is known
        if gathered.manifest is not None and isinstance(gathered.manifest.get("ratio"), (int, float)):
            self.ratio = float(gathered.manifest["ratio"])
        elif gathered.selected is not None and gathered.count:
            self.ratio = gathered.selected.size / gathered.count
        self.images = 0
        self.warnings: list = []

    def figure(self, width: float, height: float):
        from matplotlib.figure import Figure

        return Figure(figsize=(width, height), dpi=100)

    def embed(self, figure, alt: str) -> str:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", bbox_inches="tight")
        self.images += 1
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        return f'<img class="figure" alt="{_escape(alt)}" src="data:image/png;base64,{data}">'

    # ------------------------------------------------------------------ whole page

    def render(self) -> str:
        samples = _Samples(self.gathered) if self.thumbnails else None
        body = [self.projection(), self.table_section(),
                self.examples(samples) if samples is not None else "",
                self.patch_section(samples), self.v2_section(samples)]
        self.warnings = report_warnings(self.gathered, self.table)
        warnings = "".join(f"<li>{_escape(line)}</li>" for line in self.warnings)
        warning_box = (f'<section class="warnings"><h2>Warnings ({len(self.warnings)})</h2><ul>{warnings}</ul></section>'
                       if self.warnings else '<section class="ok"><h2>Warnings</h2><p>None.</p></section>')
        return (
            f"{PAGE_START}<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>dqk report</title><style>{_STYLE}</style></head><body>"
            f"<h1>dqk report</h1>{self.summary()}{warning_box}{''.join(body)}</body></html>\n"
        )

    def summary(self) -> str:
        gathered, rows = self.gathered, []
        for kind, path in gathered.paths.items():
            rows.append((kind, str(path)))
        count = gathered.count
        rows.append(("samples", "unknown" if count is None else str(count)))
        if self.table is not None:
            rows.append(("bins", str(len([b for b in self.table.bins if b is not None]) or "none")))
            classes = [c for c in self.table.classes if c is not None]
            rows.append(("classes", str(len(classes)) if classes else "none (bins over all samples)"))
        if gathered.selected is not None:
            share = f" ({gathered.selected.size / count:.1%})" if count else ""
            rows.append(("selected", f"{gathered.selected.size}{share}"))
        if gathered.manifest is not None:
            rows.append(("sampling", ", ".join(f"{key} {gathered.manifest.get(key)}"
                                               for key in ("ratio", "seed", "allocation"))))
        sidecar = gathered.sidecar
        if sidecar is not None:
            weights = random_init_description(sidecar)
            model = f"{sidecar.get('model')}, " + ("RANDOM-INIT" if weights else f"weights {sidecar.get('checkpoint')}")
            dims = ", ".join(f"{name} {width}-d" for name, width in (sidecar.get("dims") or {}).items())
            rows.append(("features", f"{model}; {sidecar.get('mode')} mode; {dims}"))
            rows.append(("input", f"{sidecar['source']['kind']} {sidecar['source']['path']}"))
        if gathered.bins is not None:
            meta = gathered.bins.meta
            rows.append(("binning", f"metric {meta.get('metric')}, per class {meta.get('per_class')}, backend "
                                    + str(gathered.bins.backend)))
        cells = "".join(f"<tr><th>{_escape(k)}</th><td>{_escape(v)}</td></tr>" for k, v in rows)
        return f'<section><table class="summary">{cells}</table></section>'

    def montage(self, rows: list):
        """One figure of image rows: rows = [(row label, [(image or None, title, frame colour)])].

        Tiles are drawn into one canvas (one axes, one image), so a page with many thumbnails
        stays quick to draw.
        """
        columns = max(len(tiles) for _, tiles in rows)
        tile = THUMB_PIXELS + 2 * FRAME
        step_x, step_y = tile + 10, tile + 22
        canvas = np.full((len(rows) * step_y, columns * step_x, 3), 255, dtype=np.uint8)
        figure = self.figure(canvas.shape[1] / 100 + 0.9, canvas.shape[0] / 100)
        axis = figure.add_axes((0.9 / (canvas.shape[1] / 100 + 0.9), 0, 1 - 0.9 / (canvas.shape[1] / 100 + 0.9), 1))
        for r, (label, tiles) in enumerate(rows):
            top = r * step_y + 18
            axis.text(-8, top + tile / 2, label, ha="right", va="center", fontsize=9)
            for c, (image, title, frame) in enumerate(tiles):
                left = c * step_x
                canvas[top:top + tile, left:left + tile] = np.asarray(np.array(frame) * 255, dtype=np.uint8)
                canvas[top + FRAME:top + FRAME + THUMB_PIXELS, left + FRAME:left + FRAME + THUMB_PIXELS] = \
                    _fit_tile(image, THUMB_PIXELS)
                axis.text(left + tile / 2, top - 3, title, ha="center", va="bottom", fontsize=7)
        axis.imshow(canvas, interpolation="nearest")
        axis.set_xlim(-0.5, canvas.shape[1] - 0.5)
        axis.set_ylim(canvas.shape[0] - 0.5, -0.5)
        axis.set_axis_off()
        return figure

    # ------------------------------------------------------------------ projection

    def projection(self) -> str:
        gathered, title = self.gathered, "<h2>2-D projection (PCA)</h2>"
        features, count = gathered.features, gathered.count
        if features is None or count is None or count < 3:
            return f"<section>{title}<p>No features were found, so there is no projection; give the feature set " \
                   "(or a run work directory) to see one.</p></section>"
        rng = np.random.default_rng(self.seed)
        shown = np.sort(rng.choice(count, size=min(count, self.max_points), replace=False))
        selected = gathered.selected if gathered.selected is not None else np.zeros(0, dtype=np.int64)
        if selected.size > self.max_points:
            selected = np.sort(rng.choice(selected, size=self.max_points, replace=False))
        rows = np.union1d(shown, selected)
        metric = (gathered.bins.meta.get("metric") if gathered.bins is not None else None) or "cosine"
        coordinates = project_2d(features, rows, shown, self.seed, normalize=metric == "cosine")
        position = {int(r): i for i, r in enumerate(rows)}
        bin_of = gathered.bins.bin_of if gathered.bins is not None else np.zeros(count, dtype=np.int64)
        n_bins = gathered.bins.n_bins if gathered.bins is not None else 1
        colours = _bin_colors(n_bins)
        tobias_from = self._tobias_start()
        figure = self.figure(13, 5.6)
        left, right = figure.subplots(1, 2, sharex=True, sharey=True)
        size = float(np.clip(3000 / max(len(shown), 1), 2, 40))
        all_xy = coordinates[[position[int(r)] for r in shown]]
        left.scatter(all_xy[:, 0], all_xy[:, 1], c=colours[bin_of[shown]], s=size, alpha=0.6, linewidths=0)
        left.set_title(f"All samples ({len(shown)} of {count} shown), coloured by bin")
        right.scatter(all_xy[:, 0], all_xy[:, 1], c="#d0d0d0", s=size, linewidths=0)
        for marker, part in (("o", selected[selected < tobias_from]), ("^", selected[selected >= tobias_from])):
            if part.size:
                xy = coordinates[[position[int(r)] for r in part]]
                right.scatter(xy[:, 0], xy[:, 1], c=colours[bin_of[part]], s=max(size * 2, 12), marker=marker,
                              edgecolors="black", linewidths=0.4)
        total = gathered.selected.size if gathered.selected is not None else 0
        right.set_title(f"Selected ({selected.size} of {total} shown" +
                        (", ▲ Tobias" if tobias_from < count else "") + ") over all (grey)")
        for axis in (left, right):
            axis.set_xlabel("PC 1")
            axis.set_ylabel("PC 2")
        if gathered.bins is not None and n_bins <= 20:
            from matplotlib.lines import Line2D

            handles = [Line2D([], [], marker="o", linestyle="", color=colours[b], label=f"bin {b}")
                       for b in range(n_bins)]
            right.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
        note = "rows scaled to unit length first (cosine bins); " if metric == "cosine" else ""
        return f"<section>{title}{self.embed(figure, 'projection')}<p class=\"note\">First two principal " \
               f"components of {len(shown)} randomly drawn samples ({note}seed {self.seed}).</p></section>"

    def _tobias_start(self) -> int:
        if self.gathered.v2 is not None:
            return int(self.gathered.v2["pool"]["originals"])
        return np.iinfo(np.int64).max

    # ------------------------------------------------------------------ table

    def table_section(self) -> str:
        table, title = self.table, "<h2>Bins × classes: selected / total</h2>"
        if table is None:
            return f"<section>{title}<p>No bins or subset were found.</p></section>"
        names = [self.gathered.class_name(c) for c in table.classes]
        bins = ["—" if b is None else f"bin {b}" for b in table.bins]
        header = "".join(f"<th>{_escape(b)}</th>" for b in bins) + "<th>total</th>"
        nonempty = table.counts[table.counts > 0]
        tiny_limit = 0.25 * float(np.median(nonempty)) if nonempty.size else 0.0
        rows = []
        for j, (value, name) in enumerate(zip(table.classes, names)):
            cells = []
            for i, bin_id in enumerate(table.bins):
                n, k = int(table.counts[i, j]), int(table.selected[i, j])
                style = "empty" if n == 0 else "miss" if self.missed(n, k) else "tiny" if n < tiny_limit else ""
                cells.append(f'<td class="cell {style}" data-bin="{_escape(bin_id)}" data-class="{_escape(value)}" '
                             f'data-selected="{k}" data-count="{n}">{k} / {n}</td>')
            cells.append(f'<td class="total">{int(table.selected[:, j].sum())} / {int(table.counts[:, j].sum())}</td>')
            rows.append(f"<tr><th>{_escape(name)}</th>{''.join(cells)}</tr>")
        totals = "".join(f'<td class="total">{int(k)} / {int(n)}</td>'
                         for k, n in zip(table.selected.sum(axis=1), table.counts.sum(axis=1)))
        totals += f'<td class="total">{int(table.selected.sum())} / {int(table.counts.sum())}</td>'
        rows.append(f"<tr><th>total</th>{totals}</tr>")
        html_table = f'<div class="scroll"><table class="cells"><tr><th>class</th>{header}</tr>{"".join(rows)}</table></div>'
        legend = '<p class="note">Cells: <span class="miss">no sample selected though ratio × total ≥ 1</span> · ' \
                 '<span class="tiny">under a quarter of the median cell</span> · <span class="empty">empty</span></p>'
        return f"<section>{title}{self.heatmap(table, names)}{legend}{html_table}</section>"

    def missed(self, count: int, selected: int) -> bool:
        """A cell that got no selected sample though the ratio asks for at least one."""
        return selected == 0 and self.ratio is not None and self.ratio * count >= 1

    def heatmap(self, table: BinClassTable, names: list) -> str:
        counts = table.counts.T  # classes down, bins across
        classes, bins = counts.shape
        figure = self.figure(min(2.5 + 0.7 * bins, 18), min(1.2 + 0.32 * classes, 24))
        axis = figure.subplots()
        from matplotlib import colormaps
        from matplotlib.colors import ListedColormap

        light_blues = ListedColormap(colormaps["Blues"](np.linspace(0.0, 0.6, 256)))  # black text stays readable
        high = int(counts.max()) if counts.size else 0
        image = axis.imshow(counts, cmap=light_blues, aspect="auto", vmin=0, vmax=max(high, 1))
        figure.colorbar(image, ax=axis, label="samples in cell", fraction=0.04)
        axis.set_xticks(range(bins), ["—" if b is None else str(b) for b in table.bins],
                        fontsize=8 if bins <= 40 else 5)
        axis.set_xlabel("bin")
        if classes <= 80:
            axis.set_yticks(range(classes), names, fontsize=8)
        axis.set_ylabel("class")
        if classes * bins <= 800:
            for (j, i), n in np.ndenumerate(counts):
                k = int(table.selected[i, j])
                missed = self.missed(n, k)
                axis.text(i, j, f"{k}/{n}", ha="center", va="center", fontsize=7,
                          color="#c00000" if missed else "black", fontweight="bold" if missed else "normal")
        axis.set_title("samples per cell (text: selected / total)")
        return self.embed(figure, "bins x classes heatmap")

    # ------------------------------------------------------------------ examples per bin

    def _rows_per_bin(self, samples: _Samples) -> list[tuple[object, list]]:
        """[(bin, [(row, selected)])]: selected samples first, then others, at most N per bin."""
        gathered, count = self.gathered, self.gathered.count
        if count is None:
            return []
        rng = np.random.default_rng(self.seed)
        chosen = np.zeros(count, dtype=bool)
        if gathered.selected is not None:
            chosen[gathered.selected] = True
        groups = gathered.bins.bins if gathered.bins is not None else [np.arange(count)]
        names = list(range(len(groups))) if gathered.bins is not None else [None]
        result = []
        for name, members in zip(names[:40], groups[:40]):
            members = np.asarray(members)
            ordered = np.concatenate([rng.permutation(members[chosen[members]]),
                                      rng.permutation(members[~chosen[members]])])
            rows = [int(r) for r in ordered if samples.available(int(r))][: self.thumbnails]
            result.append((name, [(r, bool(chosen[r])) for r in rows]))
        return result

    def examples(self, samples: _Samples) -> str:
        if samples.kind is None:
            return "<section><h2>Examples per bin</h2><p>The input data is not known or not available, so no " \
                   "examples are shown.</p></section>"
        groups = self._rows_per_bin(samples)
        if samples.kind == "text":
            return self.records(samples, groups)
        if not any(rows for _, rows in groups):
            return ""
        montage = []
        for bin_id, rows in groups:
            tiles = []
            for row, picked in rows:
                label = self.gathered.labels[row] if self.gathered.labels is not None else None
                title = f"{row}" + (f" · {self.gathered.class_name(label)}" if label is not None else "")
                tiles.append((samples.image(row), title, PICKED_FRAME if picked else OTHER_FRAME))
            montage.append(("all" if bin_id is None else f"bin {bin_id}", tiles))
        figure = self.montage(montage)
        more = f" (first 40 of {self.gathered.bins.n_bins} bins)" if self.gathered.bins is not None \
            and self.gathered.bins.n_bins > 40 else ""
        return f"<section><h2>Thumbnails per bin{more}</h2><p class=\"note\">Green frame: selected; grey: not " \
               f"selected (selected ones first). Titles: sample id · class.</p>{self.embed(figure, 'thumbnails per bin')}</section>"

    def records(self, samples: _Samples, groups: list) -> str:
        blocks = []
        for bin_id, rows in groups:
            cards = []
            for row, picked in rows:
                record = samples.record(row)
                fields = record.items() if isinstance(record, dict) else [("record", record)]
                text = "".join(
                    f"<div><b>{_escape(key)}</b>: {_escape(_shorten(value))}</div>"
                    for key, value in list(fields)[:4] if value not in ("", None))
                mark = "selected" if picked else "not selected"
                cards.append(f'<div class="record {"picked" if picked else ""}"><div class="head">id {row} · '
                             f"{mark}</div>{text}</div>")
            name = "all samples" if bin_id is None else f"bin {bin_id}"
            blocks.append(f"<h3>{_escape(name)}</h3><div class=\"records\">{''.join(cards)}</div>")
        return f"<section><h2>Example records per bin</h2><p class=\"note\">Selected records first " \
               f"(green).</p>{''.join(blocks)}</section>"

    # ------------------------------------------------------------------ patch store

    def patch_section(self, samples: Optional[_Samples]) -> str:
        store = self.gathered.patch_store
        if store is None or not len(store) or not self.thumbnails:
            return ""
        rng = np.random.default_rng(self.seed)
        rows = np.sort(rng.choice(len(store), size=min(len(store), self.thumbnails), replace=False))
        batch = store.batch(rows)
        patches = batch.patches.copy()
        patches[~batch.keep_mask] = GREY
        from dqkernels.pixel.patch_store import unpatchify

        stored = [(_as_display(image), f"id {int(sample_id)} · kept {int(kept)}/{batch.geometry.num_patches}",
                   OTHER_FRAME)
                  for image, sample_id, kept in zip(unpatchify(patches, batch.geometry), batch.sample_ids,
                                                    batch.keep_mask.sum(axis=1))]
        montage = [("stored", stored)]
        if samples is not None and samples.kind == "image":
            montage.insert(0, ("original", [(samples.image(int(sample_id)), f"id {int(sample_id)}", OTHER_FRAME)
                                            for sample_id in batch.sample_ids]))
        figure = self.montage(montage)
        geometry = batch.geometry
        info = f"{len(store)} images of {geometry.height}×{geometry.width} px in {geometry.patch} px patches; " \
               f"{int(store.keep_counts.sum())} of {len(store) * geometry.num_patches} patches kept."
        return f"<section><h2>Patch store: dropped patches in grey</h2><p>{_escape(info)}</p>" \
               f"{self.embed(figure, 'patch store images')}</section>"

    # ------------------------------------------------------------------ DQ-V2

    def v2_section(self, samples: Optional[_Samples]) -> str:
        summary = self.gathered.v2
        if summary is None:
            return ""
        pool, chosen = summary["pool"], summary["subset"]
        text = (f"Pool: {pool['originals']} originals + {pool['tobias']} Tobias images ({pool['swapped']} with a "
                f"swapped background). Subset: {chosen['selected']} = {chosen['originals']} originals + "
                f"{chosen['tobias']} Tobias images.")
        title = "<h2>DQ-V2: Tobias images beside their originals</h2>"
        tobias_items = [item for item in getattr(samples, "v2_items", []) if item.get("kind") == "tobias"]
        if samples is None or not tobias_items:
            return f"<section>{title}<p>{_escape(text)}</p><p>No Tobias image is in the exported subset; the " \
                   "output keeps only the recipes (recipes.npz) of the others, which this report does not " \
                   "re-render.</p></section>"
        shown = tobias_items[: self.thumbnails]
        rows = {"Tobias": [], "original": [], "background": []}
        for item in shown:
            partner = item.get("partner", -1)
            rows["Tobias"].append((samples.image(item["pool_id"]), f"pool id {item['pool_id']}", PICKED_FRAME))
            rows["original"].append((samples.image(item["base"]), f"id {item['base']}", OTHER_FRAME))
            rows["background"].append((samples.image(partner) if partner >= 0 else None,
                                       f"id {partner}" if partner >= 0 else "not swapped", OTHER_FRAME))
        figure = self.montage(list(rows.items()))
        return f"<section>{title}<p>{_escape(text)}</p><p class=\"note\">Selected Tobias images (top), the original " \
               f"whose foreground they keep (middle) and the image that gave the background (bottom, empty " \
               f"when none was swapped).</p>{self.embed(figure, 'Tobias images')}</section>"


def _fit_tile(image: Optional[np.ndarray], side: int) -> np.ndarray:
    """(side, side, 3) uint8: ``image`` scaled (nearest pixel) to fit, centred on white; a grey
    cross-hatch when there is no image."""
    tile = np.full((side, side, 3), 255, dtype=np.uint8)
    if image is None:
        diagonal = np.add.outer(np.arange(side), np.arange(side)) % 12 < 2
        tile[diagonal] = 200
        return tile
    image = _as_display(image)
    height, width = image.shape[:2]
    scale = side / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    rows = np.minimum((np.arange(new_h) / scale).astype(int), height - 1)
    cols = np.minimum((np.arange(new_w) / scale).astype(int), width - 1)
    top, left = (side - new_h) // 2, (side - new_w) // 2
    tile[top:top + new_h, left:left + new_w] = image[rows][:, cols]
    return tile


def _shorten(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= RECORD_CHARS else text[: RECORD_CHARS - 1] + "…"


_STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1250px;color:#222;padding:0 16px}
h1{margin-bottom:8px}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}
section{margin-bottom:20px}.note{color:#666;font-size:0.9em}
table.summary th{text-align:left;padding:2px 14px 2px 0;color:#555;font-weight:600;vertical-align:top}
table.summary td{font-family:ui-monospace,monospace;font-size:0.9em;word-break:break-all}
.warnings{background:#fff4e5;border:1px solid #f0b35b;border-radius:6px;padding:4px 16px}
.warnings h2{border:none;margin-top:8px;color:#8a4b00}.ok{background:#eef8ee;border:1px solid #9ccc9c;border-radius:6px;padding:4px 16px}
.ok h2{border:none;margin-top:8px}
img.figure{max-width:100%;display:block;margin:8px 0}
.scroll{overflow:auto;max-height:640px}
table.cells{border-collapse:collapse;font-size:0.85em}
table.cells th,table.cells td{border:1px solid #ddd;padding:2px 8px;text-align:right;white-space:nowrap}
table.cells th{background:#f4f4f4;position:sticky;top:0}td.total{font-weight:600;background:#fafafa}
.miss{background:#fbdada}.tiny{background:#fff0c2}.empty{color:#aaa}
.records{display:flex;flex-wrap:wrap;gap:8px}
.record{border:1px solid #ccc;border-radius:6px;padding:6px 8px;width:280px;font-size:0.82em;background:#fafafa}
.record.picked{border:2px solid #1a9e2f;background:#f1fbf2}.record .head{color:#666;margin-bottom:4px}
"""
