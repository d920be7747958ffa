"""The command lines over the library: GLUE (``glue.py``) and reasoning (``reasoning.py``) fine-tuning, the
resumable study grids (``reproduce.py``, ``reasoning_study.py``) and the benchmarks (``bench*.py``).

Each module runs as a script (``python experiments/glue.py ...``) or as a module (``python -m
experiments.glue ...``); what they share (atomic writes, versions and devices, step-time statistics, the
progress bar, the dataclass-driven options) is in :mod:`experiments.common`.
"""
