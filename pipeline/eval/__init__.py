"""MMLU with lm-evaluation-harness: the data on disk (``mmlu``), scoring (``score``), the background scorer beside a run
(``scorer``,
which starts :mod:`pipeline.cli.watch`), the per-checkpoint report and best pointer (``report``)."""
