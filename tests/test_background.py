"""What a trial no longer waits for: its MLflow writes and its kept trained part are written by
background threads (sweeper.background), its SQLite store writes ahead of its syncs, its
network is copied from the last one built, and its job's config from the last trial's. A run
still ends with everything in it, a write that failed is not lost, a kept state is complete
whenever it is read, a copied network is the one a fresh build gives, and a job's config (its
``.hydra/`` folder) is the one Hydra composes."""

from __future__ import annotations

import gc
import sqlite3
import time
import weakref

import pytest
import torch
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from sweeper import background, states
from sweeper.config import compose
from sweeper.states import StateStore
from sweeper.tracking import State, Tracker
from sweeper.trial import build_model


@pytest.fixture
def tracker(tmp_path):
    return Tracker(OmegaConf.create({"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "e"}))


def _slow(fn, seconds=0.05):
    def slow(*args, **kwargs):
        time.sleep(seconds)
        return fn(*args, **kwargs)
    return slow


def test_a_writer_lets_go_of_what_a_write_held_once_it_is_done():
    # A cache entry written behind a GPU trial holds that trial's rows (GBs of GPU memory):
    # they must be freed when the write is done, not when the next write comes.
    writer = background.Writer("test-writer")

    class Rows:
        pass

    rows = Rows()
    gone = weakref.ref(rows)
    writer.submit(lambda rows=rows: None).result()
    del rows
    for _ in range(200):  # (the thread lets go just after it sets the result)
        gc.collect()
        if gone() is None:
            break
        time.sleep(0.01)
    assert gone() is None


def test_a_background_run_ends_finished_with_everything_written(tracker, monkeypatch):
    run = tracker.start("r", flush_every_s=0.0, background=True)  # every call: a write
    monkeypatch.setattr(run.client, "log_batch", _slow(run.client.log_batch))
    run.params({"optim.lr_head": 0.01})
    for step in range(10):
        run.metrics({"val_acc": step / 10}, step=step)
    run.text("freeze:\n  unfrozen: 2\n", "config.yaml")
    assert len(run._writes) > 0  # still being written while the caller goes on
    run.finish(State.COMPLETE)

    got = tracker.client.get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.data.tags["state"] == "complete"
    assert got.data.params["optim.lr_head"] == "0.01"
    history = tracker.client.get_metric_history(run.run_id, "val_acc")
    assert sorted(m.step for m in history) == list(range(10))
    assert [a.path for a in tracker.client.list_artifacts(run.run_id)] == ["config.yaml"]


def test_a_runs_last_metrics_are_written_with_its_end_in_one_write(tracker, monkeypatch):
    run = tracker.start("r", flush_every_s=0.0, background=True)  # every call: a write
    batches, log_batch = [], run.client.log_batch
    monkeypatch.setattr(run.client, "log_batch",
                        lambda run_id, **batch: (batches.append(batch), log_batch(run_id, **batch)))
    run.metrics({"val_acc": 0.5}, step=1)
    run.metrics({"val_acc": 0.6}, step=2, last=True)  # the last epoch's, then the final ones
    run.metrics({"best_val_acc": 0.6, "train_time_s": 1.5}, step=2, last=True)
    run.finish(State.COMPLETE)

    assert len(batches) == 2  # the first epoch's; the rest with the state, as the run ends
    assert [m.key for m in batches[1]["metrics"]] == ["val_acc", "best_val_acc", "train_time_s"]
    assert [t.value for t in batches[1]["tags"]] == ["complete"]
    got = tracker.client.get_run(run.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.metrics == {"val_acc": 0.6, "best_val_acc": 0.6, "train_time_s": 1.5}
    history = tracker.client.get_metric_history(run.run_id, "val_acc")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.5), (2, 0.6)]


def test_a_sqlite_store_writes_ahead_and_another_sqlite_file_is_left_as_it_is(tracker, tmp_path):
    run = tracker.start("r")
    run.metrics({"val_acc": 0.5})
    run.end()
    # The store's file is in write-ahead mode for every process that opens it (mlflow ui too),
    # and its runs are all there; MLflow's own connections sync at checkpoints only.
    db = sqlite3.connect(tmp_path / "mlflow.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT status FROM runs").fetchall() == [("FINISHED",)]
    with tracker.client._tracking_client.store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    # a SQLite database the project did not open as a store keeps SQLite's defaults
    other = MlflowClient(f"sqlite:///{tmp_path}/other.db")
    other.search_experiments()
    assert sqlite3.connect(tmp_path / "other.db").execute(
        "PRAGMA journal_mode").fetchone()[0] == "delete"


def test_a_failed_background_write_is_raised_and_written_again(tracker, monkeypatch):
    run = tracker.start("r", flush_every_s=0.0, background=True)
    real = run.client.log_batch
    calls = []

    def locked_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise MlflowException("database is locked")
        return real(*args, **kwargs)

    monkeypatch.setattr(run.client, "log_batch", locked_once)
    run.metrics({"val_acc": 0.5}, step=1)
    with pytest.raises(MlflowException, match="locked"):
        run.finish(State.COMPLETE)  # the run is not ended as if all were written
    assert tracker.client.get_run(run.run_id).info.status == "RUNNING"
    run.finish(State.FAILED, "MlflowException: database is locked")  # as run_trial does

    got = tracker.client.get_run(run.run_id)
    assert got.info.status == "FAILED" and got.data.tags["state"] == "failed"
    assert got.data.metrics["val_acc"] == 0.5  # the failed batch, written with the last one


def test_a_trial_whose_end_fails_to_be_written_ends_failed_not_running(make_cfg, monkeypatch):
    from mlflow.tracking import MlflowClient

    from sweeper.trial import run_trial

    cfg = make_cfg("trainer.epochs=1")
    tracker = Tracker(cfg.tracking)

    real, calls = MlflowClient.set_terminated, []

    def refuse_to_end_once(self, run_id, status=None, *args, **kwargs):
        calls.append(status)
        if len(calls) == 1:
            raise MlflowException("database is locked")
        return real(self, run_id, status, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "set_terminated", refuse_to_end_once)
    with pytest.raises(MlflowException, match="locked"):
        run_trial(cfg)
    run = tracker.client.search_runs([tracker.experiment_id], max_results=1)[0]
    assert calls == ["FINISHED", "FAILED"]  # never left RUNNING
    assert run.info.status == "FAILED" and "locked" in run.data.tags["error"]
    assert "val_acc" in run.data.metrics



def test_a_state_kept_in_the_background_is_complete_when_read(make_cfg, tmp_path, monkeypatch):
    cfg = make_cfg("freeze.unfrozen=2")
    model, _ = build_model(cfg, 5, torch.device("cpu"))
    expected = {k: v.clone() for k, v in states.trained_part(model).items()}
    monkeypatch.setattr(states.torch, "save", _slow(torch.save, 0.5))
    store = StateStore(tmp_path / "states")

    started = time.perf_counter()
    store.save("run1", model, cfg, background=True)
    assert time.perf_counter() - started < 0.5  # the trial did not wait for the file
    assert store.run_ids() == ["run1"]  # a reader waits for it
    rebuilt, _ = build_model(store.config("run1"), 5, torch.device("cpu"))
    store.load("run1", rebuilt)
    got = states.trained_part(rebuilt)
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    assert not list((tmp_path / "states").glob("*.tmp*"))  # written, renamed into place


@pytest.mark.parametrize("weights", ["none", "file"])
def test_a_copied_network_is_the_one_a_fresh_build_gives(make_cfg, tmp_path, weights):
    # A seed no other test builds with: the first build is fresh, the second a copy of it
    # (with weights to load: a copy whose values are left to the loading).
    if weights == "file":
        import torchvision

        weights = tmp_path / "resnet18.pt"
        torch.save(torchvision.models.resnet18(num_classes=7).state_dict(), weights)
    cfg = make_cfg("freeze.unfrozen=3", "freeze.transferred=6", "trainer.seed=80531",
                   f"backbone.weights={weights}")

    def build():
        model, _ = build_model(cfg, 5, torch.device("cpu"))
        return model.state_dict(), torch.get_rng_state()

    fresh, rng_fresh = build()
    copied, rng_copied = build()
    assert torch.equal(rng_fresh, rng_copied)  # what training draws next is the same
    assert fresh.keys() == copied.keys()
    assert all(torch.equal(fresh[k], copied[k]) for k in fresh)
    other, _ = build_model(make_cfg("freeze.unfrozen=3", "trainer.seed=80532"), 5,
                           torch.device("cpu"))
    assert not torch.equal(other.state_dict()["units.0.0.weight"], fresh["units.0.0.weight"])
    # back to the first seed after another (a study's repeats): the same network again
    again, rng_again = build()
    assert torch.equal(rng_fresh, rng_again)
    assert all(torch.equal(fresh[k], again[k]) for k in fresh)


def test_each_trial_job_holds_the_config_hydra_composes_for_it(cli, outputs):
    # TPE over depth and learning rates, lr_backbone only when something trains: trials of
    # other values (copied from the last one) and of other keys (composed again).
    r = cli("hydra.mode=MULTIRUN", "hydra.sweeper.n_trials=4", "hydra/sweeper/sampler=tpe",
            "hydra/sweeper/objectives=accuracy_time", "hydra/sweeper/pruner=none")
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = sorted((outputs / "multirun").rglob(".hydra/overrides.yaml"))
    assert len(jobs) == 4
    for overrides_file in jobs:
        folder = overrides_file.parent
        overrides = list(OmegaConf.load(overrides_file))
        hydra = OmegaConf.load(folder / "hydra.yaml").hydra
        assert list(hydra.overrides.task) == overrides
        assert str(hydra.job.num) == folder.parent.name
        want = compose("config", [*hydra.overrides.hydra, *overrides])
        assert yaml.safe_load((folder / "config.yaml").read_text()) == yaml.safe_load(
            OmegaConf.to_yaml(want))


@pytest.mark.parametrize("overrides", [[], ["dataset=digits", "freeze=gradual"],
                                       ["backbone=vit_b_16", "tracking=server"]])
def test_a_config_resolved_once_is_written_as_omegaconf_writes_it(overrides):
    # a trial resolves its config once for its params, its config.yaml and its kept state
    from sweeper.config import compose, config_yaml, resolved
    from sweeper.tracking import config_params

    cfg = compose("config", overrides)
    assert yaml.safe_load(config_yaml(resolved(cfg))) == yaml.safe_load(
        OmegaConf.to_yaml(cfg, resolve=True))
    assert config_params(resolved(cfg)) == config_params(cfg)


def test_a_trials_resolved_config_is_what_omegaconf_resolves(monkeypatch):
    """A trial after another resolves to what OmegaConf resolves for it: also when it changes
    a value an interpolation reads, its shape, an environment variable the config reads, or
    uses a resolver that gives another value each time."""
    import itertools

    from sweeper.config import compose, resolved

    counter = itertools.count()
    OmegaConf.register_new_resolver("test_counter", lambda: next(counter), replace=True)
    trials = [[], ["freeze.unfrozen=3", "optim.lr_head=0.1"],
              ["freeze.unfrozen=3", "optim.lr_head=0.1", "trainer.seed=2", "dataset.split_seed=3"],
              ["trainer.device=cpu"],  # read by source.trainer.device
              ["trainer.device=cpu", "dataset.image_size=48"],  # ... source.dataset.image_size
              ["paths.outputs=/x"], ["paths.cache=/c", "freeze.unfrozen=1"],
              ["backbone=resnet50"], ["backbone=timm", "backbone.arch=resnet18"],
              ["backbone=timm", "backbone.arch=resnet34"],  # sweeper.num_units reads backbone
              ["freeze.unfrozen=2"], ["+extra.n=${test_counter:}"], ["+extra.n=${test_counter:}"],
              ["+extra.n=${test_counter:}", "freeze.unfrozen=4"], ["freeze.unfrozen=5"], "env"]
    for overrides in trials:
        if overrides == "env":
            monkeypatch.setenv("SWEEPER_OUTPUTS", "/elsewhere")
            overrides = ["freeze.unfrozen=6"]
        cfg = compose("config", overrides)
        got = resolved(cfg)
        want = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]),
                                      resolve=True, enum_to_str=True)
        if "extra" in want:  # the counter moved on: the trial got a value of its own
            assert got["extra"]["n"] == want["extra"]["n"] - 1
            got["extra"]["n"] = want["extra"]["n"]
        assert got == want, overrides
        got["freeze"]["unfrozen"] = -1  # the caller's own copy
        assert resolved(cfg)["freeze"]["unfrozen"] == want["freeze"]["unfrozen"]
    assert got["paths"]["data"] == "/elsewhere/data"


def test_config_yaml_reads_back_as_omegaconf_writes_it():
    # the .hydra/ files and MLflow's config.yaml: strings that read as other types stay
    # strings, long ones with runs of spaces and line breaks come back whole
    from sweeper.config import yaml_text

    long = "python -m sweeper.run freeze.unfrozen=2            one trial\n  and more,   " * 4
    tree = {"a": {"yes": "true", "one": "1", "float": "1e-3", "none": "null", "empty": "",
                  "interp": "${paths.outputs}/data", "long": long, "unicode": "µs ≤ 0.25",
                  "list": [1, "2", 3.5, None, True], "nested": {"k": [{"x": "off"}]}}}
    text = yaml_text(tree)
    assert yaml.safe_load(text) == tree
    assert yaml.safe_load(text) == yaml.safe_load(OmegaConf.to_yaml(OmegaConf.create(tree)))
    assert OmegaConf.create(text) == OmegaConf.create(tree)


def test_a_trial_config_with_more_plain_overrides_is_the_last_one_with_them_set():
    """A trial that sets a key the last one did not (lr_backbone once units train) gets that
    trial's config with the key set: the config Hydra composes for it, without composing."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    from sweeper.config import CONF_DIR
    from sweeper.study import TrialConfigs

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration("config", ["trainer.epochs=2"], RunMode.MULTIRUN)
        configs = TrialConfigs(loader, master)
        composed = []
        compose_one = loader.load_sweep_config
        loader.load_sweep_config = lambda m, o: composed.append(o) or compose_one(m, o)
        jobs = [["freeze.unfrozen=0", "optim.lr_head=0.1", "hydra.sweeper.trial=0"],
                ["freeze.unfrozen=3", "optim.lr_head=0.2", "optim.lr_backbone=0.01",
                 "hydra.sweeper.trial=1"],
                ["freeze.unfrozen=0", "optim.lr_head=0.3", "hydra.sweeper.trial=2"],
                ["freeze.unfrozen=0", "backbone=resnet50", "hydra.sweeper.trial=3"]]
        got = [configs(job) for job in jobs]
        assert composed == [jobs[0], jobs[3]]  # a group choice is composed again
        for job, cfg in zip(jobs, got, strict=True):
            want = compose_one(master, job)
            assert OmegaConf.to_yaml(cfg) == OmegaConf.to_yaml(want)
        assert got[1].optim.lr_backbone == 0.01 and got[2].hydra.overrides.task == jobs[2][:2]
