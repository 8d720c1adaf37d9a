"""What attaches to the training loop (``segtrain.engine.trainer.Trainer``), one job each:

- ``evaluation.PeriodicEvaluation``: scores the model every ``eval_interval`` iterations;
- ``run_log.RunLog``: log lines, progress bar, TensorBoard, sample figures;
- ``mlflow_log.MLflowLog``, ``wandb_log.WandbLog``: the run tracked in MLflow or W&B;
- ``preemption.Preemption``: stop signals (SLURM, kill, Ctrl-C) become a stop request;
- ``trial_pruning.TrialPruning``: a search trial's evaluations to its pruner, which may end it.

The hooks they implement are documented in ``base.Callback``. A callback imports no other
callback and writes no trainer state another one reads: what they share (the run record,
best.pt, last.pt, the stop state) is the trainer's, so their order in the list is free.
"""
