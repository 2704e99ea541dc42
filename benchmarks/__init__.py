"""AdaptBIR benchmarks: `adaptbir-bench` (bench.py), the torch-free memory probe (probe.py), and the GPU check."""
