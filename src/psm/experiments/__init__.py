"""Experiments: the paper's catalogue and the runs built from it, trained and scored through one
harness, planned, and reported.

* :mod:`~psm.experiments.catalogue`: methods, budgets, presets, recipes, a cell's run config.
* :mod:`~psm.experiments.plan`: a preset's cells, what each job costs, what a folder still needs.
* :mod:`~psm.experiments.harness`: train a run's unfinished blocks, score it under its ``eval``
  section, keep the score in its ``nll.jsonl`` (shared by ``reproduce`` and ``demo``).
* :mod:`~psm.experiments.floors`: each row's exact NLL floor at its t0, cached.
* :mod:`~psm.experiments.legacy`: the score cache of older reproduce folders, read-only.
* :mod:`~psm.experiments.report`: tables, ``results.md``/``.json``, figures.
* :mod:`~psm.experiments.reproduce`, :mod:`~psm.experiments.demo`: the two experiments.
"""
