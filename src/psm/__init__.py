"""psm: Parallel Score Matching for diffusion models.

The diffusion time [0, 1] is cut into blocks, each block gets its own score network, all blocks
train independently, and sampling and exact likelihoods run the probability-flow ODE through
the blocks in sequence.
"""

__version__ = "0.1.0"
