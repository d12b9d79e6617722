"""lowbit's benchmark suite: `python benchmarks/run_all.py [--quick] [--out DIR] [--only NAME...]`."""
