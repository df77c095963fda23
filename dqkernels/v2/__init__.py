"""DQ-V2 (docs/method.md §5): Tobias background swaps enlarge the pool that is binned and sampled."""
