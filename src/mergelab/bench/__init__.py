"""The offline benchmark, split by concern.

``config`` (the experiment YAML), ``pool`` (base, tasks and experts, returned frozen), ``methods`` (the only
contact with the method registry), ``selection`` (the grid search on validation), ``cells`` (cell keys and the
evaluation of one subject), ``baselines`` (experts, base, ensemble, multi-task model, NeuLig router, t-SNE),
``store`` (the SQLite results store), ``expert_checks``, ``context`` and ``timing`` (what the stages share), and
``runner`` (``run_benchmark``, which composes them). ``report`` renders a run; ``pleas_runner`` is the PLeaS
vision benchmark.
"""
