"""The experiment tools: grids of training runs and what is read from them.

``sweep`` (a grid of ``python -m defjax.main`` runs; ``launch``: one run as a
child process) -> run folders (``defjax.training.runfiles``) -> ``results``
(finished runs grouped by method, ratio and lam) -> ``report`` (Table 1 and
Table 4, ``figures``: the paper's Figures 1 and 3) and ``gap`` (DEF's gap to
SGD against training length). They never import the training loop.
"""
