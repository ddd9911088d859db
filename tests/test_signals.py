"""Signals and races around a local run, with real processes (the simulation engine: no model, a GPU
that only takes time): SIGTERM drains like Ctrl-C, workers die with a killed launcher, one launcher
per run directory, and results published whole whatever reduces run or die."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CPU_ENV, demo_docs, read_results, run_cli, write_config, write_jsonl

pytestmark = pytest.mark.processes


@pytest.fixture
def sim_env():
    return {**os.environ, **CPU_ENV, "SHARDINFER_PLUGINS": "shardinfer.bench.sim_engine"}


def _config(tmp_path: Path, tiny_model: Path, name: str, docs: int = 48, **run):
    corpus = tmp_path / "docs.jsonl"
    if not corpus.exists():
        write_jsonl(corpus, [{"id": d["id"], "text": d["text"][:3000]} for d in demo_docs(docs)])
    return write_config(tmp_path / f"{name}.yaml", corpus=corpus, model_dir=tiny_model, run_dir=tmp_path / name,
                        input={"path": str(corpus), "id_column": "id"}, model={"engine": "sim", "max_model_len": 4096},
                        sampling={"max_tokens": 200},
                        run={"directory": str(tmp_path / name), "workers": 2, "max_unit_rows": 2, **run})


def _start(config: Path, env: dict[str, str], command: str = "run") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shardinfer.cli", command, str(config)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for_commits(run_dir: Path, n: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(list((run_dir / "done").rglob("unit-*.json"))) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} units committed in {timeout} s")


def _worker_pids(run_dir: Path) -> set[int]:
    return {json.loads(p.read_text())["pid"] for p in (run_dir / "metrics").glob("launch-*-worker-*.json")}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.time() + timeout
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    return {p for p in pids if _alive(p)}


def _ids(run_dir: Path) -> list[str]:
    return [r["id"] for r in read_results(run_dir)]


def test_sigterm_to_run_drains_its_workers_quietly_and_resume_finishes(tmp_path, tiny_model, sim_env):
    config = _config(tmp_path, tiny_model, "term")
    run_dir = tmp_path / "term"
    launcher = _start(config, sim_env)
    _wait_for_commits(run_dir, 2)
    pids = _worker_pids(run_dir)
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 143, err[-3000:]
    assert "terminated (SIGTERM)" in err and "Traceback" not in err
    assert not _wait_gone(pids, 5)
    metrics = [json.loads(p.read_text()) for p in (run_dir / "metrics").glob("*.json")]
    assert all(m["drained_by"] == "SIGTERM" for m in metrics)
    logs = "".join(p.read_text() for p in (run_dir / "logs").glob("*.log"))
    assert "Traceback" not in logs and "KeyboardInterrupt" not in logs
    proc = run_cli(["resume", str(run_dir)], sim_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _ids(run_dir) == [d["id"] for d in demo_docs(48)]


def test_ctrl_c_at_the_terminal_drains_without_a_traceback(tmp_path, tiny_model, sim_env):
    config = _config(tmp_path, tiny_model, "int")
    run_dir = tmp_path / "int"
    launcher = _start(config, sim_env)
    _wait_for_commits(run_dir, 2)
    os.killpg(launcher.pid, signal.SIGINT)  # what a terminal does: the whole foreground process group
    _, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 130 and "interrupted" in err and "Traceback" not in err
    logs = "".join(p.read_text() for p in (run_dir / "logs").glob("*.log"))
    assert "Traceback" not in logs and "KeyboardInterrupt" not in logs


def test_kill_9_of_the_launcher_stops_its_workers_and_resume_is_exact(tmp_path, tiny_model, sim_env):
    config = _config(tmp_path, tiny_model, "orphans")
    run_dir = tmp_path / "orphans"
    launcher = _start(config, sim_env)
    _wait_for_commits(run_dir, 2)
    pids = _worker_pids(run_dir)
    assert len(pids) == 2
    os.kill(launcher.pid, signal.SIGKILL)  # the launcher only: its workers are not in its process group
    launcher.communicate(timeout=30)
    assert not _wait_gone(pids, 10), "workers outlived their launcher"
    proc = run_cli(["resume", str(run_dir)], sim_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _ids(run_dir) == [d["id"] for d in demo_docs(48)]


def _claims(run_dir: Path) -> dict[int, dict]:
    out = {}
    for p in (run_dir / "claims").rglob("unit-*.json"):
        try:
            out[int(p.stem.split("-")[1])] = json.loads(p.read_text())
        except (json.JSONDecodeError, OSError):
            continue  # being written
    return out


def _unfinished_claims(run_dir: Path) -> list[int]:
    """Pids of workers holding a claim on a unit without a done record."""
    done = {int(p.stem.split("-")[1]) for p in (run_dir / "done").rglob("unit-*.json")}
    return [int(c["worker"].split(":")[1]) for u, c in _claims(run_dir).items() if u not in done]


def _wait_stopped(pid: int) -> None:
    for _ in range(100):
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith(("T", "t", "Z")):
                return
        except (OSError, IndexError):
            return
        time.sleep(0.01)


def _kill_a_worker_mid_unit(run_dir: Path, deadline: float) -> int:
    return _signal_a_worker_mid_unit(run_dir, signal.SIGKILL, deadline)


def _signal_a_worker_mid_unit(run_dir: Path, signum: int, deadline: float) -> int:
    """After the first committed unit, freeze a worker; signal it if it is mid-unit, else thaw it."""
    while time.time() < deadline:
        time.sleep(0.05)
        if not (run_dir / "done").is_dir() or not any((run_dir / "done").rglob("unit-*.json")):
            continue
        for pid in set(_unfinished_claims(run_dir)):
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                continue
            _wait_stopped(pid)
            if pid in _unfinished_claims(run_dir):  # frozen while holding an unfinished unit
                os.kill(pid, signum)
                if signum != signal.SIGKILL:
                    os.kill(pid, signal.SIGCONT)
                return pid
            os.kill(pid, signal.SIGCONT)
    raise AssertionError("no worker was found mid-unit")


def _triples(run_dir: Path) -> list[tuple[str, str]]:
    return [(r["id"], r["status"]) for r in read_results(run_dir)]


def test_kill_9_of_a_worker_mid_unit_is_taken_over_in_the_same_run(tmp_path, tiny_model, sim_env):
    run_dir = tmp_path / "killed"
    launcher = _start(_config(tmp_path, tiny_model, "killed", lease_timeout_s=3), sim_env)
    pid = _signal_a_worker_mid_unit(run_dir, signal.SIGKILL, time.time() + 120)
    _, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, err[-3000:]
    assert "exited with signal SIGKILL" in err  # said, not hidden
    assert "died holding units" in err and "given back to the others" in err  # at once, not a lease later
    assert _triples(run_dir) == [(d["id"], "ok") for d in demo_docs(48)]  # every row once
    # the unit it held (its claim set aside by the launcher) was done by the other worker
    held = [int(p.name.split("-")[1].split(".")[0]) for p in (run_dir / "claims").rglob("unit-*.stale-*")
            if json.loads(p.read_text())["worker"].split(":")[1] == str(pid)]
    done = {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in (run_dir / "done").rglob("unit-*.json")}
    assert held and all(done[u]["worker"].split(":")[1] != str(pid) for u in held)


def test_usr2_drains_a_worker_and_the_others_finish(tmp_path, tiny_model, sim_env):
    run_dir = tmp_path / "drained"
    launcher = _start(_config(tmp_path, tiny_model, "drained", lease_timeout_s=3), sim_env)
    pid = _signal_a_worker_mid_unit(run_dir, signal.SIGUSR2, time.time() + 120)
    _, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, err[-3000:]
    assert _triples(run_dir) == [(d["id"], "ok") for d in demo_docs(48)]
    metrics = [json.loads(p.read_text()) for p in (run_dir / "metrics").glob("*.json")]
    drained = [m for m in metrics if m["pid"] == pid]
    assert drained and drained[0]["drained"] and drained[0]["units"] >= 1  # committed what it had
    assert "signal SIGUSR2: finishing the current unit" in err


def test_a_second_launcher_on_a_busy_run_directory_is_refused(tmp_path, tiny_model, sim_env):
    config = _config(tmp_path, tiny_model, "busy")
    run_dir = tmp_path / "busy"
    first, second = _start(config, sim_env), _start(config, sim_env)  # two runs at the same moment
    results = [p.communicate(timeout=300) for p in (first, second)]
    codes = sorted(p.returncode for p in (first, second))
    assert codes == [0, 1], [err[-2000:] for _, err in results]
    refused = next(err for (_, err), p in zip(results, (first, second)) if p.returncode == 1)
    # refused by the launch lock, or (when the first run's workers were done by then) by its launch record
    assert f"{run_dir} is in use: shardinfer pid" in refused or f"{run_dir} is still being run by launch 0" in refused
    assert [r["launch"] for r in json.loads((run_dir / "jobs.json").read_text())] == [0]
    assert _ids(run_dir) == [d["id"] for d in demo_docs(48)]


def test_results_are_published_whole_by_concurrent_and_killed_reduces(tmp_path, tiny_model, sim_env):
    from shardinfer.ledger.rundir import RunDir
    from shardinfer.reduce.result_set import published_problem

    config = _config(tmp_path, tiny_model, "reduce", docs=12)
    run_dir = tmp_path / "reduce"
    assert run_cli(["run", str(config)], sim_env).returncode == 0
    expected = _ids(run_dir)
    both = [subprocess.Popen([sys.executable, "-m", "shardinfer.cli", "reduce", str(run_dir)], env=sim_env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    assert [p.wait(timeout=120) for p in both] == [0, 0]
    assert _ids(run_dir) == expected and published_problem(RunDir(run_dir), 12) is None
    for delay in (0.3, 0.6, 0.9, 1.2, 1.5, 1.8):  # kill -9 at different points of a reduce
        reducer = subprocess.Popen([sys.executable, "-m", "shardinfer.cli", "reduce", str(run_dir)], env=sim_env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(delay)
        reducer.kill()
        reducer.wait()
        assert _ids(run_dir) == expected  # the previous set or the new one, never a part
        assert published_problem(RunDir(run_dir), 12) is None
    assert len(list((run_dir / "results.d").iterdir())) >= 1
    assert run_cli(["reduce", str(run_dir)], sim_env).returncode == 0
    assert len([p for p in (run_dir / "results.d").iterdir() if not p.name.startswith(".")]) == 1  # tidied
    version = (run_dir / "results").resolve()
    next(version.glob("part-*.parquet")).unlink()  # a damaged result set is not called finished
    status = json.loads(run_cli(["status", str(run_dir), "--json"], sim_env).stdout)
    assert not status["finished"] and "missing or unreadable" in status["results_problem"]


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB filesystem of its own (tmpfs; needs root)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * (64 << 10))
                fh.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_is_said_once_without_a_traceback_and_resume_goes_on(tmp_path, tiny_model, sim_env,
                                                                         small_disk):
    config = _config(tmp_path, tiny_model, "full", directory=str(small_disk / "run"))
    run_dir = small_disk / "run"
    launcher = _start(config, sim_env)
    _wait_for_commits(run_dir, 2)
    filler = _fill(small_disk)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 1
    assert f"disk full at {run_dir}" in err and "Traceback" not in err, err[-3000:]
    for command in ("resume", "reduce"):
        proc = run_cli([command, str(run_dir)], sim_env)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert "disk full at" in proc.stderr or "units are not done" in proc.stderr, proc.stderr[-3000:]
    assert not [p for p in run_dir.rglob("*") if ".tmp-" in p.name]  # no temporary file left behind
    filler.unlink()
    proc = run_cli(["resume", str(run_dir)], sim_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _ids(run_dir) == [d["id"] for d in demo_docs(48)]


def test_an_input_edited_during_a_run_stops_it_as_a_config_error_and_restored_it_resumes(tmp_path, tiny_model,
                                                                                         sim_env):
    docs = [{"id": f"d{i}", "text": f"document {i:04d} " + "word " * 500} for i in range(48)]
    corpus = write_jsonl(tmp_path / "docs.jsonl", docs)
    config = _config(tmp_path, tiny_model, "edited", workers=1)
    run_dir = tmp_path / "edited"
    launcher = _start(config, sim_env)
    _wait_for_commits(run_dir, 3)
    st, original = corpus.stat(), corpus.read_bytes()
    corpus.write_bytes(original.replace(b"document 0047", b"document 9999"))  # same size, same time
    os.utime(corpus, ns=(st.st_atime_ns, st.st_mtime_ns))
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 2, err[-3000:]
    assert f"input file {corpus} (read for unit" in err and "changed since the run was planned" in err
    assert "Traceback" not in err
    corpus.write_bytes(original)
    os.utime(corpus, ns=(st.st_atime_ns, st.st_mtime_ns))
    proc = run_cli(["resume", str(run_dir)], sim_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _ids(run_dir) == [d["id"] for d in docs]
