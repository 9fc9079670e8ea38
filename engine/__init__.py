"""The reference engine: a torch tensor-parallel (TP=2) Qwen2-VL-family server for offload mode.

``engine.model`` holds the model side (load, build inputs from chat messages and processor tensors,
greedy generate); ``engine.tiny`` writes a tiny random-weight Qwen2-VL checkpoint that tests and
benchmarks load in place of a real one. The engine imports ``preprocess`` (the tensor descriptor
format and its reader) and never ``sidecar``.
"""
