"""psm chooses from measurements: each block's step budget (:mod:`psm.auto.budget`), the
blocks' time ranges (:mod:`psm.auto.splits`) and each block's net and objective among given
candidates (:mod:`psm.auto.nets`).

This layer sits above the executors (it trains rounds through them) and below the commands.
"""
