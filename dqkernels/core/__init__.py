"""The bottom layer: input errors, argument validation, atomic artifacts, hashing. No numerics
of the method and no imports from the rest of the package."""
