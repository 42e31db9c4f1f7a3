"""Import of official, Hugging Face and timm checkpoints (msn.io), against the libraries' own models."""

import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from msn.backbone import embed_tokens, forward_tokens
from msn.io import (
    build_encoder,
    detect_format,
    hf_to_timm,
    init_msn_module,
    read_checkpoint,
    timm_to_hf,
)
from msn.module import MSNModule
from tests.artefacts import (
    ENCODER,
    hidden_states,
    msn_module,
    official_dict,
    randomize_,
    save_lightning,
    timm_vit,
)

X = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
TOL = {"atol": 1e-5, "rtol": 0}


def _hf_config(**kw):
    from transformers import ViTMSNConfig

    base = dict(
        hidden_size=96,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=384,
        image_size=16,
        patch_size=4,
        num_channels=1,
    )
    return ViTMSNConfig(**{**base, **kw})


# ---------------------------------------------------------------------------------------- official
@pytest.mark.parametrize("prefix", ["module.", ""])
@pytest.mark.parametrize("extras", [True, False], ids=["head+prototypes", "encoder-only"])
def test_official_target_encoder_imports_to_same_outputs(tmp_path, prefix, extras):
    target, anchor = timm_vit(seed=1), timm_vit(seed=2)
    payload = official_dict(target, anchor, prefix=prefix, with_head=extras, with_prototypes=extras)
    assert payload["target_encoder"][f"{prefix}blocks.0.attn.qkv.weight"].shape == (288, 96)  # fused qkv
    path = tmp_path / "msn.pth.tar"
    torch.save(payload, path)

    ckpt = read_checkpoint(path)
    assert ckpt.format == "official" and detect_format(path) == "official"
    assert ckpt.encoder_kwargs == {
        "arch": "vit_nano",
        "patch_size": 4,
        "img_size": 16,
        "in_chans": 1,
        "depth": 2,
    }
    assert (ckpt.prototypes is not None) == extras and bool(ckpt.heads) == extras
    with torch.no_grad():
        torch.testing.assert_close(build_encoder(ckpt).forward_features(X), target.forward_features(X), **TOL)
        torch.testing.assert_close(
            build_encoder(ckpt, "encoder").forward_features(X), anchor.forward_features(X), **TOL
        )


def test_released_checkpoint_without_anchor_and_explicit_missing_encoder(tmp_path):
    path = tmp_path / "vits16.pth.tar"
    torch.save(official_dict(timm_vit(seed=3)), path)
    ckpt = read_checkpoint(path)
    assert set(ckpt.encoders) == {"target_encoder"}
    with pytest.raises(ValueError, match="has no encoder; it holds: target_encoder"):
        build_encoder(ckpt, "encoder")
    with pytest.raises(ValueError, match="encoder='student' is unknown"):
        build_encoder(ckpt, "student")


def test_full_official_checkpoint_initialises_pretraining(tmp_path):
    target, anchor = timm_vit(seed=4), timm_vit(seed=5)
    payload = official_dict(target, anchor)
    path = tmp_path / "full.pth.tar"
    torch.save(payload, path)
    model = MSNModule(encoder=ENCODER, head={"hidden_dim": 32, "out_dim": 16}, num_prototypes=8)
    loaded = init_msn_module(model, path)
    assert loaded == {
        "encoder": "encoder",
        "target_encoder": "target_encoder",
        "target_head": "target_head",
        "head": "head",
        "prototypes": "prototypes",
    }
    torch.testing.assert_close(model.prototypes.data, payload["prototypes"])
    torch.testing.assert_close(model.head.fc3.weight, payload["encoder"]["module.fc.fc3.weight"])
    torch.testing.assert_close(model.target_head.fc1.bias, payload["target_encoder"]["module.fc.fc1.bias"])
    with torch.no_grad():
        torch.testing.assert_close(model.encoder.forward_features(X), anchor.forward_features(X), **TOL)
        torch.testing.assert_close(
            model.target_encoder.forward_features(X), target.forward_features(X), **TOL
        )


def test_released_checkpoint_starts_anchor_as_copy_and_checks_prototypes(tmp_path):
    target = timm_vit(seed=6)
    path = tmp_path / "released.pth.tar"
    torch.save(official_dict(target), path)
    model = MSNModule(encoder=ENCODER, head={"hidden_dim": 32, "out_dim": 16}, num_prototypes=8)
    loaded = init_msn_module(model, path)
    assert loaded["encoder"] == "target_encoder" and loaded["head"] == "target_head"
    torch.testing.assert_close(model.encoder.cls_token, target.cls_token)
    wrong = MSNModule(encoder=ENCODER, head={"hidden_dim": 32, "out_dim": 16}, num_prototypes=4)
    with pytest.raises(
        ValueError, match=r"prototypes of .*: \(8, 16\) in the checkpoint, \(4, 16\) in the model"
    ):
        init_msn_module(wrong, path)
    small_head = MSNModule(encoder=ENCODER, head={"hidden_dim": 8, "out_dim": 16}, num_prototypes=8)
    with pytest.raises(ValueError, match="does not fit the model's projection head"):
        init_msn_module(small_head, path)


# ---------------------------------------------------------------------------------------- HF
@pytest.mark.parametrize("cls_name", ["ViTMSNModel", "ViTMSNForImageClassification"])
def test_hf_folder_imports_to_same_outputs(tmp_path, cls_name):
    transformers = pytest.importorskip("transformers")
    if cls_name == "ViTMSNModel":
        hf = transformers.ViTMSNModel(_hf_config())
    else:
        hf = transformers.ViTMSNForImageClassification(
            _hf_config(
                num_labels=3, id2label={0: "cat", 1: "dog", 2: "owl"}, label2id={"cat": 0, "dog": 1, "owl": 2}
            )
        )
    randomize_(hf, 7).eval()
    hf.save_pretrained(tmp_path / "hf")

    ckpt = read_checkpoint(tmp_path / "hf")
    assert ckpt.format == "hf" and ckpt.encoder_kwargs == ENCODER
    vit = build_encoder(ckpt)
    with torch.no_grad():
        out = hf(pixel_values=X, output_hidden_states=False)
    if cls_name == "ViTMSNModel":
        torch.testing.assert_close(hidden_states(vit, X), out.last_hidden_state, **TOL)
        assert ckpt.classifier is None
    else:
        assert ckpt.id2label == {0: "cat", 1: "dog", 2: "owl"}
        logits = torch.nn.functional.linear(hidden_states(vit, X)[:, 0], **ckpt.classifier)
        torch.testing.assert_close(logits, out.logits, **TOL)


def test_hf_transformers5_layout_and_layer_norm_eps(tmp_path):
    """Weights saved under the in-memory transformers 5 names (layers.{i}.attention.q_proj) with
    HF's plain-ViT eps 1e-12 load too; the eps is carried over so outputs match exactly."""
    transformers = pytest.importorskip("transformers")
    config = _hf_config(layer_norm_eps=1e-12)
    hf = randomize_(transformers.ViTMSNModel(config), 8).eval()
    folder = tmp_path / "hf5"
    folder.mkdir()
    (folder / "config.json").write_text(config.to_json_string())
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(".q_proj." in k for k in state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})

    ckpt = read_checkpoint(folder)
    vit = build_encoder(ckpt)
    assert ckpt.layer_norm_eps == 1e-12 and vit.norm.eps == 1e-12
    with torch.no_grad():
        torch.testing.assert_close(hidden_states(vit, X), hf(pixel_values=X).last_hidden_state, **TOL)


def test_qkv_split_and_fuse_are_inverse():
    state = timm_vit(seed=9).state_dict()
    hf = timm_to_hf(state)
    d = 96
    q, k, v = state["blocks.1.attn.qkv.weight"].split(d)
    torch.testing.assert_close(hf["encoder.layer.1.attention.attention.query.weight"], q)
    torch.testing.assert_close(hf["encoder.layer.1.attention.attention.key.weight"], k)
    torch.testing.assert_close(hf["encoder.layer.1.attention.attention.value.weight"], v)
    back, unexpected = hf_to_timm(timm_to_hf(state, prefix="vit."))
    assert unexpected == [] and set(back) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(back[key], value)
    with pytest.raises(KeyError, match="reg_token"):
        timm_to_hf({"reg_token": torch.zeros(1)})


# ---------------------------------------------------------------------------------------- timm
def test_timm_state_dict_files_import(tmp_path):
    vit = timm_vit(seed=10, num_classes=5)
    plain = tmp_path / "vit.pth"
    torch.save(vit.state_dict(), plain)
    wrapped = tmp_path / "train_ckpt.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in vit.state_dict().items()}, "epoch": 1}, wrapped)
    safe = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(safe))
    for path in (plain, wrapped, safe):
        ckpt = read_checkpoint(path)
        assert ckpt.format == "timm" and ckpt.classifier["weight"].shape == (5, 96)
        enc = build_encoder(ckpt)
        with torch.no_grad():
            torch.testing.assert_close(enc.forward_features(X), vit.forward_features(X), **TOL)
            logits = torch.nn.functional.linear(enc.forward_features(X)[:, 0], **ckpt.classifier)
            torch.testing.assert_close(logits, vit(X), **TOL)


def test_position_embeddings_are_interpolated_for_another_image_size(tmp_path):
    """Loading a 16 px checkpoint at 32 px gives what the original encoder computes at 32 px
    (its forward resamples the table on the fly, the same way)."""
    model = msn_module(seed=11)
    path = save_lightning(model, tmp_path / "last.ckpt")
    vit32 = build_encoder(read_checkpoint(path), img_size=32)
    assert vit32.pos_embed.shape == (1, 1 + 64, 96)
    x32 = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        expected = model.target_encoder.norm(
            forward_tokens(model.target_encoder, embed_tokens(model.target_encoder, x32))
        )
        torch.testing.assert_close(vit32.forward_features(x32), expected, **TOL)
    # ...and an MSNModule built for 32 px takes the 16 px weights with init_from semantics
    big = MSNModule(
        encoder={**ENCODER, "img_size": 32}, head={"hidden_dim": 32, "out_dim": 16}, num_prototypes=8
    )
    init_msn_module(big, path)
    torch.testing.assert_close(big.target_encoder.pos_embed, vit32.pos_embed)


def test_lightning_checkpoints_are_read_completely(tmp_path):
    model = msn_module(seed=12)
    ckpt = read_checkpoint(save_lightning(model, tmp_path / "last.ckpt"))
    assert ckpt.format == "msn-lightning" and ckpt.meta == {"epoch": 3}
    fresh = MSNModule(**ckpt.hparams)
    init_msn_module(fresh, ckpt)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


# ---------------------------------------------------------------------------------------- errors
def test_bad_paths_and_formats_fail_with_one_clear_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        read_checkpoint(tmp_path / "missing.pth.tar")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="folder without config.json"):
        read_checkpoint(tmp_path / "empty_dir")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type='bert'; expected 'vit_msn'"):
        read_checkpoint(tmp_path / "bert")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps({"model_type": "vit_msn"}))
    with pytest.raises(FileNotFoundError, match="no weights file in the folder"):
        read_checkpoint(tmp_path / "noweights")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        read_checkpoint(tmp_path / "junk.pth")
    torch.save({"weights": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "other.pth")
    with pytest.raises(
        ValueError, match=r"not an msn-lightning pre-training checkpoint.*found \['weights'\]"
    ):
        read_checkpoint(tmp_path / "other.pth")
    hf_keys = timm_to_hf(timm_vit().state_dict())
    save_file({k: v.contiguous() for k, v in hf_keys.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="without their config.json: pass the save_pretrained folder"):
        read_checkpoint(tmp_path / "model.safetensors")


def test_missing_unexpected_and_mismatched_keys_are_reported(tmp_path, caplog):
    state = timm_vit().state_dict()
    broken = {k: v for k, v in state.items() if not k.startswith("blocks.1.mlp")}
    broken["blocks.0.attn.rel_pos"] = torch.zeros(3)
    torch.save(broken, tmp_path / "broken.pth")
    ckpt = read_checkpoint(tmp_path / "broken.pth")
    with pytest.raises(
        ValueError,
        match=r"4 missing key\(s\): blocks.1.mlp.fc1.bias, .*; 1 unexpected key\(s\): blocks.0.attn.rel_pos "
        r"\(strict=false loads the rest anyway\)",
    ):
        build_encoder(ckpt)
    with caplog.at_level(logging.WARNING, logger="msn"):
        vit = build_encoder(ckpt, strict=False)
    assert "4 missing key(s)" in caplog.text
    torch.testing.assert_close(vit.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])

    wide = VisionTransformerLike(embed_dim=192)
    torch.save(wide, tmp_path / "wide.pth")
    model = MSNModule(encoder=ENCODER, head={"hidden_dim": 32, "out_dim": 16}, num_prototypes=8)
    with pytest.raises(
        ValueError, match=r"shapes differ: cls_token: \(1, 1, 192\) in the checkpoint, \(1, 1, 96\)"
    ):
        init_msn_module(model, tmp_path / "wide.pth")


def VisionTransformerLike(embed_dim: int) -> dict:  # noqa: N802 - reads like a constructor
    """A timm ViT state dict of another width (192, a registry width: heads are known)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=16, patch_size=4, in_chans=1, embed_dim=embed_dim, depth=2, num_heads=3, num_classes=0
    ).state_dict()


def test_unknown_width_needs_num_heads(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(
        img_size=16, patch_size=4, in_chans=1, embed_dim=80, depth=1, num_heads=5, num_classes=0
    )
    torch.save(vit.state_dict(), tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="heads of a 80-wide encoder.*num_heads=..."):
        read_checkpoint(tmp_path / "odd.pth")
    ckpt = read_checkpoint(tmp_path / "odd.pth", num_heads=5)
    assert ckpt.encoder_kwargs["num_heads"] == 5
    with torch.no_grad():
        torch.testing.assert_close(
            build_encoder(ckpt).forward_features(X), vit.eval().forward_features(X), **TOL
        )


@pytest.mark.slow
def test_train_py_continues_from_a_full_official_checkpoint(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    torch.save(official_dict(timm_vit(seed=13), timm_vit(seed=14)), tmp_path / "full.pth.tar")
    root = Path(__file__).resolve().parents[2]
    cmd = [
        sys.executable,
        str(root / "train.py"),
        f"hydra.run.dir={tmp_path / 'run'}",
        f"init_from={tmp_path / 'full.pth.tar'}",
        "+model.encoder.depth=2",
        "model.encoder.patch_size=4",  # the checkpoint's patch size (msn_artefacts.ENCODER)
        "model.head.hidden_dim=32",
        "model.head.out_dim=16",
        "model.num_prototypes=8",
        "trainer.max_steps=1",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "data.batch_size=16",
        "lowshot.enabled=false",
        "report.enabled=false",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    for part in (
        "target_encoder <- target_encoder",
        " encoder <- encoder",
        "head <- head",
        "prototypes <- prototypes",
    ):
        assert part in log

    proc = subprocess.run([*cmd, "model.num_prototypes=4"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "(8, 16) in the checkpoint, (4, 16) in the model" in proc.stderr
