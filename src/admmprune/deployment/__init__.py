"""What a pruned model costs and how it is served: storage formats, the packed file, sparse
kernels, latency, deploy(). Imports every layer below it."""
