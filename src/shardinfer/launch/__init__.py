"""Launchers: where a run's workers run. Local processes, mpirun, sbatch scripts and submitit are
peers behind :class:`shardinfer.launch.base.Launcher`, chosen by name in
:mod:`shardinfer.launch.registry`; :mod:`shardinfer.launch.start` is the one way a launch begins."""
