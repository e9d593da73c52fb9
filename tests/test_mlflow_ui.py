"""What the README promises a person sees in `mlflow ui`, checked through a real server's REST API."""

from __future__ import annotations

import json
import urllib.request

from sweeper.report import make_report
from tests import servers

from .test_report import _study  # noqa: TID252


def _api(port: int, path: str, body: dict | None = None) -> dict:
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/{path}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def test_mlflow_server_shows_study_trials_metrics_and_report(make_cfg, outputs):
    cfg, parent_id = _study(make_cfg, [(0, 0.05, 0), (9, 0.05, 0)], name="ui")
    make_report(cfg)
    with servers.mlflow_server(outputs.parent / "server",
                               backend_store_uri=f"sqlite:///{outputs}/mlflow.db") as server:
        port = server.port
        exps = _api(port, "experiments/search", {"max_results": 10})
        exp_id = next(e["experiment_id"] for e in exps["experiments"] if e["name"] == "sweeper")
        found = _api(port, "runs/search", {"experiment_ids": [exp_id],
                                           "filter": "tags.`sweeper.kind` = 'study'"})
        parent = found["runs"][0]
        assert parent["info"]["run_id"] == parent_id
        children = _api(port, "runs/search", {
            "experiment_ids": [exp_id], "filter": f"tags.`mlflow.parentRunId` = '{parent_id}'"})
        assert len(children["runs"]) == 2
        for child in children["runs"]:
            metrics = {m["key"] for m in child["data"]["metrics"]}
            assert {"val_acc", "test_acc", "train_time_s"} <= metrics
        listing = _api(port, f"artifacts/list?run_id={parent_id}&path=report")
        names = {f["path"] for f in listing["files"]}
        assert {"report/report.md", "report/pareto.png"} <= names
