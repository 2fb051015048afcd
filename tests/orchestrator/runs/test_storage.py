"""Run directories on object storage (orchestrator.runs.storage, .staging), against a real S3-compatible server (moto's
server mode on a local port, tests/s3_server.py), without Ray: URIs nothing serves, the claim checks on the store,
uploads whole and in write order, and the reading commands (report, compare, ensemble) given a URI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.compare import main as compare_main
from orchestrator.cv import main as cv_main
from orchestrator.ensemble import main as ensemble_main
from orchestrator.report import main as report_main
from orchestrator.runs import storage
from orchestrator.runs.rundir import RunDirError, prepare_run_dir
from orchestrator.runs.staging import RemoteRunDir, open_run, staged_for_predict
from tests.conftest import CONFIGS, REPO
from tests.orchestrator.synthetic_runs import bundled_rows, make_run, noisy_probs
from trainer_core.config import load_config


def config(*overrides):
    return load_config(CONFIGS / "smoke.yaml", ["data.max_rows=40", *overrides])


def upload_tree(local, uri):
    """A local run directory copied to ``uri`` by the project's own push."""
    with RemoteRunDir(uri) as run:
        for path in sorted(local.rglob("*")):
            if path.is_file():
                dest = run.local / path.relative_to(local)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(path.read_bytes())
        run.push()


@pytest.mark.parametrize("command, out, says", [
    ("orchestrator.cv", "foo://bucket/run", "no filesystem serves 'foo://'"),
    ("orchestrator.cv", "s3:/bucket/run", "looks like a s3:// URI with a slash missing"),
    ("orchestrator.tune", "foo://bucket/sweep", "no filesystem serves 'foo://'")])
def test_a_uri_nothing_serves_is_one_line_and_no_local_folder(tmp_path, command, out, says):
    res = subprocess.run([sys.executable, "-m", command, "--config", str(CONFIGS / "smoke.yaml"), "--out", out,
                          "--folds", "0"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert says in lines[-1] and lines[-1].startswith("error: --out "), res.stderr
    assert [line for line in lines if not line.startswith("search space:")] == lines[-1:]  # tune names its space
    assert list(tmp_path.iterdir()) == []  # never a folder named foo: or s3:


def test_a_missing_bucket_is_one_line_naming_it(s3, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cv_main(["--config", str(CONFIGS / "smoke.yaml"), "--out", "s3://no-such-bucket/run", "--folds", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bucket 'no-such-bucket' does not exist" in err[0] and s3.endpoint in err[0]
    assert list(tmp_path.iterdir()) == []


def test_a_scheme_only_fsspec_serves_goes_through_fsspec():
    fs, path = storage.filesystem("memory://bucket/run")
    assert "fsspec" in fs.type_name and path.endswith("bucket/run")
    with RemoteRunDir("memory://bucket/run") as run:
        (run.local / "run.json").write_text('{"n_folds": 5}')
        assert run.push() == 1
    with RemoteRunDir("memory://bucket/run") as again:
        assert again.top_names() == ["run.json"] and again.pull() == 1
        assert (again.local / "run.json").read_text() == '{"n_folds": 5}'


def test_push_uploads_whole_files_in_write_order_and_only_what_changed(s3, monkeypatch):
    order = []
    real_upload = storage.upload
    monkeypatch.setattr(storage, "upload", lambda fs, src, key: (order.append(key.rsplit("/", 2)[-2:]),
                                                                  real_upload(fs, src, key)))
    with RemoteRunDir(s3.uri("order")) as run:
        (run.local / "fold=0" / "adapter").mkdir(parents=True)
        for rel in ("fold=0/adapter/a.bin", "fold=0/oof.parquet", "fold=0/metrics.json"):
            (run.local / rel).write_bytes(os.urandom(1000))
        (run.local / "logs").mkdir()
        os.symlink(run.local / "fold=0", run.local / "logs" / "ray")  # a link into this machine: stays local
        (run.local / "fold=0" / ".oof.parquet.x.tmp").write_text("half")  # an atomic write in progress: stays local
        assert run.push() == 3
        assert [o[-1] for o in order] == ["a.bin", "oof.parquet", "metrics.json"]  # metrics.json, the marker, last
        assert s3.keys("order") == ["fold=0/adapter/a.bin", "fold=0/metrics.json", "fold=0/oof.parquet"]
        assert s3.read("order/fold=0/oof.parquet") == (run.local / "fold=0" / "oof.parquet").read_bytes()
        assert run.push() == 0  # nothing changed
        (run.local / "fold=0" / "metrics.json").write_text("{}")
        assert run.push() == 1 and s3.read("order/fold=0/metrics.json") == b"{}"
    with RemoteRunDir(s3.uri("order")) as again:  # a fresh staging folder reads back what is there
        assert again.pull() == 2  # adapter/ is left where it is unless asked for
        assert (again.local / "fold=0" / "metrics.json").read_text() == "{}"
        assert again.pull() == 0


def test_a_failed_upload_leaves_the_old_object_and_no_temporary_key(s3, tmp_path):
    fs, root = storage.filesystem(s3.uri("atomic"))
    src = tmp_path / "report.json"
    src.write_text('{"old": true}')
    storage.upload(fs, src, f"{root}/report.json")
    src.write_text('{"new": true, "padding": "' + "x" * 10000 + '"}')

    class Dying:
        """An upload cut off after a few bytes, closed on the way out as pyarrow's own streams are: that publishes
        the partial object - here under the temporary key, which the upload then deletes."""

        def __init__(self, key):
            self.stream = fs.open_output_stream(key)

        def write(self, data):
            self.stream.write(data[:3])
            raise OSError("connection reset mid-upload")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stream.close()

    class CutOff:
        def __getattr__(self, name):
            return getattr(fs, name)

        def open_output_stream(self, key):
            return Dying(key)

    with pytest.raises(OSError, match="mid-upload"):
        storage.upload(CutOff(), src, f"{root}/report.json")
    assert s3.keys("atomic") == ["report.json"] and json.loads(s3.read("atomic/report.json")) == {"old": True}


def test_a_killed_uploads_temporary_key_is_removed_once_the_run_is_over(s3):
    """A worker SIGKILLed mid-upload never moves nor deletes its temporary key (seen in test_storage_e2e: a fold's
    events file); the driver's tidy-up at the end of the run removes such keys and nothing else (Ray's own files
    under ray/ included)."""
    fs, root = storage.filesystem(s3.uri("killed"))
    keys = {"fold=1/metrics.json": b"{}", "tensorboard/fold=1/.events.out.tfevents.1.vm.2.0.f47f456b375c.tmp": b"x",
            "fold=2/.oof.parquet.0123456789ab.tmp": b"x", "ray/fold=1/.validate_storage_marker": b"",
            "ray/fold=1/checkpoint_000001/.model.0123456789ab.tmp": b"x", "notes/.hidden.tmp": b"x"}
    for key, data in keys.items():
        with fs.open_output_stream(f"{root}/{key}") as out:
            out.write(data)
    with RemoteRunDir(s3.uri("killed")) as run:
        assert run.tidy() == 2
    assert s3.keys("killed") == sorted(k for k in keys if not k.endswith(("f47f456b375c.tmp", "fold=2/.oof.parquet"
                                                                          ".0123456789ab.tmp")))
    assert open_run(str(REPO)).tidy() == 0  # a folder: nothing to tidy


def test_a_prefix_that_is_not_a_run_is_never_pulled_nor_written(s3):
    s3.client.put_object(Bucket=s3.bucket, Key="thesis/thesis.tex", Body=b"\\documentclass{article}")
    for restart in (False, True):
        with open_run(s3.uri("thesis")) as run:
            with pytest.raises(RunDirError, match=r"s3://runs/thesis is not empty and holds no run.json .*thesis.tex"):
                prepare_run_dir(config(), run, [0], restart, "test")
            assert list(run.local.iterdir()) == []  # nothing pulled
    assert s3.keys("thesis") == ["thesis.tex"]


def test_claim_resume_check_and_restart_on_the_store(s3):
    uri = s3.uri("claimed")
    with open_run(uri) as run:
        prepare_run_dir(config(), run, [0], False, "test")
    assert s3.keys("claimed") == ["config.yaml", "data.parquet", "run.json"]
    s3.client.put_object(Bucket=s3.bucket, Key="claimed/ray/fold=0/checkpoint_manager_snapshot.json", Body=b"{}")
    with open_run(uri) as run, pytest.raises(RunDirError, match=r"s3://runs/claimed holds a run with a different "
                                                                 r"config \(changed: train.lr"):
        prepare_run_dir(config("train.lr=0.5"), run, [0], False, "test")
    with open_run(uri) as run:  # --restart: everything under the URI goes, Ray's checkpoints too
        prepare_run_dir(config("train.lr=0.5"), run, [0], True, "test")
    assert s3.keys("claimed") == ["config.yaml", "data.parquet", "run.json"]
    assert json.loads(s3.read("claimed/run.json"))["fingerprint"] == config("train.lr=0.5").fingerprint()


def test_report_compare_and_ensemble_read_runs_from_the_store(s3, tmp_path, capsys):
    rows = bundled_rows(100)
    local = make_run(tmp_path / "local", rows, noisy_probs(rows["label"].to_numpy(), 1.0, seed=1), name="synthetic")
    upload_tree(local, s3.uri("remote"))
    s3.client.delete_object(Bucket=s3.bucket, Key="remote/report.json")

    assert report_main([s3.uri("remote")]) == 0  # rebuilt from the fold files there, and written back there
    report = json.loads(s3.read("remote/report.json"))
    assert report["run_dir"] == "s3://runs/remote" and "s3://runs/remote/report.html" in capsys.readouterr().out
    assert report["recipe"]["tensorboard"] == "tensorboard --logdir s3://runs/remote/tensorboard"
    assert report["cv_log_loss"] == json.loads((local / "report.json").read_text())["cv_log_loss"]

    assert compare_main([s3.uri("remote"), str(local), "--json"]) == 0  # the same rows, read from both places
    res = json.loads(capsys.readouterr().out)
    assert res["runs_a"] == ["s3://runs/remote"] and res["difference"] == 0.0

    assert ensemble_main([s3.uri("remote"), str(local), "--out", str(tmp_path / "ens"), "--method", "mean"]) == 0
    spec = json.loads((tmp_path / "ens" / "ensemble.json").read_text())
    assert spec["members"] == ["s3://runs/remote", "../local"]  # the URI kept; a local member relative, as before
    with staged_for_predict(tmp_path / "ens") as ens:  # predict's view: the member downloaded, in a copy's spec
        members = json.loads((ens / "ensemble.json").read_text())["members"]
        assert ens != tmp_path / "ens" and members[1] == str(local.resolve())
        assert (Path(members[0]) / "fold=0" / "oof.parquet").read_bytes() == (local / "fold=0/oof.parquet").read_bytes()
    assert json.loads((tmp_path / "ens" / "ensemble.json").read_text()) == spec  # the original is never rewritten
    assert report_main([s3.uri("nothing-here")]) == 2
    assert "s3://runs/nothing-here: nothing there" in capsys.readouterr().err


def test_workers_get_the_endpoint_and_region_never_the_credentials():
    from orchestrator.cluster.folds import worker_env

    env = worker_env({"AWS_ENDPOINT_URL_S3": "http://minio:9000", "AWS_REGION": "eu-west-1",
                      "AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_SESSION_TOKEN": "token"})
    assert env["AWS_ENDPOINT_URL_S3"] == "http://minio:9000" and env["AWS_REGION"] == "eu-west-1"
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"} & set(env)


def test_what_the_driver_wrote_is_pushed_however_the_run_ends_and_its_own_error_wins(tmp_path):
    from orchestrator.runs.staging import RunDir

    class Counting(RunDir):
        pushes, fail = 0, False

        def push(self, under: str = "") -> int:
            self.pushes += 1
            if self.fail:
                raise OSError("bucket gone")
            return 0

    run = Counting(tmp_path)
    with run.pushed_however_it_ends():
        pass
    assert run.pushes == 1
    run.fail = True
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C in flight, and the push fails too: Ctrl-C is what surfaces
        with run.pushed_however_it_ends():
            raise KeyboardInterrupt
    assert run.pushes == 2
