"""Deep fast weights: cells whose state is the parameters of a small network (a fast net) and
whose update is one step of a named inner optimiser on a declared loss over a mini-batch or a
window of tokens (TTT, Titans, ATLAS, LaCT). The cells are registered in fwpzoo.cells.CELLS like
every other; their static arguments (mini-batch, window, fast net, optimiser) are named in each
module's OPTIONS with the model fields that set them.
"""
