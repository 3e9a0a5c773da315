"""Research code next to the product: scripts that build and validate attnmem's bundled models.

Not installed with attnmem; run from the repository root, e.g. ``python -m research.testbed.train``.
It imports the package (and ``bench.machine`` for provenance), never the other way round.
"""
