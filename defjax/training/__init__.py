"""The training program: ``train_and_evaluate(config, workdir)`` and its parts.

``main`` (flags, exit codes; ``python -m defjax.main`` and ``train.py`` run
it) -> ``config_checks`` -> ``trainer`` (the loop) -> ``data/`` (the input
pipeline), ``models/`` and ``task`` (the model, its loss, test accuracy),
``optimizer`` (config.optim -> the per-worker transform) -> ``checkpoint``,
``runfiles`` (a run folder's files and exit codes, shared with
``defjax.experiments``) and ``hooks`` (signals, progress). Where the workers
run is the library's ``defjax.layouts``.

Needs ``pip install 'defjax[train]'``; importing this package imports none of
its modules.
"""
