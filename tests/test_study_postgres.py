"""Two sweeps share one study on a real PostgreSQL server (the ``postgres_url`` fixture)."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from sweeper.storage import rdb_url
from tests.test_study import STUDY, check_consistent, study_runs
from tests.test_study_parallel import finish, start

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def test_two_sweeps_share_a_postgres_study(outputs, mlflow_client, postgres_url):
    storage = f"hydra.sweeper.storage='{postgres_url}'"
    procs = [start(outputs, "hydra.sweeper.n_trials=6", storage, log_name=f"pg{i}")
             for i in range(2)]
    for i, p in enumerate(procs):
        finish(p, outputs, f"pg{i}")
    study = optuna.load_study(study_name=STUDY, storage=rdb_url(postgres_url))
    assert len(study.trials) == 6
    assert {t.state for t in study.trials} == {TrialState.COMPLETE}
    assert len({t.system_attrs["sweeper:worker"] for t in study.trials}) == 2
    assert not (outputs / "optuna").exists()  # nothing in the default journal
    parent, children = study_runs(mlflow_client)
    assert len(children) == 6 and parent.info.status == "FINISHED"
    assert parent.data.tags["optuna.storage"] == postgres_url.replace(":secret@", ":***@")
    check_consistent(study, mlflow_client)
