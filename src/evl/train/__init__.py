"""Training: the Trainer (trainer.py) and what it stands on — data feeding across ranks (data.py),
process groups and model wrapping (dist.py), checkpoint state (state.py), optimiser groups and the
schedule (optim.py), logs (log.py) — and the training objective that composes loss terms (objective.py).

Import from the submodules (`from evl.train.trainer import Trainer`); this package imports nothing
heavy on its own.
"""
