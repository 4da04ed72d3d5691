"""Pure-PyTorch implementations of every op: the CPU path and the test oracle. Vectorised (no Python
loop over experts), free of host syncs, and exact in float64."""
