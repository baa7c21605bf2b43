"""psm chooses from measurements: each block's step budget (:mod:`psm.auto.budget`) and the
blocks' time ranges (:mod:`psm.auto.splits`).

This layer sits above the executors (it trains rounds through them) and below the commands.
"""
