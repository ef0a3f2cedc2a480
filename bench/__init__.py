"""Benchmarks, run from the repository root as modules so that they import the project's modules:

    python -m bench.sample_speed    # generation: cache-free reference vs engine vs Hugging Face generate
    python -m bench.prepare_speed   # BPE training and the prepare pipeline's encode throughput
"""
