"""One-shot (post-training) pruning layer by layer: capture, block lists, layer solvers, report,
and the driver (:func:`admmprune.oneshot`)."""
