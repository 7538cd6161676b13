"""Which weights a set acts on and how they are seen, masked and counted: the GEMM view, fused
experts, calling a model, spec → Targets, masks and hard pruning, MAC counts. Imports ``sets``."""
