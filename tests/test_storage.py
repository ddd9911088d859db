"""Corpora where users keep them: a real S3 API server (moto) on the loopback interface through the
real client stack (s3fs, botocore), compressed files, and directories written by `datasets`."""

import bz2
import gzip
import json
import lzma
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import demo_docs, read_results, run_cli, write_config, write_jsonl
from shardinfer.config import config_from_dict
from shardinfer.errors import ConfigError, MissingDependency
from shardinfer.inputs import reading, storage
from shardinfer.inputs.unit_reader import UnitReader, check_unchanged
from shardinfer.planning.plan import make_plan

BUCKET = "corpus"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moto_server(port: int, **env: str) -> subprocess.Popen:
    """A moto server in a process of its own (in this one, its Flask app's globals would be in the
    modules vLLM scans when it loads in-process later), once it listens on 127.0.0.1:``port``."""
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return server
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise AssertionError("the moto server did not start")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 and the environment that reaches it (as workers inherit it)."""
    port = _free_port()
    server = _moto_server(port)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            import s3fs

            s3fs.S3FileSystem.clear_instance_cache()
            fs = s3fs.S3FileSystem()
            fs.mkdir(BUCKET)
            yield fs, env
    finally:
        server.kill()
        server.wait()


def _docs_table(n, offset=0):
    docs = demo_docs(n, offset=offset)
    return pa.table({"id": [d["id"] for d in docs], "text": [d["text"][:800] for d in docs]})


def _upload(fs, table, key, **kw):
    with fs.open(f"{BUCKET}/{key}", "wb") as fh:
        pq.write_table(table, fh, **kw)


def test_s3_globs_read_like_local_files_and_units_fetch_only_their_ranges(s3, tmp_path, monkeypatch, tiny_model):
    fs, _ = s3
    table = _docs_table(60)
    _upload(fs, table.slice(0, 30), "docs/a.parquet", row_group_size=5)
    _upload(fs, table.slice(30), "docs/b.parquet", row_group_size=5)
    fs.pipe(f"{BUCKET}/docs/notes.txt", b"not a corpus file")
    cfg = config_from_dict({"input": {"path": f"s3://{BUCKET}/docs/*.parquet", "id_column": "id"},
                            "model": {"path": str(tiny_model), "max_model_len": 4096}, "run": {"max_unit_rows": 5}})
    files = reading.input_files(cfg.input)
    assert [f.path for f in files] == [f"s3://{BUCKET}/docs/a.parquet", f"s3://{BUCKET}/docs/b.parquet"]
    assert [f.source for f in files] == ["a.parquet", "b.parquet"]
    plan = make_plan(cfg, 2)
    assert plan.total_rows == 60 and plan.files[0]["version"]  # the object's ETag
    read = {"bytes": 0}
    real = storage.open_bytes

    def counting(path, offset=0):
        fh = real(path, offset)
        inner = fh.read

        def read_and_count(*args):
            data = inner(*args)
            read["bytes"] += len(data)
            return data
        fh.read = read_and_count
        return fh
    monkeypatch.setattr(storage, "open_bytes", counting)
    reader = UnitReader(plan, cfg)
    unit = plan.units[3]
    rows = reader.read(unit)
    assert rows.column(reading.ID).to_pylist() == table.column("id").to_pylist()[unit.first_row:unit.first_row + unit.rows]
    # a large file: one unit reads its row group and the footer, not the file
    import random

    rng = random.Random(0)
    words = " ".join(table.column("text").to_pylist()).split()
    big = pa.table({"id": [f"big-{i}" for i in range(2000)],
                    "text": [" ".join(rng.choices(words, k=800)) for _ in range(2000)]})
    _upload(fs, big, "big/big.parquet", row_group_size=50, compression="none")
    cfg = config_from_dict({"input": {"path": f"s3://{BUCKET}/big/big.parquet", "id_column": "id"},
                            "model": {"path": str(tiny_model), "max_model_len": 8192}, "run": {"max_unit_rows": 50}})
    monkeypatch.setattr(storage, "open_bytes", real)
    plan = make_plan(cfg, 2)
    monkeypatch.setattr(storage, "open_bytes", counting)
    read["bytes"] = 0
    unit = plan.units[len(plan.units) // 2]
    rows = UnitReader(plan, cfg).read(unit)
    assert rows.column(reading.ID).to_pylist() == [f"big-{i}" for i in range(unit.first_row, unit.first_row + unit.rows)]
    assert plan.files[0]["bytes"] > 5e6 and read["bytes"] < plan.files[0]["bytes"] / 8


def test_an_object_changed_after_planning_is_refused_like_a_local_file(s3, tiny_model):
    fs, _ = s3
    _upload(fs, _docs_table(4), "changing/a.parquet")
    cfg = config_from_dict({"input": {"path": f"s3://{BUCKET}/changing/a.parquet"}, "model": {"path": str(tiny_model), "max_model_len": 512}})
    plan = make_plan(cfg, 1)
    check_unchanged(plan.files[0]["path"], plan.files[0])
    _upload(fs, _docs_table(4, offset=10), "changing/a.parquet")
    with pytest.raises(ConfigError, match="changed since the run was planned"):
        check_unchanged(plan.files[0]["path"], plan.files[0])


def test_store_errors_name_the_path_and_the_fix(s3, monkeypatch):
    for path in ("s3://no-such-bucket-here/x/*.parquet", "s3://no-such-bucket-here/x.parquet"):
        says = "the bucket s3://no-such-bucket-here of .* does not exist"
        cfg = config_from_dict({"input": {"path": path}, "model": {"path": "m"}})
        with pytest.raises(ConfigError, match=says) as err:
            reading.input_files(cfg.input)
        assert "no-such-bucket-here" in str(err.value)
    with pytest.raises(MissingDependency, match=r"gcsfs is not installed.*pip install 'shardinfer\[gcs\]'"):
        reading.input_files(config_from_dict({"input": {"path": "gs://b/x.parquet"}, "model": {"path": "m"}}).input)
    with pytest.raises(ConfigError, match="run.directory: s3://b/run is not a POSIX filesystem path"):
        config_from_dict({"input": {"path": "x"}, "model": {"path": "m"}, "run": {"directory": "s3://b/run"}})


def test_missing_credentials_are_named_with_the_fix(s3, monkeypatch, tmp_path):
    import s3fs

    fs, _ = s3
    _upload(fs, _docs_table(2), "private/a.parquet")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()
    cfg = config_from_dict({"input": {"path": f"s3://{BUCKET}/private/a.parquet"}, "model": {"path": "m"}})
    with pytest.raises(ConfigError, match=r"no credentials for s3://corpus/private/a.parquet .*AWS_ACCESS_KEY_ID"):
        reading.input_files(cfg.input)
    s3fs.S3FileSystem.clear_instance_cache()


def test_a_corpus_on_a_web_server_reads_like_the_local_file(tmp_path, tiny_model):
    import functools
    import http.server
    import threading

    records = [{"id": d["id"], "text": d["text"][:300]} for d in demo_docs(20)]
    write_jsonl(tmp_path / "docs.jsonl", records)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = config_from_dict({"input": {"path": f"http://127.0.0.1:{server.server_port}/docs.jsonl", "id_column": "id"},
                                "model": {"path": str(tiny_model), "max_model_len": 4096}, "run": {"max_unit_rows": 6}})
        plan = make_plan(cfg, 2)
        reader = UnitReader(plan, cfg)
        ids = [i for u in plan.units for i in reader.read(u).column(reading.ID).to_pylist()]
        assert ids == [r["id"] for r in records] and len(plan.units) >= 4
    finally:
        server.shutdown()


def test_denied_access_is_named_with_the_fix(monkeypatch):
    """A second S3 server that checks IAM: a user without any policy may read nothing."""
    import boto3
    import s3fs

    port = _free_port()
    # the first 4 requests (user, key, bucket, object) go through unchecked; IAM applies after them
    server = _moto_server(port, INITIAL_NO_AUTH_ACTION_COUNT="4")
    try:
        admin = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1",
                 "endpoint_url": f"http://127.0.0.1:{port}"}
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="reader")
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        s3 = boto3.client("s3", **admin)
        s3.create_bucket(Bucket="locked")
        s3.put_object(Bucket="locked", Key="a.jsonl", Body=b'{"text": "x"}\n')
        for name, value in {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
                            "AWS_ENDPOINT_URL": admin["endpoint_url"], "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(name, value)
        s3fs.S3FileSystem.clear_instance_cache()
        cfg = config_from_dict({"input": {"path": "s3://locked/a.jsonl"}, "model": {"path": "m"}})
        with pytest.raises(ConfigError, match=r"access to s3://locked/a.jsonl is denied .*Check the credentials"):
            reading.input_files(cfg.input)
    finally:
        server.terminate()
        s3fs.S3FileSystem.clear_instance_cache()


def test_compressed_jsonl_of_every_kind_reads_like_the_plain_file(tmp_path, tiny_model):
    import zstandard

    records = [{"id": d["id"], "text": d["text"][:500]} for d in demo_docs(30)]
    plain = write_jsonl(tmp_path / "docs.jsonl", records)
    data = plain.read_bytes()
    (tmp_path / "z").mkdir()
    writers = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress,
               ".zst": zstandard.ZstdCompressor().compress}
    for suffix, compress in writers.items():
        (tmp_path / "z" / f"docs.jsonl{suffix}").write_bytes(compress(data))
    expected = reading.read_table(reading.input_files(config_from_dict(
        {"input": {"path": str(plain), "id_column": "id"}, "model": {"path": "m"}}).input)[0],
        config_from_dict({"input": {"path": str(plain), "id_column": "id"}, "model": {"path": "m"}}).input)
    for suffix in writers:
        cfg = config_from_dict({"input": {"path": str(tmp_path / "z" / f"docs.jsonl{suffix}"), "id_column": "id"},
                                "model": {"path": str(tiny_model), "max_model_len": 4096}, "run": {"max_unit_rows": 7}})
        [f] = reading.input_files(cfg.input)
        assert f.compression == suffix and f.format == "jsonl"
        plan = make_plan(cfg, 2)
        reader = UnitReader(plan, cfg)
        ids = [i for u in plan.units for i in reader.read(u).column(reading.ID).to_pylist()]
        assert ids == expected.column(reading.ID).to_pylist(), suffix


def test_datasets_directories_read_as_arrow_by_split(tmp_path, tiny_model):
    import datasets

    table = _docs_table(25)
    one = datasets.Dataset(table)
    one.save_to_disk(str(tmp_path / "one"), num_shards=3)
    both = datasets.DatasetDict({"train": one, "test": datasets.Dataset(_docs_table(5, offset=40))})
    both.save_to_disk(str(tmp_path / "dict"))
    cfg = config_from_dict({"input": {"path": str(tmp_path / "one"), "id_column": "id"},
                            "model": {"path": str(tiny_model), "max_model_len": 4096}, "run": {"max_unit_rows": 4}})
    files = reading.input_files(cfg.input)
    assert len(files) == 3 and {f.format for f in files} == {"arrow"}
    plan = make_plan(cfg, 2)
    reader = UnitReader(plan, cfg)
    ids = [i for u in plan.units for i in reader.read(u).column(reading.ID).to_pylist()]
    assert ids == table.column("id").to_pylist()
    split = config_from_dict({"input": {"path": str(tmp_path / "dict"), "split": "test", "id_column": "id"},
                              "model": {"path": str(tiny_model), "max_model_len": 4096}})
    assert make_plan(split, 1).total_rows == 5
    with pytest.raises(ConfigError, match="holds the splits train, test; choose one"):
        reading.input_files(config_from_dict({"input": {"path": str(tmp_path / "dict")}, "model": {"path": "m"}}).input)


def test_a_dataset_loaded_by_the_datasets_library_is_read_from_its_cache(tmp_path, tiny_model, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")  # read at import time
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # also read at import time
    data = tmp_path / "my-dataset" / "data"
    data.mkdir(parents=True)
    table = _docs_table(9)
    pq.write_table(table, data / "train-00000-of-00001.parquet")
    cfg = config_from_dict({"input": {"path": str(tmp_path / "my-dataset"), "format": "hf-dataset", "split": "train",
                                      "config": "default", "id_column": "id"},
                            "model": {"path": str(tiny_model), "max_model_len": 4096}})
    files = reading.input_files(cfg.input)
    assert files and all(f.format == "arrow" and str(tmp_path / "cache") in f.path for f in files)
    plan = make_plan(cfg, 1)
    reader = UnitReader(plan, cfg)
    assert [i for u in plan.units for i in reader.read(u).column(reading.ID).to_pylist()] == table.column("id").to_pylist()
    with pytest.raises(ConfigError, match="cannot be loaded"):
        reading.input_files(config_from_dict({"input": {"path": "org/not-in-the-cache", "format": "hf-dataset"},
                                             "model": {"path": "m"}}).input)


@pytest.mark.engine
def test_a_whole_job_on_s3_with_results_to_s3_matches_the_local_job(s3, tmp_path, tiny_model, engine_env):
    fs, s3_env = s3
    table = _docs_table(12, offset=60)
    local_dir = tmp_path / "local-docs"
    local_dir.mkdir()
    pq.write_table(table.slice(0, 7), local_dir / "a.parquet")
    pq.write_table(table.slice(7), local_dir / "b.parquet")
    for name in ("a.parquet", "b.parquet"):
        fs.put_file(str(local_dir / name), f"{BUCKET}/job/{name}")
    env = {**engine_env, **s3_env}
    common = {"model": {"engine": "hf"}, "sampling": {"max_tokens": 6}}
    local = write_config(tmp_path / "local.yaml", corpus=local_dir, model_dir=tiny_model, run_dir=tmp_path / "local",
                         input={"path": str(local_dir), "id_column": "id"}, **common)
    remote = write_config(tmp_path / "remote.yaml", corpus=local_dir, model_dir=tiny_model, run_dir=tmp_path / "remote",
                          input={"path": f"s3://{BUCKET}/job/", "id_column": "id"},
                          run={"directory": str(tmp_path / "remote"), "workers": 2, "unit_tokens": 400,
                               "output": f"s3://{BUCKET}/out/run-1"}, **common)
    with ThreadPoolExecutor(2) as pool:  # independent runs
        for proc in pool.map(lambda c: run_cli(["run", str(c)], env), (local, remote)):
            assert proc.returncode == 0, proc.stderr[-3000:]
    expected = read_results(tmp_path / "local")
    assert read_results(tmp_path / "remote") == expected
    published = sorted(fs.glob(f"{BUCKET}/out/run-1/results/*.parquet"))
    assert published
    with fs.open(published[0], "rb") as fh:
        assert pq.read_table(fh).to_pylist() == expected
    report = json.loads((tmp_path / "remote" / "report.json").read_text())
    assert report["output"] == [f"s3://{p}" for p in published]
    proc = run_cli(["resume", str(tmp_path / "remote")], env)  # nothing left: reduces and publishes again
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli(["reduce", str(tmp_path / "remote")], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(fs.glob(f"{BUCKET}/out/run-1/results/*.parquet")) == published
