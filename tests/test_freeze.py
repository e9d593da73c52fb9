"""Freezing is complete for every backbone family and every kind of backbone (any torchvision or
timm model, a user's own module): what users rely on when they freeze units."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from sweeper.config import CONF_DIR
from sweeper.model import FAMILIES, build
from sweeper.train import make_optimizer

CONF = OmegaConf.create


def _backbone(name: str, num_units: int):
    kwargs = {"image_size": 32} if name == "vit_b_16" else {}
    return CONF({"name": name, "num_units": num_units, "weights": None, "kwargs": kwargs})


def _num_units(name: str) -> int:
    return OmegaConf.load(CONF_DIR / "backbone" / f"{name}.yaml").num_units


def _other(kind: str, **settings):
    """A backbone of another kind: any torchvision or timm model, or a user's own module."""
    node = {"name": kind, "kind": kind, "num_units": "${sweeper.num_units:}", "weights": None,
            "kwargs": {}, **settings}
    return OmegaConf.create({"backbone": node}).backbone


# One backbone of each other kind, held to the same contract as the six families.
OTHERS = {"torchvision:resnet34": lambda: _other("torchvision", arch="resnet34"),
          "timm:resnet18": lambda: _other("timm", arch="resnet18"),
          "custom:tests.nets.Tiny": lambda: _other("custom", target="tests.nets.Tiny",
                                                   units=["stem", "body"], head="fc")}


OPTIM = CONF({"lr_head": 0.1, "lr_backbone": 0.1, "weight_decay": 0.01, "schedule": "cosine",
              "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "momentum": 0.9}})


def _train_steps(model, steps: int = 2):
    opt = make_optimizer(model, OPTIM)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(4, 3, 32, 32, generator=gen)
        y = torch.randint(0, 3, (4,), generator=gen)
        model.train()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return opt


@pytest.mark.parametrize("name", list(FAMILIES))
def test_units_cover_every_parameter_once(name):
    model, tv_model = build(_backbone(name, _num_units(name)), 3, 0, None)
    seen = [id(p) for unit in model.units for p in unit.parameters()]
    seen += [id(p) for p in model.head.parameters()]
    assert len(seen) == len(set(seen)), "a parameter belongs to two units"
    replaced = FAMILIES[name].classifier + "."
    backbone_params = {id(p) for k, p in tv_model.named_parameters() if not k.startswith(replaced)}
    unit_params = {id(p) for unit in model.units for p in unit.parameters()}
    assert unit_params == backbone_params
    assert model.num_units == _num_units(name) == len(model.unit_names)


@pytest.mark.parametrize("name", [*FAMILIES, *OTHERS])
def test_frozen_prefix_does_not_move_and_the_rest_trains(name):
    torch.manual_seed(0)
    cfg = OTHERS[name]() if name in OTHERS else _backbone(name, _num_units(name))
    n = int(cfg.num_units)
    unfrozen = max(1, n // 3)
    model, _ = build(cfg, 3, unfrozen, None)
    frozen = model.frozen_units()
    before = {k: v.clone() for u, unit in enumerate(frozen) for k, v in
              ((f"{u}.{k}", v) for k, v in unit.state_dict().items())}  # params and BN buffers
    trainable_before = [p.detach().clone() for p in model.parameters() if p.requires_grad]

    opt = _train_steps(model)

    after = {f"{u}.{k}": v for u, unit in enumerate(frozen) for k, v in unit.state_dict().items()}
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"frozen {k} changed"
    trainable_after = [p.detach() for p in model.parameters() if p.requires_grad]
    for b, a in zip(trainable_before, trainable_after, strict=True):
        assert not torch.equal(b, a), "a trainable parameter did not change"
    in_optimizer = {id(p) for g in opt.param_groups for p in g["params"]}
    frozen_params = {id(p) for unit in frozen for p in unit.parameters()}
    assert in_optimizer.isdisjoint(frozen_params)
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    # train() must not put frozen units (BatchNorm, dropout) back into training mode
    model.train()
    assert all(not m.training for unit in frozen for m in unit.modules())
    assert all(m.training for unit in model.trainable_units() for m in unit.modules())


def test_no_backward_through_the_frozen_prefix():
    model, _ = build(_backbone("resnet18", 9), 3, 2, None)
    h = model.forward_frozen(torch.randn(2, 3, 32, 32))
    assert h.grad_fn is None and not h.requires_grad


@pytest.mark.parametrize("unfrozen", ["zero", "all"])
def test_extreme_depths(unfrozen):
    n = 9
    model, _ = build(_backbone("resnet18", n), 3, 0 if unfrozen == "zero" else n, None)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    head = {id(p) for p in model.head.parameters()}
    if unfrozen == "zero":  # a linear probe: the head alone
        assert trainable == head
    else:  # full fine-tuning: everything
        assert trainable == {id(p) for p in model.parameters()}
    trainable_count, frozen_count = model.count_parameters()
    assert trainable_count == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert frozen_count == sum(p.numel() for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_units_compute_the_torchvision_forward(name):
    """Cutting into units changes nothing: their composition is torchvision's own network."""
    torch.manual_seed(0)
    model, tv_model = build(_backbone(name, _num_units(name)), 1000, 0, None)
    tv_model.eval()
    model.eval()
    head = model.head[-1] if isinstance(model.head, torch.nn.Sequential) else model.head
    classifier = tv_model.get_submodule(FAMILIES[name].classifier)
    head.load_state_dict(classifier.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), tv_model(x), rtol=1e-4, atol=1e-4)


def test_target_bn_stats_are_the_frozen_prefix_statistics_on_the_given_images():
    torch.manual_seed(0)
    model, tv = build(_backbone("resnet18", 9), 3, unfrozen=2, state=None)
    trainable_before = {k: v.clone() for k, v in model.units[-2].state_dict().items()}
    x = torch.randn(48, 3, 32, 32) * 2 + 1  # far from the initial statistics (0, 1)
    found = model.adapt_batchnorm(x[i:i + 16] for i in range(0, 48, 16))
    assert found == 15  # stem 1, layer1 4, layer2 5, layer3 5: the frozen prefix's BatchNorms
    with torch.no_grad():
        expected = tv.conv1(x).mean(dim=(0, 2, 3))  # equal batches: mean of batch means
    torch.testing.assert_close(tv.bn1.running_mean, expected, rtol=1e-4, atol=1e-5)
    for k, v in model.units[-2].state_dict().items():  # a trainable unit: untouched
        assert torch.equal(v, trainable_before[k]), k
    assert model.training and all(not m.training for u in model.frozen_units() for m in u.modules())
