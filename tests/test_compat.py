"""Coming from Hydra's official Optuna sweeper or lightning-hydra-template: any valid Hydra
override works in a sweep, and the search is logged under names MLflow accepts."""

from __future__ import annotations

import optuna
import pytest

from sweeper.study import parse_space
from sweeper.tracking import param_name

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


@pytest.mark.parametrize(("key", "name"), [
    ("search.+hparams_search", "search.hparams_search"),
    ("search.~trainer.compile", "search.trainer.compile"),
    ("search.++a.b", "search.a.b"),
    ("search.a:b", "search.a_b"),
    ("/a//../b", "a/b"),
    ("optim.lr_head", "optim.lr_head"),
])
def test_mlflow_param_names_are_made_in_one_place(key, name):
    assert param_name(key) == name


def test_add_and_delete_overrides_join_the_space_as_fixed_keys():
    space = parse_space({"freeze.unfrozen": "int(interval(0, 2))"}, {},
                        ["+trainer.note=x", "~trainer.compile", "~trainer.seed=0"])
    assert space.describe() == {"freeze.unfrozen": "int(0..2)", "+trainer.note": "fixed x",
                                "~trainer.compile": "deleted", "~trainer.seed": "fixed 0"}
    overrides = space.suggest(optuna.create_study().ask(), lambda key: None)
    assert overrides[1:] == ["+trainer.note=x", "~trainer.compile", "~trainer.seed=0"]


def test_add_and_delete_overrides_in_a_sweep(cli, outputs, mlflow_client):
    """python -m sweeper.run -m +trainer.note=x ~trainer.compile: the study finishes, its
    search is logged as search.trainer.note, and every trial gets both overrides."""
    r = cli("+trainer.note=x", "~trainer.compile", "hydra.sweeper.n_trials=2", flags=("-m",))
    assert r.returncode == 0, r.stderr[-3000:]
    exp = mlflow_client.get_experiment_by_name("sweeper")
    (parent,) = mlflow_client.search_runs([exp.experiment_id], "tags.`sweeper.kind` = 'study'")
    assert parent.info.status == "FINISHED"
    assert parent.data.params["search.trainer.note"] == "fixed x"
    assert parent.data.params["search.trainer.compile"] == "deleted"
    children = mlflow_client.search_runs([exp.experiment_id], "tags.`sweeper.kind` = 'trial'")
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    for c in children:
        assert c.data.params["trainer.note"] == "x" and "trainer.compile" not in c.data.params
