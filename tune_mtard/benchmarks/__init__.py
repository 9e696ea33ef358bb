"""Benchmarks (``python -m tune_mtard.bench step|platform|search|memory``, docs/performance.md): one module
per benchmark. They exercise the library from outside: nothing in the library imports them."""
