"""The source pretraining's recipe per backbone (``backbone.pretrain``): a deep network from
scratch warms its learning rate up and starts its residual blocks as the identity, or it
diverges (ResNet-50 at source.optim's 0.05: test accuracy at chance); ResNet-18, which has no
recipe, pretrains exactly as before and keeps its checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from omegaconf import OmegaConf

from sweeper import pretrain
from sweeper import schedule as sched
from sweeper.errors import UserError

OPTIM = OmegaConf.create({"lr_head": 0.1, "lr_backbone": 0.05, "weight_decay": 0.0,
                          "layer_decay": 1.0, "schedule": "cosine"})


def test_warmup_raises_every_rate_linearly_then_follows_the_schedule():
    plain = sched.depth_schedule(9, 9, OPTIM, 8, 2)
    warm = sched.depth_schedule(9, 9, OmegaConf.merge(OPTIM, {"warmup_epochs": 0.5}), 8, 2)
    assert plain.warmup_steps == 0 and warm.warmup_steps == 4
    for unit in (None, 0, 8):
        for step in range(4):
            assert math.isclose(warm.lr_factor(unit, step),
                                plain.lr_factor(unit, step) * (step + 1) / 4)
        assert [warm.lr_factor(unit, s) for s in range(4, 16)] == \
            [plain.lr_factor(unit, s) for s in range(4, 16)]
    # No warm-up (0, or a config from before the key) is the schedule as it was.
    zero = sched.depth_schedule(9, 9, OmegaConf.merge(OPTIM, {"warmup_epochs": 0}), 8, 2)
    assert [zero.lr_factor(None, s) for s in range(16)] == [plain.lr_factor(None, s) for s in range(16)]
    with pytest.raises(UserError, match="warmup_epochs"):
        sched.depth_schedule(9, 9, OmegaConf.merge(OPTIM, {"warmup_epochs": -1}), 8, 2)


def test_zero_init_residual_is_torchvisions():
    ours, theirs = torchvision.models.resnet50(), torchvision.models.resnet50(zero_init_residual=True)
    assert pretrain.zero_init_residual(ours) == 16
    zeroed = {k for k, v in theirs.state_dict().items() if k.endswith(".weight") and not v.any()}
    assert zeroed and zeroed == {k for k, v in ours.state_dict().items()
                                 if k.endswith(".weight") and not v.any()}
    assert pretrain.zero_init_residual(torchvision.models.mobilenet_v3_small()) == 0


def test_recipes_per_backbone_and_resnet18_keeps_its_checkpoint(make_cfg):
    r18 = make_cfg("backbone=resnet18", "backbone.weights=source")
    assert pretrain.recipe_of(r18.backbone) == {}
    assert "pretrain" not in pretrain.checkpoint_key(r18)  # the key, and so the file, as before
    r50 = make_cfg("backbone=resnet50", "backbone.weights=source")
    assert pretrain.recipe_of(r50.backbone) == {"warmup_epochs": 0.5, "zero_init_residual": True}
    for backbone in ("mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "vit_b_16"):
        cfg = make_cfg(f"backbone={backbone}", "backbone.weights=source")
        recipe = pretrain.recipe_of(cfg.backbone)
        assert recipe["warmup_epochs"] > 0, backbone
        # BatchNorm momentum 0.01: statistics re-estimated after pretraining
        assert recipe.get("reestimate_bn", False) == (backbone in ("mobilenet_v3_small",
                                                                    "efficientnet_b0")), backbone
    with pytest.raises(UserError, match="backbone.pretrain.warmup"):
        pretrain.recipe_of(OmegaConf.create({"pretrain": {"warmup": 1}}))


def test_source_pretraining_applies_the_recipe(make_cfg, outputs, monkeypatch):
    seen = []
    fit = pretrain.fit
    monkeypatch.setattr(pretrain, "fit", lambda model, data, trainer, optim, *a, **kw: (
        seen.append(float(optim.get("warmup_epochs", 0))), fit(model, data, trainer, optim, *a, **kw))[1])
    tiny_source = ["backbone.weights=source", "dataset@source.dataset=fake",
                   "source.trainer.epochs=1", "source.trainer.batch_size=8",
                   "source.dataset.classes=null", "source.dataset.train_per_class=8",
                   "source.dataset.val_per_class=4", "source.dataset.test_per_class=4",
                   "source.optim.lr_head=0", "source.optim.lr_backbone=0"]  # weights stay as set
    pretrain.source_checkpoint(make_cfg(*tiny_source))
    recipe = ["+backbone.pretrain.warmup_epochs=0.5", "+backbone.pretrain.zero_init_residual=true"]
    path = pretrain.source_checkpoint(make_cfg(*tiny_source, *recipe))
    assert seen == [0.0, 0.5]
    state = torch.load(path, weights_only=True)["state_dict"]
    assert not state["layer1.0.bn2.weight"].any() and state["layer1.0.bn1.weight"].all()
    assert len(list((outputs / "pretrained").glob("resnet18-*.pt"))) == 2  # a checkpoint each


def test_reestimate_bn_replaces_what_the_momentum_left(make_cfg, outputs, monkeypatch):
    """With ``reestimate_bn`` the checkpoint's running statistics are re-estimated on the source
    images after training (every unit's BatchNorm layers), not what the momentum left."""
    seen = []
    monkeypatch.setattr(pretrain, "reestimate_batchnorm", lambda model, split, *a: (
        seen.append((model.cut, len(split))), (0, 0.0))[1])
    tiny_source = ["backbone.weights=source", "dataset@source.dataset=fake",
                   "source.trainer.epochs=1", "source.trainer.batch_size=8",
                   "source.dataset.classes=null", "source.dataset.train_per_class=8",
                   "source.dataset.val_per_class=4", "source.dataset.test_per_class=4"]
    pretrain.source_checkpoint(make_cfg(*tiny_source))
    assert seen == []  # no recipe, no re-estimation (ResNet-18's checkpoint as before)
    cfg = make_cfg(*tiny_source, "+backbone.pretrain.reestimate_bn=true")
    pretrain.source_checkpoint(cfg)
    (cut, images), = seen  # every unit frozen for it (all re-estimated), all training images
    assert cut == int(cfg.backbone.num_units) and images > 0 and images % 8 == 0
