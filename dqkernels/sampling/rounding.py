"""Controlled rounding of a bins × classes table of sample targets (docs/method.md §3, `exact`).

Every cell of ρ·counts is rounded to its floor or ceiling so that, at the same time, every row
total (bin) and every column total (class) is the floor or ceiling of its own target and the grand
total is exactly max(1, round(ρ·M)). A two-way table always has such a rounding (Bacharach 1966;
Cox 1987). It is a feasible flow

    source → bin i → cell (i, j) → class j → sink,

each arc bounded below by the floor and above by the ceiling of the target it carries, and the
source sending exactly the grand total. The lower bounds are removed the standard way: every arc
carries its floor, which leaves each node with an excess or a deficit; a super source feeds the
excesses, a super sink drains the deficits, and a maximum flow over the remaining capacities
(ceiling − floor, so 0 or 1) that saturates them completes the rounding.

Which cells round up is chosen by the seed: the nodes get their ids from a seeded permutation
before the graph is built, and the max-flow engine (``scipy.sparse.csgraph.maximum_flow``, Dinic)
visits arcs in node-id order, so the seed — never a cell's position — decides where the
augmenting paths go.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
from scipy.sparse import csr_array
from scipy.sparse.csgraph import maximum_flow

# ρ is read as the nearest fraction with a bounded denominator (0.1 means 1/10, n/M means n/M), so
# a target that is an integer for the ratio the user meant is one here, not 2.9999… or 3.0000…1.
_MAX_RATIO_DENOMINATOR = 10**9


def rational_ratio(ratio: float) -> Fraction:
    """ρ as the nearest fraction with a denominator of at most 10⁹ (exact for 0.1, 1/3, n/M)."""
    return Fraction(ratio).limit_denominator(_MAX_RATIO_DENOMINATOR)


def target_bounds(counts: np.ndarray, ratio: Fraction) -> tuple[np.ndarray, np.ndarray]:
    """Floor and ceiling of ratio·counts, computed exactly. counts: int64 array (any shape)."""
    counts = np.asarray(counts, dtype=np.int64)
    if int(counts.max(initial=0)) * ratio.numerator < 2**63:
        scaled = counts * np.int64(ratio.numerator)
    else:  # the product would overflow int64: Python integers (the results still fit)
        scaled = counts.astype(object) * ratio.numerator
    floor = (scaled // ratio.denominator).astype(np.int64)
    ceil = (-(-scaled // ratio.denominator)).astype(np.int64)
    return floor, ceil


def grand_total(n_samples: int, ratio: Fraction) -> int:
    """max(1, round(ρ·M)), Python rounding (half to even) of the exact product."""
    return max(1, round(ratio * n_samples))


def controlled_rounding(counts: np.ndarray, ratio: Fraction, rng: np.random.Generator) -> np.ndarray:
    """Round the table ratio·counts under floor/ceil bounds on cells, rows and columns.

    counts: (R, C) int64, R bins × C classes (C = 1 for global sampling), entries ≥ 0, sum ≥ 1.
    ratio: ρ in (0, 1] as a fraction (see ``rational_ratio``). rng: decides which cells round up.
    Returns (R, C) int64 ``take`` with take[i, j] ∈ {⌊ρn_ij⌋, ⌈ρn_ij⌉}, every row sum
    ∈ {⌊ρr_i⌋, ⌈ρr_i⌉}, every column sum ∈ {⌊ρc_j⌋, ⌈ρc_j⌉}, and take.sum() =
    max(1, round(ρ·M)). An empty cell gets 0; a cell whose target is an integer gets exactly it.
    """
    counts = np.asarray(counts, dtype=np.int64)
    n_rows, n_cols = counts.shape
    total = grand_total(int(counts.sum()), ratio)
    cell_floor, cell_ceil = target_bounds(counts, ratio)
    row_floor, row_ceil = target_bounds(counts.sum(axis=1), ratio)
    col_floor, col_ceil = target_bounds(counts.sum(axis=0), ratio)

    # Only cells that may still round up become nodes; the others are fixed at their floor.
    free_rows, free_cols = np.nonzero(cell_ceil > cell_floor)
    n_free = len(free_rows)
    # Node ids: a seeded permutation of [source, sink, super source, super sink, rows, cells, cols].
    node_id = rng.permutation(4 + n_rows + n_free + n_cols)
    source, sink, super_source, super_sink = (int(v) for v in node_id[:4])
    row_node = node_id[4 : 4 + n_rows]
    cell_node = node_id[4 + n_rows : 4 + n_rows + n_free]
    col_node = node_id[4 + n_rows + n_free :]

    # Excess each node is left with once every arc carries its lower bound (the source must send
    # `total`, the sink absorb it): positive → fed by the super source, negative → drained.
    row_excess = row_floor - cell_floor.sum(axis=1)
    col_excess = cell_floor.sum(axis=0) - col_floor
    source_excess = total - int(row_floor.sum())
    sink_excess = int(col_floor.sum()) - total
    excess_node = np.concatenate([[source, sink], row_node, col_node])
    excess = np.concatenate([[source_excess, sink_excess], row_excess, col_excess])

    tails = [
        np.full(n_rows, source), row_node[free_rows], cell_node, col_node,
        np.full(int((excess > 0).sum()), super_source), excess_node[excess < 0],
    ]
    heads = [
        row_node, cell_node, col_node[free_cols], np.full(n_cols, sink),
        excess_node[excess > 0], np.full(int((excess < 0).sum()), super_sink),
    ]
    capacity = [
        row_ceil - row_floor, np.ones(n_free, np.int64), np.ones(n_free, np.int64),
        col_ceil - col_floor, excess[excess > 0], -excess[excess < 0],
    ]
    tails, heads, capacity = (np.concatenate(part).astype(np.int64) for part in (tails, heads, capacity))
    keep = capacity > 0
    tails, heads, capacity = tails[keep], heads[keep], capacity[keep]
    n_nodes = len(node_id)
    graph = csr_array((capacity.astype(np.int32), (tails, heads)), shape=(n_nodes, n_nodes))
    required = int(excess[excess > 0].sum())

    take = cell_floor.copy()
    if required > 0:
        result = maximum_flow(graph, super_source, super_sink, method="dinic")
        if int(result.flow_value) != required:
            raise RuntimeError(
                f"controlled rounding found no feasible flow ({result.flow_value} of {required}); "
                "a two-way table always has one, so this is a bug"
            )
        if n_free:
            rounded_up = np.asarray(result.flow[row_node[free_rows], cell_node]).ravel()
            take[free_rows, free_cols] += rounded_up.astype(np.int64)
    _check_rounding(take, counts, ratio, total)
    return take


def _check_rounding(take: np.ndarray, counts: np.ndarray, ratio: Fraction, total: int) -> None:
    """Raise RuntimeError unless ``take`` meets every bound ``controlled_rounding`` promises."""
    checks = [(take, counts), (take.sum(axis=1), counts.sum(axis=1)), (take.sum(axis=0), counts.sum(axis=0))]
    for values, sizes in checks:
        floor, ceil = target_bounds(sizes, ratio)
        if ((values < floor) | (values > ceil)).any():
            raise RuntimeError("controlled rounding broke a floor/ceil bound; this is a bug")
    if int(take.sum()) != total:
        raise RuntimeError(f"controlled rounding selected {int(take.sum())}, not {total}; this is a bug")
