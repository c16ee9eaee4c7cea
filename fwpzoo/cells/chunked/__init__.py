"""The chunk engine every affine rule's chunkwise form runs on, and what it shares.

engine.py      the three stages (prepare a block of chunks, scan the state, outputs),
               forward and backward, and the block layout per platform
linear.py      the linear-attention chunk (linear_attn, gated_linear_attn), hand-derived
delta.py       the delta rules' chunk (delta_rule, gated_delta_rule, delta_product, longhorn),
               hand-derived
autodiff.py    rules whose backward is autodiff of their stages (oja, momentum_delta, mesa,
               mlstm, dplr's halved chunks; dplr's own rule is in dplr.py)
chunking.py    padding, segments of resets inside a chunk, the factored-spread flags, and
               the associative scan of diagonal recurrences
scores.py      intra-chunk score matrices (causal, per-key by halving, factored)
triangular.py  unit lower-triangular inverses (the UT transform)
precision.py   the chunk matmuls' dtype and precision
summary.py     chunk summaries: what a span of tokens does to its entering state, for
               context parallelism
remat.py       the per-chunk loop of the cells whose chunk is not affine (the deep cells)
"""
