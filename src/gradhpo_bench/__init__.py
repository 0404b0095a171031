"""Experiments behind the ``gradhpo`` command: the demo and the benchmark suite.

Each bench is one module (``toys``, ``fidelity``, ``cleaning``, ``regularization``,
``metalearning``, ``cost``) with a ``main(args)`` that writes a Markdown table and PNG plots
into an output folder; ``demo`` is the README's main job. Shared pieces: ``data`` (bundled
and IDX data sets), ``models``, ``methods`` (the estimators as configured here), ``loop``
(the one training loop and the horizon-matched hypergradient comparison), ``metrics``,
``search`` (random search and Optuna's TPE) and ``report`` (tables, plots, progress).

Nothing here is imported by ``import gradhpo``: scikit-learn, matplotlib, tqdm and optuna
are imported lazily, where a command needs them.
"""
