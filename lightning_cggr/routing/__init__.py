"""Which tokens (or sequences) train: the router, difficulty scores, selection and its schedule.

- :mod:`.router`: :class:`~.router.TruncatedRouter`, a view of the model's first k blocks (no copies);
- :mod:`.scoring`: entropy / margin / loss / combined scores, excess loss, the random control;
- :mod:`.selection`: the label shift and static-shape top-k selection of tokens or sequences;
- :mod:`.schedule`: constant, curriculum and dynamic keep ratios;
- :mod:`.sampling`, :mod:`.importance`: the weighted rules (importance-sampled keep, InfoBatch-style
  pruning, noise-excluding top-k): kept units, loss weights and the loss normaliser;
- :mod:`.reference`: the frozen reference model of excess-loss (Rho-1) scoring;
- :mod:`.holdout`: ``python -m lightning_cggr.routing.holdout`` builds that reference (RHO-LOSS);
- :mod:`.guards`: non-finite router statistics never rank hard.

Everything here is a pure function of tensors or a plain object holding references to the
model's own modules; :mod:`lightning_cggr.step` wires them into a training step.
"""
