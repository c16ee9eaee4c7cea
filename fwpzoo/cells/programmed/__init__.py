"""The cells whose programmer reads its own past: the Recurrent DeltaNet (recurrent_delta.py), the
self-referential weight matrix (srwm.py) and the plastic networks (plastic.py). Their slow weights
act inside the scan, so they have only `step`, `recurrent` and the memory-lean backwards of
scans.py, not the chunkwise and associative forms of fwpzoo.cells.CELLS (recurrent_fwp.md)."""
