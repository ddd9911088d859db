"""shardinfer: LLM batch inference over large corpora, sharded across workers, nodes and GPUs."""

__version__ = "0.1.0"


def submit(config, *, launcher: str = "sbatch", overrides=None):  # type: ignore[no-untyped-def]
    """Plan a run and submit it to SLURM (launcher "sbatch" or "submitit").

    ``config`` is a YAML path or a :class:`shardinfer.config.Config`. Returns a handle whose
    ``result()`` waits for the reduce job and returns the run's report.
    """
    from shardinfer.launch.submit import submit as _submit

    return _submit(config, launcher=launcher, overrides=overrides)
