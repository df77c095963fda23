"""The files the tool reads and writes — feature set, bins, subset, export manifest, item
listing — each with one reader and one writer, and the checks that tie ids to data."""
