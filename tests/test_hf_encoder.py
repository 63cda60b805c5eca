"""``loss.encoder=hf:<folder>``: tiny ViT / CLIP / DINOv2 checkpoints saved by the test itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="optional extra lpdseg[hf] not installed")

from lpdseg.errors import CheckpointError, ConfigError  # noqa: E402
from lpdseg.models.encoders import build_encoder  # noqa: E402
from lpdseg.models.hf_encoder import HFEncoder, looks_untrained  # noqa: E402

torch.set_num_threads(2)
TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=32,
    patch_size=8,
)
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _norm(x: torch.Tensor, mean, std) -> torch.Tensor:
    """What the encoder must feed its network: RGB normalised with the encoder's statistics."""
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _perturb_norms(model: torch.nn.Module) -> None:
    """Make the weights look trained (LayerNorm gains away from 1)."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.weight.data += 0.1 * torch.randn(m.weight.shape, generator=g)


def _save(model, folder: Path, stats: bool = True) -> Path:
    model.save_pretrained(folder)
    if stats:
        (folder / "preprocessor_config.json").write_text(
            json.dumps({"image_mean": list(MEAN), "image_std": list(STD)})
        )
    return folder


@pytest.fixture(scope="module")
def vit_random(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = transformers.ViTModel(transformers.ViTConfig(**TINY), add_pooling_layer=False)
    return _save(model, tmp_path_factory.mktemp("vit_random"))


@pytest.fixture(scope="module")
def vit_trained(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(1)
    model = transformers.ViTModel(transformers.ViTConfig(**TINY), add_pooling_layer=False)
    _perturb_norms(model)
    return _save(model, tmp_path_factory.mktemp("vit_trained")), model.eval()


@pytest.fixture(scope="module")
def clip_trained(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(2)
    cfg = transformers.CLIPConfig(
        text_config=dict(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            vocab_size=100,
            max_position_embeddings=16,
        ),
        vision_config=TINY,
        projection_dim=24,
    )
    model = transformers.CLIPModel(cfg)
    _perturb_norms(model)
    return _save(model, tmp_path_factory.mktemp("clip")), model.eval()


def test_vit_dense_and_embed_match_the_model(vit_trained):
    folder, ref = vit_trained
    enc = HFEncoder(folder, (0.1, 0.1, 0.1), (1.0, 1.0, 1.0))  # the folder's stats win
    assert enc.embed_dim == 32 and not enc.random_weights
    x = torch.rand(2, 3, 32, 40)  # 40 px is not a multiple of 8: resized to 40 -> 5 patches
    dense = enc.dense(x)
    assert dense.shape == (2, 32, 4, 5)
    with torch.no_grad():
        pix = _norm(x, MEAN, STD)
        hidden = ref(pixel_values=pix, interpolate_pos_encoding=True).last_hidden_state
    assert torch.allclose(dense, hidden[:, 1:].transpose(1, 2).reshape(2, 32, 4, 5), atol=1e-5)
    assert torch.allclose(enc.embed(x), hidden[:, 0], atol=1e-5)
    assert not any(p.requires_grad for p in enc.parameters())


def test_renormalisation_uses_the_preprocessor_config(vit_trained):
    folder, ref = vit_trained
    model_mean, model_std = (0.7, 0.5, 0.6), (0.1, 0.2, 0.15)
    enc = HFEncoder(folder, model_mean, model_std)
    raw = torch.rand(1, 3, 32, 32)  # pixels in [0, 1], what every lpdseg model takes
    theirs = _norm(raw, MEAN, STD)  # the preprocessor config's statistics, not the model's
    assert torch.allclose(enc.renormalise(raw), theirs, atol=1e-6)
    with torch.no_grad():
        expect = ref(pixel_values=theirs).last_hidden_state[:, 0]
    assert torch.allclose(enc.embed(raw), expect, atol=1e-4)


def test_clip_uses_the_vision_tower_and_projection(clip_trained):
    folder, ref = clip_trained
    enc = HFEncoder(folder, MEAN, STD)
    assert enc.embed_dim == 24 and not enc.random_weights
    assert not hasattr(enc, "text_model")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expect = ref.get_image_features(pixel_values=_norm(x, MEAN, STD))
        if not isinstance(expect, torch.Tensor):  # newer transformers return an output object
            expect = expect.pooler_output
    assert torch.allclose(enc.embed(x), expect, atol=1e-5)
    assert enc.dense(x).shape == (2, 24, 4, 4)


def test_dinov2_drops_cls_token(tmp_path):
    torch.manual_seed(3)
    model = transformers.Dinov2Model(transformers.Dinov2Config(**TINY))
    _perturb_norms(model)
    folder = _save(model, tmp_path / "dino", stats=False)  # no preprocessor: ImageNet default
    enc = HFEncoder(folder, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        out = model.eval()(pixel_values=_norm(x, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    assert torch.allclose(enc.embed(x), out.pooler_output, atol=1e-5)
    assert torch.allclose(enc.dense(x).flatten(2).transpose(1, 2), out.last_hidden_state[:, 1:])


def test_random_weights_refused_unless_allowed(vit_random, vit_trained):
    assert looks_untrained(HFEncoder(vit_random, MEAN, STD))
    with pytest.raises(ConfigError, match="allow_random_encoder"):
        build_encoder(f"hf:{vit_random}", backbone=None, model_mean=MEAN, model_std=STD)
    enc = build_encoder(
        f"hf:{vit_random}", backbone=None, model_mean=MEAN, model_std=STD, allow_random=True
    )
    assert enc.random_weights
    trained = build_encoder(f"hf:{vit_trained[0]}", backbone=None, model_mean=MEAN, model_std=STD)
    assert not trained.random_weights


def test_bad_folders(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        HFEncoder(tmp_path, MEAN, STD)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(ConfigError, match="not supported"):
        HFEncoder(tmp_path, MEAN, STD)


def test_training_step_with_hf_encoder(vit_trained, tmp_path, overrides):
    from lpdseg.config import load_config
    from lpdseg.data.synthetic import write_dataset
    from lpdseg.engine.train import train

    data = tmp_path / "data"
    write_dataset(data, n_train=8, n_val=2, n_test=0, size=32, seed=0, progress=False)
    extra = ["model.embed_dim=32", f"loss.encoder=hf:{vit_trained[0]}"]
    cfg = load_config("demo", overrides(data, tmp_path / "run", *extra))
    summary = train(cfg, progress=False, evaluate_test=False)
    assert summary["step"] == 2
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    sims = [json.loads(line)["sim"] for line in lines if '"sim"' in line]
    assert len(sims) == 2 and all(s == s for s in sims)  # finite similarity loss from the ViT
