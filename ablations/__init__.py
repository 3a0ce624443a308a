"""Ablation sweeps of the backbone's knobs: `<axis>/<variant>.yaml` config fragments, the sweep runner
(`run.py`), its report (`report.py`) and the effective-receptive-field tool (`erf.py`).

Imports run one way: `run` -> `report` -> `erf`, and `run`, `report` -> `axes`. The scripts run as
`python ablations/run.py ...` (the package is installed with the project) or `python -m ablations.run ...`.
"""
