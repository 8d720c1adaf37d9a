"""What attaches to the training loop (``segtrain.engine.trainer.Trainer``), one job each:

- ``evaluation.PeriodicEvaluation``: scores the model every ``eval_interval`` iterations;
- ``checkpoints.Checkpoints``: ``last.pt`` every ``checkpoint_interval``, ``best.pt`` by mIoU;
- ``run_log.RunLog``: log lines, progress bar, TensorBoard, sample figures, ``metrics.json``;
- ``preemption.Preemption``: stop signals (SLURM, kill) and submitit's requeue;
- ``trial_pruning.TrialPruning``: a search trial's evaluations to its pruner, which may end it.

The hooks they implement are documented in ``base.Callback``.
"""
