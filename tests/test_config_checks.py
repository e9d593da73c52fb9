"""Config mistakes are caught before any work: one message naming the key, the value and what
would be valid (sweeper/validate.py; the study's settings: sweeper.study.check_settings)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from sweeper.config import task_config
from sweeper.errors import UserError
from sweeper.study import check_settings, settings_in
from sweeper.validate import check_config
from tests.test_cli_errors import _fails_cleanly

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

# (overrides, what the message must say): each a mistake a user can make on the command line.
MISTAKES = [
    (["freeze.unfrozen=abc"], "freeze.unfrozen=abc is not valid: use an integer >= 0"),
    (["freeze.unfrozen=2.5"], "freeze.unfrozen=2.5 is not valid"),
    (["freeze.unfrozen=-1"], "freeze.unfrozen=-1 is not valid"),
    (["freeze.unfrozen=10"], "freeze.unfrozen=10 is outside 0..9"),
    (["freeze.transferred=11"], "freeze.transferred=11 is outside 0..9"),
    (["freeze.bn_stats=batch"], "freeze.bn_stats=batch is not valid: use one of source, target"),
    (["optim.lr_head=-0.1"], "optim.lr_head=-0.1 is not valid: use a number >= 0"),
    (["optim.lr_backbone=fast"], "optim.lr_backbone=fast is not valid"),
    (["optim.weight_decay=-1"], "optim.weight_decay=-1 is not valid: use a number >= 0"),
    (["optim.schedule=linear"], "optim.schedule=linear is not valid: use one of cosine, constant"),
    (["trainer.batch_size=0"], "trainer.batch_size=0 is not valid: use an integer >= 1"),
    (["trainer.epochs=0"], "trainer.epochs=0 is not valid: use an integer >= 1"),
    (["trainer.amp=maybe"], "trainer.amp=maybe is not valid: use true or false"),
    (["trainer.num_threads=0"], "trainer.num_threads=0 is not valid"),
    (["trainer.device=tpu"], "trainer.device=tpu is not a device"),
    (["dataset.train_per_class=0"], "dataset.train_per_class=0 is not valid: use an integer >= 1"),
    (["dataset.image_size=0"], "dataset.image_size=0 is not valid"),
    (["dataset.std=[0.5,0]"], "dataset.std=[0.5, 0] is not valid"),
    (["dataset.mean=[0.5,0.5]", "dataset.std=[0.2,0.2]"], "give one value each"),
    (["dataset.num_classes=1"], "dataset.num_classes=1 is not valid: use an integer >= 2"),
    (["dataset=fashion_mnist", "dataset.train_per_class=6000"],
     "asks for 6100 images per class; dataset fashion_mnist (kind fashion_mnist) has 6000"),
    (["dataset=fashion_mnist", "dataset.classes=[5]"], "needs at least two classes"),
    (["dataset=fashion_mnist", "dataset.classes=[5,12]"], "has classes 0..9"),
    (["dataset=digits", "dataset.test_per_class=150"], "asks for 230 images per class"),
    (["dataset=fashion_mnist", "dataset.test_per_class=2000"], "test set has 1000 images"),
    (["dataset=image_folder", "dataset.on_bad_image=ignore"],
     "dataset.on_bad_image=ignore is not valid: use one of skip, fail"),
    (["dataset=image_folder", "dataset.root=/no/such/images"],
     "dataset.root=/no/such/images is not a folder"),
    (["cache.dtype=int8"], "cache.dtype=int8 is not valid: use one of float16, bfloat16, float32"),
    (["cache.mode=always"], "cache.mode=always is not valid"),
    (["cache.memory_budget_mb=-5"], "cache.memory_budget_mb=-5 is not valid"),
    (["augment.crop_padding=-4"], "augment.crop_padding=-4 is not valid"),
    (["cache.mode=on", "augment=crop_flip"], "cache.mode=on, but the train transform is random"),
    (["backbone=vit_b_16", "dataset.image_size=30"],
     "dataset.image_size=30: torchvision's vit_b_16 cannot take 30x30 images"),
    (["backbone=torchvision", "backbone.arch=vit_b_32"],
     "build it for this size: '+backbone.kwargs.image_size=${dataset.image_size}'"),
    (["backbone=torchvision", "backbone.arch=vgg11", "dataset.image_size=8"],
     "vgg11 cannot take 8x8 images"),
    (["backbone.weights=/no/such/weights.pt"], "backbone.weights=/no/such/weights.pt: no such file"),
    (["backbone.weights=source", "source.trainer.epochs=0"],
     "source.trainer.epochs=0 is not valid: use an integer >= 1"),
    (["backbone.weights=source", "source.dataset.train_per_class=5900"],
     "source.dataset.train_per_class=5900"),
    (["tracking.experiment=''"], "tracking.experiment= is not valid: use a non-empty string"),
    # a key added with + that is a near miss of a setting: a typo, whose value nothing reads
    (["+trainer.epoch=3"], "trainer.epoch is not a setting (did you mean trainer.epochs?)"),
    (["+freeze.unfroze=3"], "freeze.unfroze is not a setting (did you mean freeze.unfrozen?)"),
    (["+optim.lr_heads=0.1"], "optim.lr_heads is not a setting (did you mean optim.lr_head?)"),
    (["freeze=gradual", "+freeze.head_epoch=2"], "did you mean freeze.head_epochs?"),
    (["backbone.weights=source", "+source.trainer.batchsize=8"],
     "source.trainer.batchsize is not a setting (did you mean source.trainer.batch_size?)"),
    (["tracking.uri=foo://bar"], "tracking.uri=foo://bar: cannot open the MLflow tracking store"),
    (["tracking.uri=http://127.0.0.1:9"], "no MLflow tracking server answers there"),
]
if not torch.cuda.is_available():
    MISTAKES.append((["trainer.device=cuda:7"], "trainer.device=cuda:7 but no CUDA device"))


@pytest.mark.parametrize(("overrides", "message"), MISTAKES,
                         ids=[" ".join(o) for o, _ in MISTAKES])
def test_each_mistake_is_named_with_what_is_valid(make_cfg, overrides, message):
    with pytest.raises(UserError) as e:
        check_config(make_cfg(*overrides))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_the_packaged_configs_pass(make_cfg):
    check_config(make_cfg())
    check_config(make_cfg("dataset=digits", "freeze.unfrozen=9", "optim=adamw",
                          "augment=crop_flip", "backbone.weights=source", tiny=False))
    check_config(make_cfg("backbone=vit_b_16", "dataset.image_size=32"))
    # keys of one's own (logged as params), not near misses of a setting, are kept
    check_config(make_cfg("+trainer.note=x", "+optim.comment=baseline", "freeze=progressive"))


def test_paths_that_cannot_be_written(make_cfg, tmp_path):
    file = tmp_path / "a-file"
    file.write_text("")
    with pytest.raises(UserError, match=f"paths.outputs={file}/outputs cannot be created: {file} "
                                        "is a file, not a folder"):
        check_config(make_cfg(f"paths.outputs={file}/outputs"))
    with pytest.raises(UserError, match=f"paths.cache={file}/cache cannot be created"):
        check_config(make_cfg(f"paths.cache={file}/cache"))


SWEEP_MISTAKES = [  # (override, command-line sweep, message)
    ("hydra.sweeper.n_trials=0", None, "hydra.sweeper.n_trials=0 is not valid: use an integer >= 1"),
    ("hydra.sweeper.n_jobs=0", None, "hydra.sweeper.n_jobs=0 is not valid: use an integer >= 1"),
    ("hydra.sweeper.max_failure_rate=2", None, "hydra.sweeper.max_failure_rate=2 is not valid"),
    ("hydra.sweeper.grace_period=1", None, "grace_period=1 is not longer than"),
    ("hydra.sweeper.progress=fancy", None, "hydra.sweeper.progress=fancy is not valid"),
    ("hydra.sweeper.objectives.val_acc=up", None, "objectives.val_acc=up is not valid"),
    (None, "optim.lr_head=interval(-1, 1)",
     "hydra.sweeper.params.optim.lr_head searches FloatDistribution"),
    (None, "freeze.unfrozen=range(0, 13)", "freeze.unfrozen=12 is outside 0..9"),
    (None, "trainer.batch_size=0,8", "trainer.batch_size=0 is not valid"),
    (None, "optim.weight_decay=-1", "optim.weight_decay=-1 is not valid"),
    ("hydra.sweeper.storage=postgresql://user:secret@127.0.0.1:9/db", None,
     "hydra.sweeper.storage=postgresql://user:***@127.0.0.1:9/db: cannot open the Optuna storage"),
]


@pytest.mark.parametrize(("override", "sweep", "message"), SWEEP_MISTAKES,
                         ids=[o or s for o, s, _ in SWEEP_MISTAKES])
def test_each_sweep_mistake_is_named(outputs, override, sweep, message):
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF, TINY

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, f"paths.outputs={outputs}",
                                           *([override] if override else [])],
                      return_hydra_config=True)
    task = task_config(cfg)
    settings = settings_in(task, cfg.hydra.sweeper)
    OmegaConf.resolve(settings)
    with pytest.raises(UserError) as e:
        check_settings(settings, task, [sweep] if sweep else [])
    assert message in str(e.value)
    assert "secret" not in str(e.value)


@pytest.mark.parametrize(("overrides", "message"), [
    (("freeze.unfrozen=abc",), "freeze.unfrozen=abc is not valid"),
    (("backbone=vit_b_16", "dataset.image_size=30", "backbone.weights=source"),
     "dataset.image_size=30: torchvision's vit_b_16 cannot take 30x30 images"),
    (("trainer.batch_size=0",), "trainer.batch_size=0 is not valid"),
])
def test_from_the_command_line_before_anything_is_written(cli, outputs, overrides, message):
    done = cli(*overrides)
    _fails_cleanly(done, message)
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert list(outputs.iterdir()) == []  # no data, cache, checkpoint, run folder or lock


def test_a_study_checks_its_settings_before_any_trial(cli, outputs):
    done = cli("hydra.sweeper.n_trials=0", flags=("-m",))
    _fails_cleanly(done, "hydra.sweeper.n_trials=0 is not valid: use an integer >= 1")
    assert not (outputs / "optuna").exists() and not (outputs / "multirun").exists()
    done = cli("optim.lr_head=-1,0.1", flags=("-m",))
    _fails_cleanly(done, "optim.lr_head=-1 is not valid")
