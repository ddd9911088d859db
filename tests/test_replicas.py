"""A model replica across nodes (slurm.nodes_per_replica): its layout, refusals, scripts, ranks, and
the leader-follower link on loopback. No cluster, no engine."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from shardinfer.config import config_from_dict
from shardinfer.engines.registry import Span
from shardinfer.errors import ConfigError, RunError
from shardinfer.launch.env import FROM_ARGUMENTS, FROM_SLURM
from shardinfer.launch.layout import layout, node_map, replica_lines
from shardinfer.launch.replica import Follower, Leader, Place, group_members
from shardinfer.launch.sbatch import SbatchLauncher, SlurmMpiLauncher, render_scripts
from shardinfer.ledger.rundir import RunDir
from test_slurm_render import cluster_raw

SRC = str(Path(__file__).parents[1] / "src")


def cfg_of(*, engine_args=None, engine="vllm", **slurm):
    raw = cluster_raw(**slurm)
    raw["model"]["engine"] = engine
    if engine_args is not None:
        raw["model"]["engine_args"] = engine_args
    return config_from_dict(raw)


# ---- layout and refusals ----

def test_a_replica_of_two_nodes_of_8_gpus_is_one_worker_per_two_nodes():
    cfg = cfg_of(engine_args={"tensor_parallel_size": 8, "pipeline_parallel_size": 2}, nodes_per_replica=2)
    lay = layout(cfg)
    assert (lay.workers, lay.tasks_per_node, lay.gpus_per_task, lay.nodes_per_replica) == (2, 1, 8, 2)
    [line] = replica_lines(cfg, lay)
    assert "16 GPUs" in line and "2 nodes of 8" in line and "4 node(s) -> 2 worker(s)" in line
    scripts = render_scripts(cfg, lay, run_dir="/runs/x", launch=0, python="python")
    assert "#SBATCH --nodes=4\n#SBATCH --ntasks-per-node=1\n" in scripts.worker
    assert "#SBATCH --gpus-per-node=8" in scripts.worker
    assert "--expect-world 2 --gpus-per-replica 8 --nodes-per-replica 2" in scripts.worker


def test_the_array_shape_asks_for_one_replica_of_nodes_per_task():
    cfg = cfg_of(engine_args={"tensor_parallel_size": 16}, nodes_per_replica=2, shape="array")
    lay = layout(cfg)
    scripts = render_scripts(cfg, lay, run_dir="/runs/x", launch=0, python="python")
    assert "#SBATCH --array=0-1\n#SBATCH --nodes=2\n#SBATCH --ntasks=2\n" in scripts.worker
    assert "--nodes-per-replica 2" in scripts.worker
    assert node_map(lay)[0].startswith("# array shape: each of the 2 array task(s) is one replica of 2 nodes")


@pytest.mark.parametrize("slurm,args,expect", [
    ({}, {"tensor_parallel_size": 8, "pipeline_parallel_size": 2},
     "a replica takes 16 GPUs (tensor_parallel_size x pipeline_parallel_size for engine vllm) = 2 nodes of 8 "
     "GPUs: set slurm.nodes_per_replica=2"),
    ({}, {"tensor_parallel_size": 12}, "GPUs per replica (12) is not a multiple of slurm.gpus_per_node (8): a "
     "replica spanning nodes takes whole nodes; make tensor_parallel_size x pipeline_parallel_size 8 or 16"),
    ({"nodes_per_replica": 2}, {"tensor_parallel_size": 12}, "is not a multiple of slurm.gpus_per_node (8)"),
    ({"nodes_per_replica": 2, "nodes": 3}, {"tensor_parallel_size": 16},
     "slurm.nodes (3) is not a multiple of slurm.nodes_per_replica (2): use 2 or 4"),
    ({"nodes_per_replica": 2}, {"tensor_parallel_size": 8}, "set slurm.nodes_per_replica=1"),
    ({"nodes_per_replica": 2}, {"tensor_parallel_size": 32}, "set slurm.nodes_per_replica=4"),
    ({"nodes_per_replica": 2}, {"tensor_parallel_size": 16, "nnodes": 2},
     "model.engine_args.nnodes is set by shardinfer for a replica across nodes: remove it and use "
     "slurm.nodes_per_replica"),
    ({}, {"master_port": 1234}, "model.engine_args.master_port is set by shardinfer"),
    ({"nodes_per_replica": 2, "gpus_per_node": 0}, {"tensor_parallel_size": 1},
     "on CPU nodes runs one vLLM process per node: set model.engine_args.tensor_parallel_size=2"),
    ({"nodes_per_replica": 2, "gpus_per_node": 0}, {"pipeline_parallel_size": 2},
     "vLLM's CPU build cannot run pipeline stages in separate processes"),
    ({"nodes_per_replica": 2, "gpus_per_node": 0, "cpu_workers_per_node": 2}, {"tensor_parallel_size": 2},
     "slurm.cpu_workers_per_node (2): a replica spanning nodes takes whole nodes; set it to 1"),
])
def test_layouts_that_cannot_work_are_refused_with_the_fix(slurm, args, expect):
    with pytest.raises(ConfigError) as err:
        layout(cfg_of(engine_args=args, **slurm))
    assert expect in str(err.value)


def test_an_engine_that_cannot_span_nodes_is_refused():
    with pytest.raises(ConfigError, match="engine hf cannot span nodes .* set model.engine=vllm, or "
                                          "slurm.nodes_per_replica=1"):
        layout(cfg_of(engine="hf", engine_args={}, nodes_per_replica=2, gpus_per_node=0))


def test_the_slurm_mpi_launcher_refuses_replicas_across_nodes():
    cfg = cfg_of(engine_args={"tensor_parallel_size": 16}, nodes_per_replica=2)
    with pytest.raises(ConfigError, match="use --launcher sbatch or submitit"):
        SlurmMpiLauncher().check(cfg)


def test_the_dry_run_shows_which_node_runs_what(tmp_path):
    cfg = cfg_of(engine_args={"tensor_parallel_size": 16}, nodes_per_replica=2)
    text = SbatchLauncher().preview(cfg, RunDir(tmp_path / "run"))
    assert "# job node 0: replica 0 leader   - shardinfer worker rank 0, engine node_rank 0 (LLM, scheduler), " \
           "GPUs 0-7" in text
    assert "# job node 1: replica 0 follower - engine node_rank 1, GPUs 0-7; stops with its leader" in text
    assert "# job node 3: replica 1 follower" in text


# ---- ranks ----

def test_slurm_tasks_of_one_replica_share_its_rank():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"}
    r = FROM_SLURM.find(env, launcher="sbatch", nodes_per_replica=2)
    assert (r.rank, r.world, r.replica_node, r.replica_nodes, r.tasks_in_job) == (1, 2, 1, 2, 2)
    array = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "6", "SLURM_ARRAY_TASK_MIN": "0",
             "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    r = FROM_SLURM.find(array, launcher="sbatch", nodes_per_replica=2)
    assert (r.rank, r.world, r.replica_node, r.tasks_in_job) == (5, 6, 0, 1)
    with pytest.raises(RunError, match="3 tasks cannot hold replicas of 2 nodes"):
        FROM_SLURM.find({"SLURM_PROCID": "0", "SLURM_NTASKS": "3"}, launcher="sbatch", nodes_per_replica=2)
    with pytest.raises(RunError, match="submit with --launcher sbatch or submitit"):
        FROM_ARGUMENTS.find({}, launcher="local", nodes_per_replica=2)


# ---- the link ----

@pytest.fixture
def place(tmp_path):
    run_dir = RunDir(tmp_path)
    run_dir.slurm.mkdir(parents=True)
    return run_dir, Place(replica=0, node=0, nodes=2, job="1-0")


def _follower(run_dir, place, **kw):
    return Follower(run_dir, Place(place.replica, 1, place.nodes, place.job), Path("f.log"), **kw)


def _joined(run_dir, place, **kw):
    leader = Leader(run_dir, place, ["node1", "node2"], **kw)
    lost = []
    leader.on_lost = lost.append
    span = leader.open()
    follower = _follower(run_dir, place)
    got = {}
    thread = threading.Thread(target=lambda: got.setdefault("span", follower.connect(5)))
    thread.start()
    leader.wait_followers(5)
    thread.join()
    assert got["span"] == Span(nodes=2, node=1, master_addr=span.master_addr, master_port=span.master_port)
    return leader, follower, lost


def _until(check, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_follower_that_closes_its_link_is_lost_at_once_and_bye_reaches_the_followers(place):
    run_dir, p = place
    leader, follower, lost = _joined(run_dir, p)
    assert follower.peer is not None
    follower.peer.sock.close()  # what a killed process's socket does
    _until(lambda: lost)
    assert lost == ["follower node2 (replica node 1) gone (connection closed)"]

    leader, follower, lost = _joined(run_dir, Place(1, 0, 2, "1-0"))
    ended = []
    follower.watch(on_bye=lambda: ended.append("bye"), on_lost=ended.append)
    leader.bye()
    _until(lambda: ended)
    assert ended == ["bye"] and not lost


def test_a_silent_follower_is_lost_and_a_failed_one_names_its_error_and_log(place):
    run_dir, p = place
    leader, follower, lost = _joined(run_dir, p, silence_s=1.0)  # the follower never beats: it did not watch
    _until(lambda: lost)
    assert lost == ["follower node2 (replica node 1) silent for 1 s"]

    leader, follower, lost = _joined(run_dir, Place(1, 0, 2, "1-0"))
    follower.failed("RuntimeError: out of memory")
    _until(lambda: lost)
    assert "node2 (replica node 1) failed: RuntimeError: out of memory; its log: " in lost[0]
    assert lost[0].endswith("logs/worker-00001.node1.log")


def test_followers_that_never_come_up_fail_the_start_naming_the_node_and_its_log(place):
    run_dir, p = place
    leader = Leader(run_dir, p, ["node1", "node2"])
    leader.open()
    start = time.monotonic()
    with pytest.raises(RunError) as err:
        leader.wait_followers(2)
    assert time.monotonic() - start < 10
    assert ("replica 0 did not start: node2 (replica node 1) did not come up within 2 s; its log: "
            f"{run_dir.logs}/worker-00000.node1.log") in str(err.value)
    _follower(run_dir, Place(1, 0, 2, "1-0")).failed("ConfigError: no GPU")  # before it could connect
    leader = Leader(run_dir, Place(1, 0, 2, "1-0"), ["node3", "node4"])
    leader.open()
    with pytest.raises(RunError, match=r"node4 \(replica node 1\) failed: ConfigError: no GPU; its log"):
        leader.wait_followers(5)


REAPED = f"""
import os, subprocess, sys, time
sys.path.insert(0, {SRC!r})
from shardinfer.launch.replica import lead_own_group, start_reaper
assert lead_own_group()
start_reaper()
child = subprocess.Popen(["sleep", "300"])
print(os.getpid(), child.pid, flush=True)
time.sleep(300)
"""


def test_engine_processes_die_with_their_runner_even_by_sigkill():
    proc = subprocess.Popen([sys.executable, "-c", REAPED], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    runner, child = map(int, proc.stdout.readline().split())
    assert child in group_members(runner)
    os.kill(runner, signal.SIGKILL)
    proc.wait()
    _until(lambda: not group_members(runner), timeout=10)


def test_the_link_carries_json_lines():
    a, b = socket.socketpair()
    from shardinfer.launch.replica import Peer
    Peer(a, "x").send("hello", node=1)
    assert Peer(b, "y").receive(1.0) == {"type": "hello", "node": 1}


def test_plan_says_what_a_replica_takes_and_refuses_what_cannot_work(tmp_path):
    from conftest import run_cli

    config = tmp_path / "big.yaml"
    config.write_text(json.dumps(cluster_raw(nodes=4, gpus_per_node=8)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, str(Path(__file__).parent)])}
    proc = run_cli(["plan", str(config), "model.engine_args.tensor_parallel_size=16", "--launcher", "sbatch"], env)
    assert proc.returncode == 2
    assert "= 2 nodes of 8 GPUs: set slurm.nodes_per_replica=2" in proc.stderr
    proc = run_cli(["plan", str(config), "model.engine_args.tensor_parallel_size=16", "slurm.nodes=3",
                    "slurm.nodes_per_replica=2"], env)
    assert proc.returncode == 2
    assert "slurm.nodes (3) is not a multiple of slurm.nodes_per_replica (2): use 2 or 4" in proc.stderr


def test_bye_waits_for_the_followers_to_close_and_tells_a_frozen_one(place):
    run_dir, p = place
    leader, follower, _ = _joined(run_dir, p)
    follower.watch(on_bye=lambda: follower.peer.sock.close(), on_lost=lambda reason: None)
    assert leader.bye(wait_s=5) is True
    leader, follower, _ = _joined(run_dir, Place(1, 0, 2, "1-0"), silence_s=1.0)  # a follower that never answers
    start = time.monotonic()
    assert leader.bye(wait_s=3) is False and leader.unreachable
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("value", ["abc", "0", "-3", "nan", "1\nrm -rf /"])
def test_a_time_limit_that_is_not_seconds_is_a_config_error(monkeypatch, value):
    from shardinfer.errors import ConfigError
    from shardinfer.launch.replica import SILENCE_VAR, START_VAR, silence_timeout_s, start_timeout_s

    for var, read in ((SILENCE_VAR, silence_timeout_s), (START_VAR, start_timeout_s)):
        monkeypatch.setenv(var, value)
        with pytest.raises(ConfigError, match=f"{var}=.*give a number of seconds above 0"):
            read()
    monkeypatch.setenv(SILENCE_VAR, "12")
    assert silence_timeout_s() == 12.0
