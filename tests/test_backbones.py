"""Any torchvision model, any timm model, your own module: each is cut into freeze units whose
composition is the network's own forward up to its feature vector, with the count the config
derives from it, and mistakes in a config or a unit list get one message naming them."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from sweeper.errors import UserError
from sweeper.model import build, check_backbone, count_units

TORCHVISION = ["resnet34", "densenet121", "regnet_y_400mf", "efficientnet_v2_s", "swin_t"]
TIMM = ["resnet18", "vit_tiny_patch16_224", "convnext_atto", "efficientnet_b0"]
# Units by the generic rule, and by timm's layer groups (documented in README, "Freeze units").
COUNTS = {("torchvision", "resnet34"): 17, ("torchvision", "densenet121"): 8,
          ("torchvision", "regnet_y_400mf"): 17, ("torchvision", "efficientnet_v2_s"): 42,
          ("torchvision", "swin_t"): 16, ("timm", "resnet18"): 9,
          ("timm", "vit_tiny_patch16_224"): 13, ("timm", "convnext_atto"): 13,
          ("timm", "efficientnet_b0"): 17}


def backbone(kind: str, arch: str | None = None, **settings):
    node = {"name": arch or "mine", "kind": kind, "num_units": "${sweeper.num_units:}",
            "weights": None, "kwargs": {}, **settings}
    if arch is not None:
        node["arch"] = arch
    if kind == "timm" and arch.startswith("vit"):
        node["kwargs"] = {"img_size": 32}
    return OmegaConf.create({"backbone": node}).backbone


def custom(target: str = "tests.nets.Tiny", units=("stem", "body"), head: str = "fc"):
    return backbone("custom", target=target, units=list(units), head=head)


def _same_forward(net, original, classifier) -> None:
    """The units and a head holding the classifier's weights compute the original network."""
    original.eval()
    net.eval()
    head = net.head[-1] if isinstance(net.head, torch.nn.Sequential) else net.head
    head.load_state_dict(classifier.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), original(x), rtol=1e-4, atol=1e-4)


def _every_parameter_once(net, original, classifier) -> None:
    units = [id(p) for u in net.units for p in u.parameters()]
    assert len(units) == len(set(units)), "a parameter belongs to two units"
    replaced = {id(p) for p in classifier.parameters()}
    assert set(units) == {id(p) for p in original.parameters() if id(p) not in replaced}


@pytest.mark.parametrize(("kind", "arch"), [*(("torchvision", a) for a in TORCHVISION),
                                            *(("timm", a) for a in TIMM)])
def test_any_library_model_is_cut_into_units_that_compute_its_forward(kind, arch):
    torch.manual_seed(0)
    cfg = backbone(kind, arch)
    assert cfg.num_units == COUNTS[kind, arch] == count_units(cfg)
    net, original = build(cfg, 1000, 0, None)
    assert net.num_units == COUNTS[kind, arch] == len(net.unit_names)
    classifier = original.get_classifier() if kind == "timm" else \
        [m for m in original.modules() if isinstance(m, torch.nn.Linear)][-1]
    _every_parameter_once(net, original, classifier)
    _same_forward(net, original, classifier)


def test_the_generic_rule_agrees_with_the_hand_cut_families_where_they_match():
    """ResNeXt-50 by the generic rule is cut as the hand-cut ResNet-50: stem + 16 blocks."""
    generic, _ = build(backbone("torchvision", "resnext50_32x4d"), 3, 0, None)
    family, _ = build(backbone("torchvision", "resnet50"), 3, 0, None)
    assert generic.unit_names == family.unit_names == ["stem", *(
        f"layer{i}.{j}" for i, n in enumerate((3, 4, 6, 3), 1) for j in range(n))]


def test_a_flat_stage_of_layers_is_cut_at_its_pooling_layers():
    net, _ = build(backbone("torchvision", "vgg11"), 3, 1, None)
    assert net.unit_names == [f"features[{a}:{b}]" for a, b in
                              [(0, 2), (3, 5), (6, 10), (11, 15), (16, 20)]]


def test_code_that_depends_on_the_mode_runs_in_the_mode_of_its_unit():
    """timm's head dropout (drop_rate) is traced in train and eval mode: a frozen unit runs
    the eval graph, a trainable one the train graph."""
    torch.manual_seed(0)
    cfg = backbone("timm", "resnet18", kwargs={"drop_rate": 0.5})
    net, original = build(cfg, 1000, 1, None)
    _same_forward(net, original, original.get_classifier())
    net.train()
    last = net.units[-1]
    assert last.training and type(last).__name__ == "DualUnit"
    h = torch.ones(4, 512, 2, 2)
    assert not torch.equal(last(h), last.eval()(h))  # dropout only in train mode


def test_your_own_module_in_the_units_you_name():
    torch.manual_seed(0)
    cfg = custom()
    assert cfg.num_units == 2
    net, original = build(cfg, 10, 1, None)
    assert net.unit_names == ["stem", "body"]
    _every_parameter_once(net, original, original.fc)
    _same_forward(net, original, original.fc)
    # A builder function with kwargs works the same.
    net, original = build(backbone("custom", target="tests.nets.tiny", units=["stem", "body"],
                                   head="fc", kwargs={"width": 4}), 10, 2, None)
    assert original.fc.in_features == 8 and net.head.in_features == 8


@pytest.mark.parametrize(("cfg", "expected"), [
    (lambda: custom(units=("stem", "bodyy")), ["bodyy is not a module", "stem, body, pool, fc"]),
    (lambda: custom(units=("stem", "body", "body.0")), ["body.0 is inside body"]),
    (lambda: custom(units=("stem",)), ["outside every unit: body.0, body.1"]),
    (lambda: custom(units=("body", "stem")), ["in the order stem, body"]),
    (lambda: custom(target="tests.nets.Skip", units=("stem", "body", "proj")),
     ["more than one tensor flows from unit body", "the outputs of stem, body"]),
    (lambda: custom(head="body"), ["not the nn.Linear classifier"]),
    (lambda: custom(target="tests.nets.nope"), ["cannot be imported"]),
    (lambda: custom(target="tests.nets.not_a_module"), ["returned a str"]),
])
def test_a_unit_list_that_does_not_cut_the_forward_says_what_is_wrong(cfg, expected):
    with pytest.raises(UserError) as err:
        build(cfg(), 10, 1, None)
    for text in expected:
        assert text in str(err.value)


@pytest.mark.parametrize(("node", "expected"), [
    ({"_target_": "torchvision.models.resnet34"}, "backbone._target_ is not a setting of a "
                                                  "torchvision backbone"),
    ({"units": ["a"]}, "backbone.units is not a setting of a torchvision backbone"),
    ({"kind": "keras"}, "backbone.kind=keras is not a kind of backbone"),
    ({"arch": "resnet9000"}, "Did you mean"),
])
def test_a_backbone_key_nothing_reads_is_an_error_naming_it(node, expected):
    cfg = OmegaConf.merge(backbone("torchvision", "resnet18"), node)
    with pytest.raises(UserError, match=expected):
        check_backbone(cfg)


def test_timm_unknown_model_and_missing_arch():
    with pytest.raises(UserError, match="is not a timm model"):
        check_backbone(backbone("timm", "resnet9000"))
    with pytest.raises(UserError, match="needs backbone.arch"):
        check_backbone(OmegaConf.create({"name": "x", "kind": "timm", "arch": None,
                                         "num_units": 1}))
