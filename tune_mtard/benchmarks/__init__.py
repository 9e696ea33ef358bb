"""Benchmarks (``python -m tune_mtard.bench step|epoch|platform|search|memory``, docs/performance.md): one module
per benchmark. They exercise the library from outside: nothing in the library imports them."""
