"""--mlflow / --wandb: what is logged (against MLflow's local file store and W&B's offline mode, no server), and
the one-line error with the install line when a tracker is asked for but not installed. No model: the run folders
are written here in the shapes scores.json / results.json have (tests/test_outputs_schema.py checks those)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from comptrust import tracking
from comptrust.errors import UsageError

SCORES = {
    "schema_version": "1.0", "command": "comptrust evaluate -p ethics,toxicity --limit 1 --out runs/x",
    "comptrust_version": "0.1.0", "model": {"name": "SmolLM2-135M-Instruct", "spec": None},
    "config": {"limit": 1, "seed": 0, "backend": "auto", "gen_kwargs": None}, "config_fingerprint": "abc123",
    "perspectives": {
        "ethics": {"score": 62.5, "refusal_rate": 8.3, "n_items": 12, "ci95": {"low": 40.0, "high": 80.0}},
        "toxicity": {"score": 80.7, "refusal_rate": 0.0, "n_items": 8, "ci95": None},
    },
}
RESULTS = {
    "command": "comptrust study s.yaml --out runs/s",
    "study": {"model": None, "perspectives": ["ethics"], "variants": [{"name": "dense", "method": "dense"},
                                                                     {"name": "rtn-w8", "method": "rtn"}]},
    "analysis": {"dense": "dense", "recommendation": {"text": "rtn-w8 keeps trust"}, "variants": {
        "dense": {"perspectives": {"ethics": {"mean": 62.5, "delta": 0.0, "ci": [40.0, 80.0], "refusal": 8.3,
                                              "n_items": 12}}},
        "rtn-w8": {"perspectives": {"ethics": {"mean": 60.0, "delta": -2.5, "ci": None, "refusal": 10.0,
                                               "n_items": 12}}},
    }},
}


def eval_dir(tmp_path: Path) -> Path:
    d = tmp_path / "run-x"
    d.mkdir()
    (d / "scores.json").write_text(json.dumps(SCORES))
    (d / "generations.jsonl").write_text('{"id": "a"}\n')
    return d


def test_missing_tracker_is_one_line_with_the_install_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda n: None if n == "wandb" else real(n))
    with pytest.raises(UsageError) as e:
        tracking.check(wandb=True)
    assert str(e.value) == ("--wandb needs the wandb package, which is not installed: pip install wandb "
                            "(or pip install 'comptrust[track]' for both trackers)")
    tracking.check(mlflow=False, wandb=False)  # nothing asked: nothing checked


def test_cli_refuses_a_missing_tracker_before_any_work(monkeypatch, tmp_path, capsys):
    from comptrust import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda n: None if n == "mlflow" else real(n))
    for argv in (["evaluate", "-p", "ethics", "--out", str(tmp_path / "o"), "--mlflow"],
                 ["study", "--out", str(tmp_path / "s"), "--mlflow"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
        err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
        assert err[-1] == ("error: --mlflow needs the mlflow package, which is not installed: pip install "
                           "mlflow-skinny (or pip install 'comptrust[track]' for both trackers)")
        assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()  # nothing was started


def test_metrics_from_scores_and_results():
    m = tracking.evaluation_metrics(SCORES)
    assert m == {"ethics/score": 62.5, "ethics/ci95_low": 40.0, "ethics/ci95_high": 80.0, "ethics/refusal_rate": 8.3,
                 "ethics/n_items": 12.0, "toxicity/score": 80.7, "toxicity/refusal_rate": 0.0,
                 "toxicity/n_items": 8.0}
    s = tracking.study_metrics(RESULTS)
    assert s["rtn-w8/ethics/delta"] == -2.5 and s["dense/ethics/ci95_high"] == 80.0
    assert "rtn-w8/ethics/ci95_low" not in s and s["rtn-w8/ethics/refusal_rate"] == 10.0




def test_mlflow_local_file_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "ct-test")
    said = tracking.log_evaluation(eval_dir(tmp_path), mlflow=True)
    assert len(said) == 1 and said[0].startswith("mlflow: run ") and store.as_uri() in said[0]
    client = MlflowClient(tracking_uri=store.as_uri())
    exp = client.get_experiment_by_name("ct-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.metrics["ethics/score"] == 62.5 and run.data.metrics["ethics/ci95_low"] == 40.0
    assert run.data.params["limit"] == "1" and run.data.params["config_fingerprint"] == "abc123"
    assert run.data.tags["comptrust.kind"] == "evaluate" and run.info.run_name == "run-x"
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert arts == {"scores.json", "generations.jsonl"}
    local = Path(client.download_artifacts(run.info.run_id, "scores.json", str(tmp_path / "dl")))
    assert json.loads(local.read_text()) == SCORES


def test_mlflow_study(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    d = tmp_path / "study-s"
    d.mkdir()
    (d / "results.json").write_text(json.dumps(RESULTS))
    (d / "results.csv").write_text("variant,ethics\ndense,62.5\n")
    (d / "report.html").write_text("<html></html>")
    tracking.log_study(d, mlflow=True)
    client = MlflowClient(tracking_uri=store.as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("comptrust").experiment_id])
    assert run.data.metrics["rtn-w8/ethics/delta"] == -2.5
    assert run.data.tags["comptrust.recommendation"] == "rtn-w8 keeps trust"
    assert json.loads(run.data.params["variants"])[1]["method"] == "rtn"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"results.json", "results.csv", "report.html"}


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    said = tracking.log_evaluation(eval_dir(tmp_path), wandb=True)
    assert len(said) == 1 and said[0].startswith("wandb: run ")
    import wandb

    wandb.teardown()  # the wandb-core service writes the run's records out when it stops (a CLI run: at exit)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # wandb 0.31 keeps an offline run in one protobuf record file (for `wandb sync`); its strings are stored as
    # written, so the config, the metrics and the artifact's files can be found in it
    (record,) = runs[0].glob("*.wandb")
    data = record.read_bytes()
    for needle in (b"config_fingerprint", b"abc123", b"ethics/score", b"62.5", b"toxicity/n_items",
                   b"run-x-outputs", b"scores.json", b"generations.jsonl"):
        assert needle in data, needle
