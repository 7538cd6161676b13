"""The sets S and their projections Π_S: sparsity, quantization, row + column proximal operators,
projections in a diagonal metric. Pure tensor math; imports nothing else of the package."""
