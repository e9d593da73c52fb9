"""Pretrained weights: torchvision's cache path offline, local files, and source pretraining."""

from __future__ import annotations

import os
from urllib.parse import urlparse

import pytest
import torch
import torchvision

from sweeper.errors import UserError
from sweeper.model import build, load_into
from sweeper.pretrain import resolve_weights


def _cached_file(torch_home, enum) -> str:
    return str(torch_home / "hub" / "checkpoints" / os.path.basename(urlparse(enum.url).path))


def test_default_weights_load_from_torchvision_cache(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    reference = torchvision.models.resnet18()  # stands in for the ImageNet file
    path = _cached_file(tmp_path / "torch", torchvision.models.ResNet18_Weights.DEFAULT)
    os.makedirs(os.path.dirname(path))
    torch.save(reference.state_dict(), path)

    cfg = make_cfg("backbone.weights=DEFAULT")
    state, origin = resolve_weights(cfg)
    assert origin == "torchvision:ResNet18_Weights.DEFAULT"
    model, tv_model = build(cfg.backbone, 3, 2, state, origin)
    for key, value in reference.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(tv_model.state_dict()[key], value), key
    # The same through an enum name.
    state, _ = resolve_weights(make_cfg("backbone.weights=IMAGENET1K_V1"))
    assert torch.equal(state["conv1.weight"], reference.conv1.weight)


def test_offline_download_names_the_file_and_where_to_put_it(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # nothing listens: offline at once
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    with pytest.raises(UserError) as err:
        resolve_weights(make_cfg("backbone.weights=DEFAULT"))
    expected = _cached_file(tmp_path / "torch", torchvision.models.ResNet18_Weights.DEFAULT)
    assert expected in str(err.value)


def test_unknown_weights_name_lists_the_valid_ones(make_cfg):
    with pytest.raises(UserError, match="IMAGENET1K_V1"):
        resolve_weights(make_cfg("backbone.weights=IMAGENET9K"))


def test_local_state_dict_file(make_cfg, tmp_path):
    reference = torchvision.models.resnet18()
    path = tmp_path / "mine.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)
    cfg = make_cfg(f"backbone.weights={path}")
    state, origin = resolve_weights(cfg)
    _, tv_model = build(cfg.backbone, 3, 0, state, origin)
    assert torch.equal(tv_model.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


def test_weights_that_do_not_fit_are_refused(make_cfg, tmp_path):
    path = tmp_path / "resnet50.pt"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    cfg = make_cfg(f"backbone.weights={path}")
    state, origin = resolve_weights(cfg)
    with pytest.raises(UserError, match="do not fit backbone resnet18"):
        build(cfg.backbone, 3, 0, state, origin)


def test_missing_weights_file(make_cfg, tmp_path):
    with pytest.raises(UserError, match="no such file"):
        resolve_weights(make_cfg(f"backbone.weights={tmp_path}/nope.pt"))


def test_vit_weights_for_another_image_size_are_resampled(make_cfg, tmp_path):
    """ImageNet ViT weights (224 px, 197 tokens) load into a 32 px ViT (5 tokens)."""
    from torchvision.models.vision_transformer import VisionTransformer

    def vit(size):  # ViT-B/16 with one encoder layer: same keys and shapes, quicker
        return VisionTransformer(image_size=size, patch_size=16, num_layers=1, num_heads=12,
                                 hidden_dim=768, mlp_dim=3072)

    big = vit(224)
    state = dict(big.state_dict())
    cfg = make_cfg("backbone=vit_b_16")
    small = vit(32)
    load_into(small, "heads.head", state, "test", "vit_b_16")
    assert small.encoder.pos_embedding.shape == (1, 5, 768)
    assert torch.equal(small.conv_proj.weight, big.conv_proj.weight)
    assert cfg.backbone.kwargs.image_size == 32


def test_source_pretraining_is_logged_cached_and_reused(make_cfg, mlflow_client, outputs):
    tiny_source = ["backbone.weights=source", "dataset@source.dataset=fake",
                   "source.trainer.epochs=1", "source.trainer.batch_size=8",
                   "source.dataset.classes=null", "source.dataset.train_per_class=8",
                   "source.dataset.val_per_class=4", "source.dataset.test_per_class=4"]
    from sweeper.trial import run_trial

    first = run_trial(make_cfg(*tiny_source))
    second = run_trial(make_cfg(*tiny_source, "freeze.unfrozen=0"))
    runs = mlflow_client.search_runs(
        [mlflow_client.get_experiment_by_name("sweeper").experiment_id])
    pretrain = [r for r in runs if r.data.tags.get("sweeper.kind") == "pretrain"]
    assert len(pretrain) == 1, "the source checkpoint must be pretrained once and reused"
    assert pretrain[0].info.status == "FINISHED"
    assert "test_acc" in pretrain[0].data.metrics
    for result in (first, second):
        run = mlflow_client.get_run(result["run_id"])
        assert run.data.tags["pretrain_run_id"] == pretrain[0].info.run_id
        assert run.data.tags["weights"].startswith("source:")
    assert len(list((outputs / "pretrained").glob("resnet18-*.pt"))) == 1
    # A truncated checkpoint is not used: it is rebuilt.
    ckpt = next((outputs / "pretrained").glob("resnet18-*.pt"))
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    run_trial(make_cfg(*tiny_source))
    torch.load(ckpt, weights_only=True)


def _timm(make_cfg, *overrides: str):
    return make_cfg("backbone=timm", "backbone.arch=resnet18", *overrides)


def _hf_cache(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: offline
    return tmp_path / "hf"


def test_timm_weights_load_from_the_hugging_face_cache_without_the_network(make_cfg, tmp_path,
                                                                           monkeypatch):
    import timm
    from safetensors.torch import save_file

    cache = _hf_cache(monkeypatch, tmp_path)
    reference = timm.create_model("resnet18")  # stands in for the published file
    repo = cache / "models--timm--resnet18.a1_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file(reference.state_dict(), repo / "snapshots" / ("0" * 40) / "model.safetensors")

    cfg = _timm(make_cfg, "backbone.weights=DEFAULT")
    state, origin = resolve_weights(cfg)
    assert origin == "timm:timm/resnet18.a1_in1k"
    _, network = build(cfg.backbone, 3, 2, state, origin)
    for key, value in reference.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(network.state_dict()[key], value), key
    # A tag names the same weights; a weights file goes through timm's loader too.
    assert torch.equal(resolve_weights(_timm(make_cfg, "backbone.weights=a1_in1k"))[0]
                       ["conv1.weight"], reference.conv1.weight)
    path = repo / "snapshots" / ("0" * 40) / "model.safetensors"
    state, origin = resolve_weights(_timm(make_cfg, f"backbone.weights={path}"))
    assert origin == str(path) and torch.equal(state["conv1.weight"], reference.conv1.weight)


def test_timm_weights_offline_name_the_file_and_where_to_put_it(make_cfg, tmp_path, monkeypatch):
    cache = _hf_cache(monkeypatch, tmp_path)
    with pytest.raises(UserError) as err:
        resolve_weights(_timm(make_cfg, "backbone.weights=DEFAULT"))
    message = str(err.value)
    assert "timm/resnet18.a1_in1k (model.safetensors)" in message
    assert str(cache) in message and "models--timm--resnet18.a1_in1k" in message
    assert "backbone.weights=/path/to/model.safetensors" in message
    with pytest.raises(UserError, match="Its tags: a1_in1k, a2_in1k"):
        resolve_weights(_timm(make_cfg, "backbone.weights=imagenet9k"))
