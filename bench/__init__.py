"""Benchmarks of zpipe against transformers and of its transport; run from a checkout
(``python -m bench --help``), not shipped with the package."""
