"""Kept trained parts: a model rebuilt from a kept state predicts as the trained one did, and a
trial that leaves its test set to later gets the test accuracy it would have measured."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from sweeper import data as data_mod
from sweeper.feeds import unit_digest
from sweeper.states import StateMismatch, StateStore, trained_part
from sweeper.tracking import Tracker
from sweeper.train import fit
from sweeper.trial import adapt_batchnorm, build_model, evaluate_kept, run_trial


def _trained(cfg):
    """The trial's model after a short training, as run_trial would have built and trained it."""
    device = torch.device("cpu")
    data = data_mod.load(cfg.dataset)
    model, _ = build_model(cfg, len(data.classes), device)
    adapt_batchnorm(model, data, str(cfg.freeze.bn_stats), device, int(cfg.trainer.batch_size))
    fit(model, data, cfg.trainer, cfg.optim, device)
    return model.eval(), data


@pytest.mark.parametrize("overrides", [("freeze.unfrozen=2",),
                                       ("freeze.unfrozen=0", "freeze.bn_stats=target"),
                                       ("freeze.unfrozen=9",)])
def test_a_kept_state_rebuilds_the_trained_model(make_cfg, tmp_path, overrides):
    cfg = make_cfg("trainer.epochs=2", *overrides)
    model, data = _trained(cfg)
    store = StateStore(tmp_path / "states")
    store.save("run1", model, cfg)
    assert store.run_ids() == ["run1"]

    kept_cfg = store.config("run1")
    assert kept_cfg.freeze.unfrozen == cfg.freeze.unfrozen
    fresh, _ = build_model(kept_cfg, len(data.classes), torch.device("cpu"))
    x = data.normalize(data.test.images)
    assert not torch.equal(fresh.eval()(x), model(x))  # training changed something
    store.load("run1", fresh)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))
    # only what training changed is kept: not the frozen units' parameters
    frozen = sum(p.numel() for u in model.frozen_units() for p in u.parameters())
    kept = sum(t.numel() for t in load_file(store.path("run1")).values())
    assert kept <= sum(t.numel() for t in model.state_dict().values()) - frozen


def test_a_kept_state_refuses_another_model(make_cfg, tmp_path):
    cfg = make_cfg("freeze.unfrozen=2")
    model, data = _trained(cfg)
    store = StateStore(tmp_path)
    store.save("run1", model, cfg)
    other, _ = build_model(make_cfg("freeze.unfrozen=3"), len(data.classes), torch.device("cpu"))
    with pytest.raises(StateMismatch, match="unfrozen"):
        store.load("run1", other)
    reseeded, _ = build_model(make_cfg("freeze.unfrozen=2", "trainer.seed=1"), len(data.classes),
                              torch.device("cpu"))  # other random frozen weights (weights=none)
    with pytest.raises(StateMismatch, match="frozen units"):
        store.load("run1", reseeded)


def test_an_entry_an_earlier_version_kept_still_rebuilds_the_model(make_cfg, tmp_path):
    # Format 1 (torch.save, <run id>.pt): studies kept before the safetensors entries.
    cfg = make_cfg("trainer.epochs=1", "freeze.unfrozen=2")
    model, data = _trained(cfg)
    store = StateStore(tmp_path / "states")
    store.folder.mkdir()
    frozen = [unit_digest(u) for u in model.frozen_units()]
    torch.save({"format": 1, "unfrozen": model.unfrozen, "num_units": model.num_units,
                "frozen_digests": frozen, "config": OmegaConf.to_yaml(cfg, resolve=True),
                "state": trained_part(model)}, store.folder / "old.pt")
    assert store.run_ids() == ["old"] and store.config("old").freeze.unfrozen == 2
    fresh, _ = build_model(store.config("old"), len(data.classes), torch.device("cpu"))
    store.load("old", fresh)
    x = data.normalize(data.test.images[:64])
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))
    store.save("old", model, cfg)  # kept again: this version's entry replaces it
    assert [p.name for p in store.folder.iterdir()] == ["old.safetensors"]
    assert store.run_ids() == ["old"]


def test_prune_keeps_only_what_is_named(make_cfg, tmp_path):
    cfg = make_cfg("freeze.unfrozen=0")
    model, _ = _trained(cfg)
    store = StateStore(tmp_path)
    for key in ("a", "b", "c"):
        store.save(key, model, cfg)
    assert store.nbytes() == sum(store.path(k).stat().st_size for k in "abc") > 0
    assert sorted(store.prune(keep=["b", "zzz"])) == ["a", "c"]
    assert store.run_ids() == ["b"]
    assert store.nbytes() == store.path("b").stat().st_size
    assert StateStore(tmp_path / "none").run_ids() == [] and StateStore(tmp_path / "none").nbytes() == 0


@pytest.mark.parametrize("freeze", [
    ["freeze.unfrozen=3"],
    # units frozen again before the end: their weights are this run's, kept with the rest
    ["freeze=progressive", "freeze.unfrozen=3", "freeze.start=0.3"],
    # the head alone first, then units unfrozen from the top: the model at the end trains 3
    ["freeze=gradual", "freeze.unfrozen=3", "freeze.units_each=2"],
], ids=["depth", "progressive", "gradual"])
def test_a_test_set_left_to_later_gets_the_same_accuracy(make_cfg, tmp_path, mlflow_client,
                                                         freeze):
    cfg = make_cfg(*freeze, "trainer.epochs=2", "trainer.deterministic=true")
    now = run_trial(cfg)
    store = StateStore(tmp_path / "states")
    later = run_trial(cfg, keep=store)
    assert "test_acc" not in later and later["val_acc"] == now["val_acc"]
    assert "test_acc" not in mlflow_client.get_run(later["run_id"]).data.metrics

    test_acc = evaluate_kept(later["run_id"], store, Tracker(cfg.tracking))
    assert test_acc == now["test_acc"]
    run = mlflow_client.get_run(later["run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["test_acc"] == test_acc
    history = mlflow_client.get_metric_history(later["run_id"], "test_acc")
    assert [m.step for m in history] == [2]  # at the last epoch, as a trial logs it
