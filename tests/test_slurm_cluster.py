"""Against a real 2-node SLURM cluster (accounting, fake GPUs) that these tests bring up themselves.

Each test runs its own jobs in its own directory, so pytest-xdist may spread the tests over its
workers: each worker that runs some starts its own cluster (once), and no test sees another's jobs."""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import (
    demo_docs,
    openai_batch_config,
    openai_output,
    read_results,
    run_cli,
    shared_once,
    write_config,
    write_jsonl,
)

CLUSTER = Path(__file__).parent / "cluster"
pytestmark = [pytest.mark.engine, pytest.mark.cluster]


@pytest.fixture(scope="session")
def cluster_env(engine_env):
    """Start the cluster (installing SLURM if needed), yield an environment that reaches it, stop it."""
    directory = Path(tempfile.mkdtemp(prefix="si-slurm-", dir="/tmp"))  # short: munge socket path limit
    directory.chmod(0o755)  # munged wants every directory above its socket searchable
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    for attempt in range(3):  # ports apart from the other xdist worker's cluster; another if taken
        block = ((os.getpid() + 7 * attempt) % 50) * 2 + worker % 2
        env = {**engine_env, "SLURM_TEST_PORT": str(20000 + block * 200)}
        up = subprocess.run(["bash", str(CLUSTER / "slurm-up.sh"), str(directory)], env=env, capture_output=True,
                            text=True, timeout=900)
        if up.returncode == 0 or "already in use" not in up.stderr:
            break
    if up.returncode != 0:
        pytest.fail(f"the test cluster did not start:\n{up.stderr[-4000:]}")
    exports = dict(line.removeprefix("export ").split("=", 1) for line in up.stdout.splitlines()
                   if line.startswith("export "))
    yield {**env, **exports}
    subprocess.run(["bash", str(CLUSTER / "slurm-down.sh"), str(directory), "--purge"], env=env,
                   capture_output=True, timeout=300)


@pytest.fixture
def job(small_job, tmp_path):
    """A small job, its results from a local run to compare the cluster runs with, and this test's
    own directory."""
    config, local = small_job
    return config, tmp_path, local


def _outputs(run_dir: Path) -> list[tuple]:
    return [(r["id"], r["status"], r["output"]) for r in read_results(run_dir)]


def _report(run_dir: Path) -> dict:
    return json.loads((run_dir / "report.json").read_text())


def _sacct_times(env: dict, *job_ids: str) -> dict[str, tuple[str, str]]:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", ",".join(job_ids), "-o", "JobID,Start,End"], env=env,
                         capture_output=True, text=True, check=True).stdout
    return {j.split("_")[0]: (s, e) for j, s, e in (line.split("|") for line in out.splitlines())}


def test_two_node_job_then_reduce_matches_a_local_run(cluster_env, job):
    config, tmp, local = job
    run_dir = tmp / "two-nodes"
    proc = run_cli(["submit", str(config), "slurm.nodes=2", f"run.directory={run_dir}", "--wait"], cluster_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "worker job:" in proc.stdout and "reduce job:" in proc.stdout
    assert _outputs(run_dir) == local
    report = _report(run_dir)
    assert sorted(w["host"] for w in report["workers"]) == ["node1", "node2"]
    assert {w["rank"] for w in report["workers"]} == {0, 1}
    [record] = json.loads((run_dir / "jobs.json").read_text())
    times = _sacct_times(cluster_env, record["worker_job"], record["reduce_job"])
    assert times[record["reduce_job"]][0] >= times[record["worker_job"]][1]  # reduce started after the workers
    script = (run_dir / "slurm" / "launch-000-worker.sbatch").read_text()
    assert "#SBATCH --nodes=2" in script and "--expect-world 2" in script
    status = run_cli(["status", str(run_dir)], cluster_env)
    assert status.returncode == 0, status.stderr
    assert f"worker job {record['worker_job']} COMPLETED, reduce job {record['reduce_job']} COMPLETED" in status.stdout
    assert "units: " in status.stdout and "(finished: results and report written)" in status.stdout


def test_array_of_workers_with_one_fake_gpu_each(cluster_env, job):
    config, tmp, local = job
    run_dir = tmp / "array"
    proc = run_cli(["submit", str(config), "slurm.shape=array", "slurm.gpus_per_node=2",
                    f"run.directory={run_dir}", "--wait"], cluster_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _outputs(run_dir) == local
    metrics = [json.loads(p.read_text()) for p in (run_dir / "metrics").glob("*.json")]
    assert sorted(m["gpus"] for m in metrics) == ["0", "1"]  # each task pinned to its own GPU
    assert {m["launcher"] for m in metrics} == {"sbatch"}
    assert "#SBATCH --array=0-1" in (run_dir / "slurm" / "launch-000-worker.sbatch").read_text()


def test_submitit_from_python_returns_the_report(cluster_env, job):
    config, tmp, local = job
    run_dir = tmp / "submitit"
    example = Path(__file__).parents[1] / "jobs" / "submitit_example.py"
    proc = subprocess.run([sys.executable, str(example), str(config), "slurm.nodes=2", f"run.directory={run_dir}"],
                          env=cluster_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["rows"]["in"] == len(local) and report["rows"]["failed"] == 0
    assert sorted(w["host"] for w in report["workers"]) == ["node1", "node2"]
    assert _outputs(run_dir) == local


@pytest.mark.parametrize("override,expect", [
    ("slurm.nodes=3", "Requested node configuration is not available"),
    ("slurm.partition=nope", "invalid partition"),
])
def test_impossible_requests_fail_at_once_with_the_fix(cluster_env, job, override, expect):
    config, tmp, _ = job
    run_dir = tmp / f"bad-{override.split('=')[1]}"
    before = _job_ids(cluster_env)
    proc = run_cli(["submit", str(config), override, f"run.directory={run_dir}"], cluster_env)
    assert proc.returncode == 1
    assert expect in proc.stderr.lower() or expect in proc.stderr
    assert "Nothing was submitted" in proc.stderr and "Fix:" in proc.stderr
    assert not (_job_ids(cluster_env) - before), "a job was submitted"
    assert not run_dir.exists()


def test_an_openai_batch_file_on_two_nodes_gives_the_local_output_file(cluster_env, job, tiny_model,
                                                                       openai_batch_local):
    _, tmp, _ = job
    config = openai_batch_config(tmp, tiny_model, "openai-sbatch")
    proc = run_cli(["submit", str(config), "slurm.nodes=2", "slurm.cpus_per_task=1", "slurm.time_min=10",
                    "slurm.reduce_time_min=10", "slurm.reduce_cpus=1", "run.env.OMP_NUM_THREADS=1", "--wait"],
                   cluster_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert openai_output(tmp / "openai-sbatch") == openai_batch_local


def test_submit_dry_run_catches_a_bad_engine_argument_without_a_job(cluster_env, job):
    config, tmp, _ = job
    before = _job_ids(cluster_env)
    for dry in (["--dry-run"], []):
        proc = run_cli(["submit", str(config), *dry, "model.engine_args.tensor_paralel_size=1",
                        f"run.directory={tmp / 'typo'}"], cluster_env)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "model.engine_args" in proc.stderr and "did you mean tensor_parallel_size" in proc.stderr
    assert not (_job_ids(cluster_env) - before) and not (tmp / "typo").exists()


def _job_ids(env) -> set[str]:
    """Every job the cluster knows of, whatever its state (earlier tests' jobs may still be finishing)."""
    out = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i"], env=env, capture_output=True, text=True).stdout
    return set(out.split())


# The interruption tests (scancel, requeue, more nodes, submitit's USR2) are about launching, requeuing
# and resuming, not the engine: their job runs on the simulation engine (a plugin that sleeps as long as
# a real engine would take), so it lasts long enough to interrupt while using almost no CPU. The plugin
# is named in the submitting process's environment and in run.env, which every job step exports.
SIM = {"SHARDINFER_PLUGINS": "shardinfer.bench.sim_engine"}


@pytest.fixture(scope="session")
def long_reference(tmp_path_factory, tiny_model, engine_env):
    """A job long enough to interrupt on the cluster (about 113k tokens: 14 s of the simulation engine on
    two workers), and its outputs from a local run (once per session)."""
    def make(tmp):
        docs = demo_docs(100, offset=60)
        corpus = write_jsonl(tmp / "docs.jsonl", [{"id": d["id"], "text": d["text"]} for d in docs])
        config = write_config(tmp / "long.yaml", corpus=corpus, model_dir=tiny_model, run_dir=tmp / "local",
                              input={"path": str(corpus), "id_column": "id"},
                              model={"engine": "sim", "max_model_len": 4096},
                              sampling={"max_tokens": 96, "ignore_eos": True},
                              run={"directory": str(tmp / "local"), "workers": 1, "unit_tokens": 4000,
                                   "lease_timeout_s": 5, "env": {"OMP_NUM_THREADS": "1", **SIM}},
                              slurm={"nodes": 2, "cpus_per_task": 1, "time_min": 10, "reduce_time_min": 10,
                                     "reduce_cpus": 1})
        proc = run_cli(["run", str(config), "run.workers=4"], {**engine_env, **SIM})  # the same rows, sooner
        assert proc.returncode == 0, proc.stderr[-3000:]

    tmp = shared_once(tmp_path_factory, "cluster-long", make)
    return tmp / "long.yaml", _outputs(tmp / "local")


@pytest.fixture
def long_job(long_reference, tmp_path):
    config, local = long_reference
    return config, tmp_path, local


@pytest.fixture
def sim_cluster_env(cluster_env):
    """The cluster's environment, the simulation engine registered."""
    return {**cluster_env, **SIM}


def _submit_and_wait_for_progress(config, run_dir: Path, env: dict) -> dict:
    proc = run_cli(["submit", str(config), f"run.directory={run_dir}"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    deadline = time.time() + 300
    while time.time() < deadline:
        if len(list((run_dir / "done").rglob("unit-*.json"))) >= 2:
            return json.loads((run_dir / "jobs.json").read_text())[-1]
        time.sleep(0.1)
    raise AssertionError("the job made no progress")


def _wait_gone(env: dict, *job_ids: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids)], env=env, capture_output=True,
                             text=True).stdout
        if not out.strip():
            return
        time.sleep(0.2)
    raise AssertionError(f"jobs {job_ids} still queued")


def test_scancel_mid_run_then_resume_resubmits_only_what_is_left(sim_cluster_env, long_job):
    config, tmp, local = long_job
    run_dir = tmp / "cancelled"
    jobs = _submit_and_wait_for_progress(config, run_dir, sim_cluster_env)
    subprocess.run(["scancel", jobs["worker_job"]], env=sim_cluster_env, check=True)
    _wait_gone(sim_cluster_env, jobs["worker_job"], jobs["reduce_job"])
    done_before = len(list((run_dir / "done").rglob("unit-*.json")))
    assert not (run_dir / "results").exists()  # the reduce job found units missing
    proc = run_cli(["resume", str(run_dir)], sim_cluster_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "worker job:" in proc.stdout  # resubmitted with the run's launcher (sbatch)
    record = json.loads((run_dir / "jobs.json").read_text())[-1]
    assert record["launch"] == 1
    _wait_gone(sim_cluster_env, record["worker_job"], record["reduce_job"])
    assert _outputs(run_dir) == local
    redone = [json.loads(p.read_text()) for p in (run_dir / "done").rglob("unit-*.json")]
    assert sum(r["launch"] == 0 for r in redone) == done_before  # finished units were not redone


@pytest.mark.parametrize("how", ["usr2-signal", "scontrol-requeue"])
def test_a_requeued_job_continues_by_itself(sim_cluster_env, long_job, how):
    config, tmp, local = long_job
    run_dir = tmp / how
    jobs = _submit_and_wait_for_progress(config, run_dir, sim_cluster_env)
    if how == "usr2-signal":  # what SLURM sends --signal=B:USR2@grace before the time limit
        subprocess.run(["scancel", "--signal=USR2", "--batch", jobs["worker_job"]], env=sim_cluster_env, check=True)
    else:
        subprocess.run(["scontrol", "requeue", jobs["worker_job"]], env=sim_cluster_env, check=True)
    _wait_gone(sim_cluster_env, jobs["worker_job"], jobs["reduce_job"])
    assert _outputs(run_dir) == local
    metrics = [json.loads(p.read_text()) for p in (run_dir / "metrics").glob("*.json")]
    assert {m["restart"] for m in metrics} == {0, 1}  # the same job ran twice
    if how == "usr2-signal":
        assert all(m["drained"] for m in metrics if m["restart"] == 0)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["rows"]["in"] == len(local) and report["launches"] == 2


def test_mpi_job_over_srun_pmix_on_two_nodes_plans_infers_and_reduces(cluster_env, job):
    config, tmp, local = job
    run_dir = tmp / "mpi"
    proc = run_cli(["submit", str(config), "--launcher", "slurm-mpi", "slurm.nodes=2", f"run.directory={run_dir}",
                    "--wait"], cluster_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _outputs(run_dir) == local
    report = _report(run_dir)
    assert sorted(w["host"] for w in report["workers"]) == ["node1", "node2"]
    metrics = [json.loads(p.read_text()) for p in (run_dir / "metrics").glob("*.json")]
    assert {m["launcher"] for m in metrics} == {"slurm-mpi"}
    script = (run_dir / "slurm" / "launch-000-mpi.sbatch").read_text()
    assert "srun --mpi=pmix" in script and "shardinfer.launch.mpi" in script
    [record] = json.loads((run_dir / "jobs.json").read_text())
    assert record["launcher"] == "slurm-mpi" and record["worker_job"] == record["reduce_job"]  # one allocation


def test_resubmitting_with_more_nodes_continues_the_same_run(sim_cluster_env, long_job):
    """slurm.* settings do not change results: a run cancelled on one node finishes on two."""
    config, tmp, local = long_job
    run_dir = tmp / "widened"
    proc = run_cli(["submit", str(config), "slurm.nodes=1", f"run.directory={run_dir}"], sim_cluster_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = json.loads((run_dir / "jobs.json").read_text())[-1]
    deadline = time.time() + 300
    while len(list((run_dir / "done").rglob("unit-*.json"))) < 2 and time.time() < deadline:
        time.sleep(0.1)
    subprocess.run(["scancel", first["worker_job"]], env=sim_cluster_env, check=True)
    _wait_gone(sim_cluster_env, first["worker_job"], first["reduce_job"])
    done_before = len(list((run_dir / "done").rglob("unit-*.json")))
    proc = run_cli(["submit", str(config), "slurm.nodes=2", f"run.directory={run_dir}", "--wait"], sim_cluster_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "continuing the run" in proc.stderr
    second = json.loads((run_dir / "jobs.json").read_text())[-1]
    assert second["launch"] == 1
    assert "#SBATCH --nodes=2" in (run_dir / "slurm" / "launch-001-worker.sbatch").read_text()
    assert _outputs(run_dir) == local
    records = [json.loads(p.read_text()) for p in (run_dir / "done").rglob("unit-*.json")]
    assert sum(r["launch"] == 0 for r in records) == done_before  # finished units were kept
    hosts = {m["host"] for p in (run_dir / "metrics").glob("launch-001-*.json") for m in [json.loads(p.read_text())]}
    assert hosts == {"node1", "node2"}


SUBMIT = """
import json, sys, shardinfer
handle = shardinfer.submit(sys.argv[1], launcher="submitit", overrides=sys.argv[2:])
print(json.dumps(handle.job_ids))
"""


def test_submitit_jobs_drain_on_usr2_and_requeue_themselves(sim_cluster_env, long_job):
    """submitit honours slurm.signal_grace_s and slurm.requeue as sbatch does: the tasks drain, the
    job is requeued, and it finishes by itself."""
    config, tmp, local = long_job
    run_dir = tmp / "submitit-usr2"
    proc = subprocess.run([sys.executable, "-c", SUBMIT, str(config), f"run.directory={run_dir}"], env=sim_cluster_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    worker_job, reduce_job = json.loads(proc.stdout.strip().splitlines()[-1])
    script = next((run_dir / "submitit").glob(f"{worker_job}/*_submission.sh")).read_text()
    assert "#SBATCH --signal=USR2@300" in script and "#SBATCH --requeue" in script
    deadline = time.time() + 300
    while len(list((run_dir / "done").rglob("unit-*.json"))) < 2 and time.time() < deadline:
        time.sleep(0.1)
    # what submitit asks SLURM to send before the time limit: USR2 to the tasks (not the batch shell)
    subprocess.run(["scancel", "--signal=USR2", worker_job], env=sim_cluster_env, check=True)
    _wait_gone(sim_cluster_env, worker_job, reduce_job)
    assert _outputs(run_dir) == local
    metrics = [json.loads(p.read_text()) for p in (run_dir / "metrics").glob("*.json")]
    assert {m["restart"] for m in metrics} == {0, 1}
    assert all(m["drained_by"] == "SIGUSR2" for m in metrics if m["restart"] == 0)
    assert (run_dir / "slurm" / f"drained-{worker_job}-0").is_dir()


def test_a_classify_job_on_two_nodes_gives_every_row_its_probabilities(cluster_env, tmp_path):
    """A pooling task through sbatch on both nodes (transformers engine): every row once, with the
    probabilities transformers gives for the same text."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from conftest import DEMO_CORPUS
    from shardinfer.models.tiny import build_tiny_model

    model = build_tiny_model(tmp_path / "classifier", corpus_path=DEMO_CORPUS, kind="classifier")
    docs = [{"id": d["id"], "text": d["text"][:400]} for d in demo_docs(24)]
    docs[3]["text"] = ""  # fails alone
    corpus = write_jsonl(tmp_path / "docs.jsonl", docs)
    config = write_config(tmp_path / "classify.yaml", corpus=corpus, model_dir=model, run_dir=tmp_path / "run",
                          task="classify", input={"path": str(corpus), "id_column": "id"}, prompt={"system": None},
                          model={"engine": "hf"}, run={"directory": str(tmp_path / "run"), "max_unit_rows": 4},
                          slurm={"nodes": 2, "cpus_per_task": 1, "time_min": 10, "reduce_time_min": 10,
                                 "reduce_cpus": 1})
    proc = run_cli(["submit", str(config), "--wait"], cluster_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_results(tmp_path / "run")
    assert [r["id"] for r in rows] == [d["id"] for d in docs]
    assert rows[3]["status"] == "failed" and rows[3]["error"].startswith("empty_text")
    assert {w["host"] for w in _report(tmp_path / "run")["workers"]} == {"node1", "node2"}
    tokenizer = AutoTokenizer.from_pretrained(model)
    classifier = AutoModelForSequenceClassification.from_pretrained(model, dtype=torch.float32).eval()
    for doc, row in zip(docs, rows):
        if row["status"] == "failed":
            continue
        with torch.inference_mode():
            probs = classifier(**tokenizer(doc["text"], return_tensors="pt")).logits[0].softmax(-1).tolist()
        assert max(abs(a - b) for a, b in zip(row["probs"].values(), probs)) < 1e-4
        assert row["label"] == max(row["probs"], key=row["probs"].get)


# A replica across the two nodes (slurm.nodes_per_replica=2). vLLM's CPU build runs tensor parallel 2 as
# one process per node (mp executor, gloo over loopback); pipeline parallel fails there (its CPU model
# runner keeps no intermediate tensors between stages).
SPAN = ["slurm.nodes=2", "slurm.nodes_per_replica=2"]
VLLM_SPAN = [*SPAN, "model.engine_args.tensor_parallel_size=2", "run.env.VLLM_CPU_OMP_THREADS_BIND=nobind",
             "run.env.OMP_NUM_THREADS=1"]


def _replica_runners(run_dir: Path) -> set[int]:
    """The pids of the replica's runners (leaders from the rendezvous, followers from their hello):
    each leads the process group of its node's engine processes."""
    pids = {json.loads(p.read_text())["pid"] for p in (run_dir / "slurm" / "replicas").rglob("replica-*.json")}
    for log in (run_dir / "logs").glob("worker-*.log"):
        pids |= {int(pid) for pid in re.findall(r"said hello \(pid (\d+)", log.read_text())}
    return pids


def _left_over(pids: set[int]) -> list[int]:
    from shardinfer.launch.replica import group_members

    return [member for pid in pids for member in group_members(pid)]


def _follower_pid(run_dir: Path, timeout: float = 300) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        log = run_dir / "logs" / "worker-00000.log"
        found = re.findall(r"said hello \(pid (\d+)", log.read_text()) if log.is_file() else []
        if found:
            return int(found[-1])
        time.sleep(0.2)
    raise AssertionError("no follower said hello")


def _wait_units(run_dir: Path, n: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while len(list((run_dir / "done").rglob("unit-*.json"))) < n:
        assert time.time() < deadline, "the job made no progress"
        time.sleep(0.1)


def _resume_and_wait(run_dir: Path, env: dict) -> None:
    proc = run_cli(["resume", str(run_dir)], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((run_dir / "jobs.json").read_text())[-1]
    _wait_gone(env, record["worker_job"], record["reduce_job"])


def test_one_replica_across_two_nodes_matches_a_local_run(cluster_env, job):
    """Real vLLM, tensor parallel 2 over node1 and node2, job shape: the outputs of a one-node run."""
    config, tmp, local = job
    run_dir = tmp / "span"
    proc = run_cli(["submit", str(config), *VLLM_SPAN, f"run.directory={run_dir}", "--wait"], cluster_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _outputs(run_dir) == local
    [worker] = _report(run_dir)["workers"]
    assert worker["host"] == "node1" and worker["rank"] == 0 and worker["replica_hosts"] == ["node1", "node2"]
    follower_log = (run_dir / "logs" / "worker-00000.node1.log").read_text()
    assert "joined the leader on node1" in follower_log and "the leader ended its worker" in follower_log
    leader_log = (run_dir / "logs" / "worker-00000.log").read_text()
    assert "follower node2 (replica node 1) said hello" in leader_log and "'nnodes': 2" in leader_log
    assert not _left_over(_replica_runners(run_dir))


def test_a_killed_follower_stops_its_replica_and_a_resume_in_the_array_shape_finishes(cluster_env, job):
    """Real vLLM, array shape: kill -9 of the follower's runner mid-run stops the leader within a
    minute (its units given back, no engine process left on either node); a resume finishes with
    every row once, as in a one-node run."""
    config, tmp, local = job
    run_dir = tmp / "span-killed"
    proc = run_cli(["submit", str(config), *VLLM_SPAN, "slurm.shape=array", "run.max_unit_rows=3",
                    f"run.directory={run_dir}"], cluster_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((run_dir / "jobs.json").read_text())[-1]
    follower = _follower_pid(run_dir)
    leader_log = run_dir / "logs" / "worker-00000.log"
    deadline = time.time() + 300
    while not list((run_dir / "claims").rglob("unit-*.json")):  # units claimed: their rows go to the engine
        assert time.time() < deadline, "no unit was claimed"
        time.sleep(0.02)
    os.kill(follower, 9)
    killed = time.time()
    _wait_gone(cluster_env, record["worker_job"], timeout=60)
    assert time.time() - killed < 60
    text = leader_log.read_text()
    assert "follower node2 (replica node 1) gone (connection closed); stopping the replica" in text
    assert re.search(r"units given back: \[\d", text), text[-3000:]
    assert len(list((run_dir / "done").rglob("unit-*.json"))) < 10
    runners = _replica_runners(run_dir)
    assert not _left_over(runners)
    _wait_gone(cluster_env, record["reduce_job"])
    assert not (run_dir / "results").exists()
    _resume_and_wait(run_dir, cluster_env)
    assert _outputs(run_dir) == local
    assert not _left_over(_replica_runners(run_dir))


@pytest.mark.parametrize("killed", ["follower", "leader"])
def test_a_killed_node_runner_stops_its_whole_replica_within_a_minute(sim_cluster_env, long_job, killed):
    """kill -9 of one side's runner: the other side stops too, no process of either is left (the
    stand-in engine processes included); the follower's death makes the leader give its units back,
    the leader's leaves them to be taken over at the lease. A resume finishes with every row once."""
    config, tmp, local = long_job
    run_dir = tmp / f"sim-span-{killed}-killed"
    proc = run_cli(["submit", str(config), *SPAN, f"run.directory={run_dir}"], sim_cluster_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((run_dir / "jobs.json").read_text())[-1]
    follower = _follower_pid(run_dir)
    [rendezvous] = (run_dir / "slurm" / "replicas").rglob("replica-0.json")
    _wait_units(run_dir, 2)
    os.kill(follower if killed == "follower" else json.loads(rendezvous.read_text())["pid"], 9)
    killed_at = time.time()
    _wait_gone(sim_cluster_env, record["worker_job"], timeout=60)
    assert time.time() - killed_at < 60
    assert not _left_over(_replica_runners(run_dir))
    if killed == "follower":
        leader_log = (run_dir / "logs" / "worker-00000.log").read_text()
        assert re.search(r"units given back: \[\d", leader_log), leader_log[-2000:]
    else:
        follower_log = (run_dir / "logs" / "worker-00000.node1.log").read_text()
        assert "gone (connection closed): stopping this node's engine" in follower_log
    _wait_gone(sim_cluster_env, record["reduce_job"])
    _resume_and_wait(run_dir, sim_cluster_env)
    assert _outputs(run_dir) == local
    assert not _left_over(_replica_runners(run_dir))


def test_scancel_of_an_array_task_of_replicas_then_resume(sim_cluster_env, long_job):
    config, tmp, local = long_job
    run_dir = tmp / "sim-span-array"
    proc = run_cli(["submit", str(config), *SPAN, "slurm.shape=array", f"run.directory={run_dir}"], sim_cluster_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((run_dir / "jobs.json").read_text())[-1]
    assert "#SBATCH --array=0-0\n#SBATCH --nodes=2\n#SBATCH --ntasks=2" in \
        (run_dir / "slurm" / "launch-000-worker.sbatch").read_text()
    _follower_pid(run_dir)
    _wait_units(run_dir, 2)
    subprocess.run(["scancel", f"{record['worker_job']}_0"], env=sim_cluster_env, check=True)
    _wait_gone(sim_cluster_env, record["worker_job"], record["reduce_job"])
    assert not _left_over(_replica_runners(run_dir))
    done_before = len(list((run_dir / "done").rglob("unit-*.json")))
    _resume_and_wait(run_dir, sim_cluster_env)
    assert _outputs(run_dir) == local
    redone = [json.loads(p.read_text()) for p in (run_dir / "done").rglob("unit-*.json")]
    assert sum(r["launch"] == 0 for r in redone) == done_before  # finished units were not redone
    assert not _left_over(_replica_runners(run_dir))


def test_a_usr2_drain_of_a_replica_requeues_and_finishes(sim_cluster_env, long_job):
    """USR2 drains the leader (the follower keeps serving), then the follower exits after bye; the
    job requeues itself and finishes."""
    config, tmp, local = long_job
    run_dir = tmp / "sim-span-usr2"
    proc = run_cli(["submit", str(config), *SPAN, f"run.directory={run_dir}"], sim_cluster_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((run_dir / "jobs.json").read_text())[-1]
    _follower_pid(run_dir)
    _wait_units(run_dir, 2)
    subprocess.run(["scancel", "--signal=USR2", "--batch", record["worker_job"]], env=sim_cluster_env, check=True)
    _wait_gone(sim_cluster_env, record["worker_job"], record["reduce_job"])
    assert _outputs(run_dir) == local
    metrics = [json.loads(p.read_text()) for p in (run_dir / "metrics").glob("*.json")]
    assert {m["restart"] for m in metrics} == {0, 1} and all(m["drained"] for m in metrics if m["restart"] == 0)
    follower_log = (run_dir / "logs" / "worker-00000.node1.log").read_text()
    assert follower_log.count("the leader ended its worker") == 2
    assert not _left_over(_replica_runners(run_dir))


WRAPPER = """#!/bin/bash
# a follower node that never comes up
if [ "$SLURM_NODEID" = 1 ] && [[ " $* " == *" shardinfer.worker "* ]]; then exec sleep 3600; fi
exec {python} "$@"
"""


def test_a_replica_whose_follower_never_comes_up_fails_naming_the_node_and_its_log(sim_cluster_env, long_job):
    config, tmp, _ = long_job
    run_dir = tmp / "sim-span-no-follower"
    wrapper = tmp / "python-wrapper"
    wrapper.write_text(WRAPPER.format(python=sys.executable))
    wrapper.chmod(0o755)
    start = time.time()
    proc = run_cli(["submit", str(config), *SPAN, f"slurm.python={wrapper}", "run.env.SHARDINFER_REPLICA_START_S=20",
                    f"run.directory={run_dir}"], sim_cluster_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((run_dir / "jobs.json").read_text())[-1]
    _wait_gone(sim_cluster_env, record["worker_job"], timeout=120)
    assert time.time() - start < 90
    leader_log = (run_dir / "logs" / "worker-00000.log").read_text()
    assert ("replica 0 did not start: node2 (replica node 1) did not come up within 20 s; its log: "
            f"{run_dir.resolve()}/logs/worker-00000.node1.log") in leader_log
    subprocess.run(["scancel", record["reduce_job"]], env=sim_cluster_env)


def test_a_failed_node_stops_its_replica_and_the_requeued_job_finishes(sim_cluster_env, long_job):
    """node2 fails (set down) mid-run: nothing of the replica is left on either node within a minute;
    the job is requeued, and once node2 is back it finishes with every row once."""
    config, tmp, local = long_job
    run_dir = tmp / "sim-span-node-down"
    proc = run_cli(["submit", str(config), *SPAN, f"run.directory={run_dir}"], sim_cluster_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((run_dir / "jobs.json").read_text())[-1]
    _follower_pid(run_dir)
    _wait_units(run_dir, 2)
    runners = _replica_runners(run_dir)
    scontrol = ["scontrol", "update", "nodename=node2"]
    subprocess.run([*scontrol, "state=down", "reason=test"], env=sim_cluster_env, check=True)
    try:
        deadline = time.time() + 60
        while _left_over(runners):
            assert time.time() < deadline, f"left over: {_left_over(runners)}"
            time.sleep(0.2)
    finally:
        subprocess.run([*scontrol, "state=resume"], env=sim_cluster_env, check=True)
    _wait_gone(sim_cluster_env, record["worker_job"], record["reduce_job"])
    assert _outputs(run_dir) == local
    assert not _left_over(_replica_runners(run_dir))


def test_a_frozen_follower_is_given_up_within_a_minute_and_its_step_cancelled(sim_cluster_env, long_job):
    """A follower that stops answering (SIGSTOP: a hung node SLURM does not see) is lost after its
    silence limit (30 s; 10 s here), while the leader works (it gives its units back) or once it said bye: the leader cancels the
    job step, which only SLURM can stop. Nothing is left; what is missing is redone by a resume."""
    config, tmp, local = long_job
    run_dir = tmp / "sim-span-frozen"
    proc = run_cli(["submit", str(config), *SPAN, f"run.directory={run_dir}", "run.env.SHARDINFER_REPLICA_SILENCE_S=10"],
                   sim_cluster_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((run_dir / "jobs.json").read_text())[-1]
    follower = _follower_pid(run_dir)
    _wait_units(run_dir, 1)
    os.kill(follower, signal.SIGSTOP)
    stopped = time.time()
    _wait_gone(sim_cluster_env, record["worker_job"], timeout=90)
    assert time.time() - stopped < 60
    leader_log = (run_dir / "logs" / "worker-00000.log").read_text()
    assert "cancelling job step" in leader_log
    assert ("follower node2 (replica node 1) silent for 10 s; stopping the replica" in leader_log
            or "a follower did not stop within 12 s of the leader's bye (node2)" in leader_log)
    assert not _left_over(_replica_runners(run_dir))
    _wait_gone(sim_cluster_env, record["reduce_job"])
    if not (run_dir / "results").exists():
        _resume_and_wait(run_dir, sim_cluster_env)
    assert _outputs(run_dir) == local
