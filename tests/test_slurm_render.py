"""Rendered batch scripts (golden files), worker layout, and rank/GPU detection: no cluster needed."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from shardinfer.config import config_from_dict
from shardinfer.errors import ConfigError, RunError
from shardinfer.launch.env import (
    FROM_ARGUMENTS,
    FROM_MPI,
    FROM_SLURM,
    LAUNCHER_VAR,
    MpiRanks,
    RankEnv,
    check_allocation,
    check_world,
    gpu_slice,
    visible_gpu_ids,
)
from shardinfer.launch.layout import layout
from shardinfer.launch.registry import worker_launcher
from shardinfer.launch.sbatch import render_scripts

GOLDEN = Path(__file__).parent / "golden"


def cluster_cfg(**slurm):
    return config_from_dict(cluster_raw(**slurm))


def cluster_raw(**slurm):
    return {
        "name": "summarize",
        "input": {"path": "/data/docs/*.parquet"},
        "model": {"path": "/models/m", "engine_args": {"tensor_parallel_size": 2}},
        "run": {"env": {"HF_HUB_OFFLINE": "1"}},
        "slurm": {"nodes": 4, "gpus_per_node": 8, "cpus_per_task": 16, "mem_gb": 400, "time_min": 720,
                  "partition": "gpu", "account": "proj-42", "qos": "high", "constraint": "h100",
                  "extra_sbatch": ["--exclusive", "#SBATCH --mail-type=END"],
                  "setup": ["module load cuda/12.4", "source /opt/venv/bin/activate"], **slurm},
    }


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("SHARDINFER_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed; rerun with SHARDINFER_UPDATE_GOLDEN=1 if intended"


@pytest.mark.parametrize("shape", ["job", "array"])
def test_rendered_scripts_match_the_golden_files(shape):
    cfg = cluster_cfg(shape=shape, array_parallelism=3)
    scripts = render_scripts(cfg, layout(cfg), run_dir="/shared/runs/summarize", launch=2,
                             python="/opt/venv/bin/python")
    _check_golden(f"{shape}-worker.sbatch", scripts.worker)
    _check_golden(f"{shape}-reduce.sbatch", scripts.reduce)


def test_job_shape_counts_come_from_one_place():
    cfg = cluster_cfg()
    lay = layout(cfg)
    assert (lay.workers, lay.replicas_per_node, lay.gpus_per_replica) == (16, 4, 2)
    worker = render_scripts(cfg, lay, run_dir="/r", launch=0, python="py").worker
    assert "#SBATCH --nodes=4\n#SBATCH --ntasks-per-node=4\n" in worker
    assert "#SBATCH --gpus-per-node=8" in worker
    assert "-m shardinfer.worker /r --launcher sbatch --launch 0 --expect-world 16 --gpus-per-replica 2" in worker


def test_array_shape_gives_each_task_one_replica():
    cfg = cluster_cfg(shape="array")
    worker = render_scripts(cfg, layout(cfg), run_dir="/r", launch=0, python="py").worker
    assert "#SBATCH --array=0-15\n" in worker and "#SBATCH --gpus-per-node=2" in worker
    assert "#SBATCH --ntasks=1" in worker


def test_cpu_nodes_and_hf_engine_layouts():
    cpu = config_from_dict({"input": {"path": "x"}, "model": {"path": "m"},
                            "slurm": {"nodes": 3, "cpu_workers_per_node": 2}})
    assert (layout(cpu).workers, layout(cpu).gpus_per_replica) == (6, 0)
    hf = config_from_dict({"input": {"path": "x"}, "model": {"path": "m", "engine": "hf"},
                           "slurm": {"nodes": 2, "gpus_per_node": 4}})
    assert (layout(hf).workers, layout(hf).gpus_per_replica) == (2, 4)


def test_gpus_per_node_must_hold_whole_replicas():
    with pytest.raises(ConfigError, match=r"slurm.gpus_per_node \(6\) is not a multiple .* \(4 = tensor"):
        layout(config_from_dict({"input": {"path": "x"},
                                 "model": {"path": "m", "engine_args": {"tensor_parallel_size": 4}},
                                 "slurm": {"gpus_per_node": 6}}))


SLURM_STEP = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
              "SLURM_JOB_ID": "77"}
SLURM_ARRAY = {"SLURM_ARRAY_TASK_ID": "13", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "10",
               "SLURM_ARRAY_JOB_ID": "90", **{k: "0" for k in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID")},
               "SLURM_NTASKS": "1"}


@pytest.mark.parametrize("launcher,env,given,expect", [
    ("sbatch", SLURM_STEP, {}, (5, 8, 1, 2, "sbatch", "77", "slurm", 8)),
    ("submitit", SLURM_STEP, {}, (5, 8, 1, 2, "submitit", "77", "slurm", 8)),
    ("sbatch", SLURM_ARRAY, {}, (3, 4, 0, 0, "sbatch", "90", "slurm-array", 1)),
    ("local", {}, {"rank": 1, "world": 2}, (1, 2, 0, 0, "local", None, "arguments", 2)),
    ("local", {}, {}, (0, 1, 0, 0, "local", None, "arguments", 1)),
])
def test_each_launcher_says_how_its_workers_find_their_rank(launcher, env, given, expect):
    chosen = worker_launcher(launcher, {})
    r = chosen.ranks.find(env, launcher=chosen.name, **given)
    assert (r.rank, r.world, r.local_rank, r.node, r.launcher, r.job_id, r.source, r.tasks_in_job) == expect
    assert r.describe().startswith(f"rank {expect[0]}/{expect[1]} (local rank {expect[2]}, node {expect[3]}, "
                                   f"{launcher} launcher, rank from {expect[6]}")


def test_the_launcher_is_named_never_guessed_from_the_environment():
    assert worker_launcher("local", SLURM_STEP).ranks is FROM_ARGUMENTS  # a local run inside a SLURM job
    r = worker_launcher("local", SLURM_STEP).ranks.find(SLURM_STEP, launcher="local", rank=1, world=2)
    assert (r.rank, r.world, r.launcher, r.slurm_job_id) == (1, 2, "local", None)
    assert worker_launcher(None, {LAUNCHER_VAR: "submitit"}).name == "submitit"  # named by the environment
    assert worker_launcher("sbatch", {LAUNCHER_VAR: "submitit"}).name == "sbatch"  # --launcher first
    assert worker_launcher(None, {}, ranked=True).name == "local"  # plugins of earlier versions: --rank R
    assert worker_launcher(None, {}).name == "sbatch"  # batch scripts of earlier versions name no launcher
    for name, source in (("mpirun", FROM_MPI), ("slurm-mpi", FROM_MPI), ("sbatch", FROM_SLURM),
                         ("submitit", FROM_SLURM), ("local", FROM_ARGUMENTS)):
        assert worker_launcher(name, {}).ranks is source
    with pytest.raises(ConfigError, match="launcher 'nope' is not one of the launchers: local, mpirun, sbatch"):
        worker_launcher("nope", {})


def test_a_source_refuses_a_worker_its_launcher_did_not_start():
    with pytest.raises(RunError, match="SLURM_PROCID is not set: the sbatch launcher's workers are SLURM tasks"):
        FROM_SLURM.find({}, launcher="sbatch")
    with pytest.raises(RunError, match="starts each worker with --rank R --world W .* got --rank 2 --world 2"):
        FROM_ARGUMENTS.find({}, launcher="local", rank=2, world=2)
    with pytest.raises(RunError, match="SLURM_NTASKS='x' is not an integer"):
        FROM_SLURM.find({**SLURM_STEP, "SLURM_NTASKS": "x"}, launcher="sbatch")


class FakeWorld:
    """COMM_WORLD as one rank sees it, its ranks placed on nodes (``nodes[rank]``)."""

    def __init__(self, rank, nodes):
        self.rank, self.nodes = rank, nodes

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return len(self.nodes)

    def Split_type(self, kind):
        assert kind == "shared"
        return FakeNode(self.rank, self._peers(self.rank))

    def allgather(self, value):  # each rank gives its own rank if it leads its node
        leaders = [r if self._peers(r)[0] == r else None for r in range(len(self.nodes))]
        assert value == leaders[self.rank]
        return leaders

    def _peers(self, rank):
        return [r for r, n in enumerate(self.nodes) if n == self.nodes[rank]]


class FakeNode:
    """The ranks sharing one node's memory."""

    def __init__(self, rank, peers):
        self.rank, self.peers = rank, peers

    def Get_rank(self):
        return self.peers.index(self.rank)

    def bcast(self, value, root):
        return self.peers[root] if self.Get_rank() != root else value


def _mpi_source(rank, nodes):
    return MpiRanks(lambda: (FakeWorld(rank, nodes), "shared"))


@pytest.mark.parametrize("rank,expect", [(0, (0, 0)), (1, (0, 1)), (2, (1, 0)), (3, (1, 1)), (4, (2, 0))])
def test_mpi_ranks_take_rank_and_world_from_the_communicator_and_nodes_from_shared_memory(rank, expect):
    nodes = ["a", "a", "b", "b", "c"]  # two ranks on node a, two on b, one on c
    r = _mpi_source(rank, nodes).find({"SLURM_JOB_ID": "12", "SLURM_RESTART_COUNT": "1"}, launcher="slurm-mpi")
    assert (r.rank, r.world, r.node, r.local_rank) == (rank, 5, *expect)
    assert (r.launcher, r.source, r.job_id, r.restart, r.tasks_in_job) == ("slurm-mpi", "mpi", "12", 1, 5)


def test_mpi_local_rank_comes_from_the_mpi_launchers_variables():
    source = _mpi_source(3, ["a", "a", "b", "b"])
    assert source.find({"OMPI_COMM_WORLD_LOCAL_RANK": "0"}, launcher="mpirun").local_rank == 0
    assert source.find({"MPI_LOCALRANKID": "5"}, launcher="mpirun").local_rank == 5  # MPICH, Intel MPI
    # not SLURM_LOCALID: under mpirun in a SLURM job every rank would inherit its daemon's
    assert source.find({"SLURM_LOCALID": "0"}, launcher="mpirun").local_rank == 1


def test_each_launcher_says_which_gpus_its_workers_use(monkeypatch):
    on_node = {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    step = FROM_SLURM.find({**SLURM_STEP, **on_node}, launcher="sbatch")  # local rank 1
    assert FROM_SLURM.devices(step, 2, on_node) == ["2", "3"]
    assert FROM_SLURM.devices(step, 0, on_node) is None  # CPU workers: nothing to pin
    no_cgroup = {**SLURM_STEP, "SLURM_JOB_GPUS": "4,5,6,7"}  # SLURM did not set CUDA_VISIBLE_DEVICES
    assert FROM_SLURM.devices(step, 2, no_cgroup) == ["6", "7"]
    assert FROM_SLURM.devices(step, 2, {**no_cgroup, "SLURM_STEP_GPUS": "1,3,5,7"}) == ["5", "7"]
    local = FROM_ARGUMENTS.find({}, launcher="local", rank=1, world=2)
    assert FROM_ARGUMENTS.devices(local, 2, {"CUDA_VISIBLE_DEVICES": "6,7"}) is None  # set by the launcher
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    check_allocation(FROM_SLURM, step, 8, 2)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"
    check_allocation(FROM_ARGUMENTS, local, 2, 2)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"


def test_gpu_slices_per_local_rank():
    visible = visible_gpu_ids({"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"})
    env = RankEnv(rank=5, world=8, local_rank=1, node=1, launcher="slurm", host="n1")
    assert gpu_slice(env, visible, 2) == ["2", "3"]
    assert gpu_slice(RankEnv(7, 8, 3, 1, "slurm", host="n1"), visible, 2) == ["6", "7"]
    assert visible_gpu_ids({}) is None and visible_gpu_ids({"CUDA_VISIBLE_DEVICES": ""}) == []


def test_allocation_mismatches_say_what_was_asked_found_and_the_fix():
    env = RankEnv(rank=3, world=4, local_rank=3, node=0, launcher="slurm", host="n1")
    with pytest.raises(RunError) as err:
        gpu_slice(env, ["0", "1", "2", "3"], 2)
    msg = str(err.value)
    assert "needs GPUs 6..7" in msg and "only 4 are visible" in msg and "Fix: request slurm.gpus_per_node" in msg
    with pytest.raises(RunError, match="the config asks for 8 workers, the job has 4 .* Fix:"):
        check_world(env, 8)
    check_world(env, 4)


@pytest.mark.parametrize("start,line", [
    ("srun", "srun --mpi=pmix --unbuffered --cpus-per-task=16 /opt/venv/bin/python -m shardinfer.launch.mpi "
             "/shared/runs/summarize --launch 0 --gpus-per-replica 2 --launcher slurm-mpi &"),
    ("mpirun", "mpirun /opt/venv/bin/python -m shardinfer.launch.mpi /shared/runs/summarize --launch 0 "
               "--gpus-per-replica 2 --launcher slurm-mpi &"),
])
def test_mpi_job_starts_ranks_with_srun_pmix_or_mpirun(start, line):
    cfg = cluster_cfg(mpi_start=start)
    script = render_scripts(cfg, layout(cfg), run_dir="/shared/runs/summarize", launch=0,
                            python="/opt/venv/bin/python", mpi=True).worker
    assert line in script
    assert "#SBATCH --ntasks-per-node=4" in script


def _sbatch_options(text: str) -> dict[str, str]:
    opts = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line.removeprefix("#SBATCH --").partition("=")
            opts[key] = value.strip("'")
    return opts


@pytest.mark.parametrize("shape", ["job", "array"])
def test_sbatch_and_submitit_ask_for_the_same_resources(tmp_path, shape, monkeypatch):
    """One mapping from slurm.* to the request: submitit's own sbatch file holds the same options."""
    import submitit

    if shutil.which("srun") is None:  # submitit only looks for srun before it writes its sbatch file
        stub = tmp_path / "bin" / "srun"
        stub.parent.mkdir()
        stub.write_text("#!/bin/sh\nexit 1\n")
        stub.chmod(0o755)
        monkeypatch.setenv("PATH", f"{stub.parent}{os.pathsep}{os.environ['PATH']}")

    from shardinfer.launch.slurm import reduce_request, submitit_parameters, worker_request

    cfg = cluster_cfg(shape=shape, array_parallelism=3, reduce_mem_gb=32, requeue=False, signal_grace_s=120)
    lay = layout(cfg)
    ours = render_scripts(cfg, lay, run_dir="/r", launch=0, python="py")
    for request, script in ((worker_request(cfg, lay), ours.worker), (reduce_request(cfg), ours.reduce)):
        executor = submitit.AutoExecutor(folder=tmp_path, cluster="slurm")
        executor.update_parameters(**submitit_parameters(request))
        if request.array_tasks:
            executor._executor.parameters["map_count"] = request.array_tasks
        theirs = _sbatch_options(executor._executor._make_submission_file_text("cmd", "uid"))
        mine = _sbatch_options(script)
        if "ntasks" in mine:  # the reduce job: one task, spelled per node by submitit
            mine["ntasks-per-node"] = mine.pop("ntasks")
        mine.pop("output"), mine.pop("array", None), theirs.pop("array", None)
        if "mem" in mine:
            assert theirs.pop("mem") == mine.pop("mem") + "B"  # 400G and 400GB
        if "signal" in mine:  # sbatch signals the batch shell, submitit the tasks: both drain
            assert theirs.pop("signal") == mine.pop("signal").removeprefix("B:")
        assert mine.items() <= theirs.items(), (mine, theirs)
    assert "no-requeue" in _sbatch_options(ours.worker) and "exclusive" in _sbatch_options(ours.worker)


def test_dry_run_prints_what_each_launcher_would_submit(tiny_model, caplog):
    import dataclasses

    from shardinfer.launch.start import dry_run

    cfg = cluster_cfg()  # the model must pass the pre-flight checks on this machine: the tiny one
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(tiny_model)))
    mpi = dry_run(cfg, "slurm-mpi", on_cluster=True)
    assert "[ok  ] model.engine_args: 1 argument(s) known to vllm" in mpi
    assert "srun --mpi=pmix" in mpi and "-m shardinfer.launch.mpi" in mpi and "shardinfer.worker" not in mpi
    assert "--launcher slurm-mpi" in mpi and "#SBATCH --nodes=4" in mpi and "no reduce job" in mpi
    assert not caplog.records
    assert dry_run(cfg, "mpi", on_cluster=True) == mpi  # `submit --launcher mpi` of earlier versions
    assert [r.getMessage() for r in caplog.records] == ["launcher name 'mpi' is deprecated: use 'slurm-mpi'"]
    sbatch = dry_run(cfg, "sbatch", on_cluster=True)
    assert "-m shardinfer.worker" in sbatch and "--dependency=afterany:<worker job>" in sbatch
    submitit = dry_run(cfg, "submitit", on_cluster=True)
    assert "'tasks_per_node': 4" in submitit and "'slurm_signal_delay_s': 300" in submitit
    assert "'exclusive': True" in submitit and "'requeue': True" in submitit


# Every value that reaches a batch script, and strings that would run a command if pasted unquoted
# into a shell line or broke an #SBATCH line ({m}: a file the injected command would create).
TEMPLATED = ["slurm.partition", "slurm.account", "slurm.qos", "slurm.constraint", "slurm.extra_sbatch",
             "run.env name", "run.env value", "name", "slurm.python", "run directory"]
HOSTILE = ["gpu\ntouch {m}", "gpu\rtouch {m}", "gpu\0touch {m}", "gpu\\\ntouch {m}", "gpu;touch {m}",
           "gpu && touch {m}", "$(touch {m})", "`touch {m}`", "gpu' ; touch {m} ; echo '",
           'gpu" ; touch {m} ; echo "', "--comment=$(touch {m})"]


def _hostile_config(key, value, **slurm):
    raw = cluster_raw(**{"setup": ["true"], **slurm})
    if key == "run.env name":
        raw["run"]["env"] = {value: "1"}
    elif key == "run.env value":
        raw["run"]["env"] = {"X": value}
    elif key == "name":
        raw["name"] = value
    elif key == "slurm.extra_sbatch":
        raw["slurm"]["extra_sbatch"] = [value, f"--comment={value}"]
    elif key != "run directory":
        section, name = key.split(".")
        raw[section][name] = value
    return config_from_dict(raw)


def _execute(script, tmp_path):
    """Run a rendered script with srun and scontrol stubbed out; returns bash's exit status."""
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    for name in ("srun", "scontrol"):
        (stubs / name).write_text("#!/bin/sh\nexit 0\n")
        (stubs / name).chmod(0o755)
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "HOME": str(tmp_path)}
    return subprocess.run(["bash", str(path)], env=env, capture_output=True, timeout=60, cwd=tmp_path).returncode


def test_the_script_runner_below_runs_the_scripts_lines(tmp_path):
    cfg = _hostile_config("slurm.partition", "gpu")
    scripts = render_scripts(cfg, layout(cfg), run_dir=str(tmp_path / "run"), launch=0, python="true")
    assert _execute(scripts.worker, tmp_path) == 0 and _execute(scripts.reduce, tmp_path) == 0
    marker = tmp_path / "setup-ran"
    cfg = _hostile_config("slurm.partition", "gpu", setup=[f"touch {marker}"])
    _execute(render_scripts(cfg, layout(cfg), run_dir="/r", launch=0, python="true").reduce, tmp_path)
    assert marker.exists()


@pytest.mark.parametrize("hostile", HOSTILE)
@pytest.mark.parametrize("key", TEMPLATED)
def test_hostile_values_are_refused_or_stay_inert_in_the_scripts(tmp_path, key, hostile):
    marker = tmp_path / "owned"
    value = hostile.format(m=marker)
    try:
        cfg = _hostile_config(key, value)
        python = cfg.slurm.python or "true"
        run_dir = value if key == "run directory" else str(tmp_path / "run")
        scripts = render_scripts(cfg, layout(cfg), run_dir=run_dir, launch=0, python=python)
    except ConfigError as exc:
        assert repr(value) in str(exc)
        assert any(c in value for c in "\n\r\0") or key in ("run.env name", "name")
        return
    clean = _hostile_config("slurm.partition", "gpu")
    clean_scripts = render_scripts(clean, layout(clean), run_dir="/r", launch=0, python="true")
    for script, plain in ((scripts.worker, clean_scripts.worker), (scripts.reduce, clean_scripts.reduce)):
        if key != "run.env value":  # a quoted value may hold line breaks; nothing else adds lines
            assert script.count("\n") == plain.count("\n"), script
        _execute(script, tmp_path)
        assert not list(tmp_path.glob("owned*")), script  # touch ran (an env name gives owned=1)
    if key == "run.env value":  # the job sees the value exactly as configured
        body = scripts.reduce.rstrip("\n").rsplit("\n", 1)[0]  # all but the reduce command
        shown = subprocess.run(["bash", "-c", body + '\nprintf %s "$X"'], capture_output=True)
        assert shown.stdout == value.encode()
