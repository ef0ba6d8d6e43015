"""Speed benchmarks for fmnist_tl; run with `python -m bench` (see bench/run.py)."""
