"""MSNModule wiring: optimizer groups, schedules, clipping, EMA target, prototypes learning."""

import copy

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from msn import backbone
from msn.loss import prototype_probs
from msn.module import MSNModule
from msn.schedules import linear_at
from tests.helpers import tiny_module

B, VIEWS = 8, (16, 16, 8, 8)  # target, one masked anchor, two focal views


class RandomViews(Dataset):
    def __len__(self):
        return 4 * B

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return [torch.randn(1, s, s, generator=g) for s in VIEWS], 0


def _module(**kw):
    kw = {"optim": {"warmup_epochs": 1, "ref_lr": 1e-2}, "mask_ratio": 0.25, "mask_seed": None, **kw}
    return tiny_module(**kw)


class RecordingModule(MSNModule):
    """Keeps a float64 shadow of the EMA computed independently from each step's anchor weights."""

    def on_fit_start(self):
        self.shadow = [p.detach().double().clone() for p in self.target_encoder.parameters()]
        self.momenta, self.lrs = [], []

    def on_train_batch_end(self, outputs, batch, batch_idx):
        m = linear_at(self.global_step - 1, self.total_steps, *self.ema_range)
        self.momenta.append(m)
        self.lrs.append(self.optimizers().optimizer.param_groups[0]["lr"])
        for s, p in zip(self.shadow, self.encoder.parameters()):
            s.mul_(m).add_((1 - m) * p.detach().double())


def _fit(model, steps=3):
    trainer = L.Trainer(
        max_steps=steps,
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(RandomViews(), batch_size=B, drop_last=True))
    return trainer


def test_steps_train_prototypes_and_anchor_and_target_is_ema():
    model = _module()
    model.__class__ = RecordingModule
    start = copy.deepcopy(model)
    _fit(model, steps=3)
    assert not torch.allclose(model.prototypes, start.prototypes)
    assert not torch.allclose(
        model.encoder.blocks[0].attn.qkv.weight, start.encoder.blocks[0].attn.qkv.weight
    )
    assert not torch.allclose(model.head.fc3.weight, start.head.fc3.weight)
    # target moved, but only by EMA: equal to the independently computed float64 shadow
    for s, t in zip(model.shadow, model.target_encoder.parameters()):
        torch.testing.assert_close(t.double(), s, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(model.target_encoder.cls_token, model.encoder.cls_token)
    assert all(not p.requires_grad for p in model.target_encoder.parameters())
    assert model.momenta[0] == pytest.approx(0.996)


def test_optimizer_groups_follow_official_rules():
    model = _module()
    opt = model.configure_optimizers()
    decay, no_decay, protos = opt.param_groups
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(protos["params"]) == {id(model.prototypes)} and protos["weight_decay"] == 0
    assert no_decay["weight_decay"] == 0
    assert id(model.encoder.cls_token) in ids(decay["params"])
    assert id(model.encoder.pos_embed) in ids(decay["params"])
    assert id(model.encoder.patch_embed.proj.weight) in ids(decay["params"])
    assert id(model.encoder.norm.weight) in ids(no_decay["params"])
    assert id(model.head.fc1.bias) in ids(no_decay["params"])
    assert id(model.head.bn1.weight) in ids(no_decay["params"])
    assert all(p.ndim > 1 for p in decay["params"])
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(decay["params"]) + len(no_decay["params"]) + 1 == n_trainable


def test_schedules_are_set_every_step():
    model = _module()
    model.__class__ = RecordingModule
    _fit(model, steps=3)
    # 4 batches per epoch, warmup_epochs=1: the first 3 steps warm up linearly from start_lr
    assert model.steps_per_epoch == 4 and model.warmup_steps == 4
    expected = [2e-4 + (s + 1) / 4 * (1e-2 - 2e-4) for s in range(3)]
    assert model.lrs == pytest.approx(expected)
    assert len(set(model.lrs)) == 3


def test_clipping_covers_encoder_and_head_not_prototypes():
    model = _module(optim={"clip_grad": 1.0})
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0)
    model.configure_gradient_clipping(None)
    params = [*model.encoder.parameters(), *model.head.parameters()]
    total = torch.norm(torch.stack([p.grad.norm() for p in params]))
    assert total == pytest.approx(1.0, rel=1e-4)
    assert torch.all(model.prototypes.grad == 10.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mask_ratio": 1.0}, "mask_ratio"),
        ({"mask_mode": "block"}, "mask_mode"),
        ({"num_prototypes": 0}, "num_prototypes"),
        ({"optim": {"lr": 1}}, "model.optim: unknown keys"),
        ({"prototypes_grad": "max"}, "prototypes_grad"),
        ({"encoder": {"arch": "vit_nano", "patch": 4}}, "model.encoder: unknown keys \\['patch'\\]"),
    ],
)
def test_bad_arguments(kwargs, match):
    base = {
        "encoder": {"arch": "vit_nano", "patch_size": 4, "img_size": 16, "in_chans": 1},
        "head": {"hidden_dim": 32, "out_dim": 16},
        "num_prototypes": 10,
    }
    with pytest.raises(ValueError, match=match):
        MSNModule(**{**base, **kwargs})


def test_problems_of_the_model_node_come_from_their_owners_at_once():
    # Keys relative to the model node: validate_config prefixes "model.", the constructor too.
    assert MSNModule.problems() == []
    assert MSNModule.problems(
        encoder={"arch": "vit_gigantic"},
        head={"out_dim": 0},
        loss={"temperature": 0},
        optim={"ref_lr": -1},
        num_prototypes=0,
        mask_ratio=2,
        ema=[0.9, 1.5],
        features="pixels",
    ) == [
        "encoder.arch='vit_gigantic' is unknown; allowed: vit_nano, vit_micro, vit_tiny, vit_small, "
        "vit_base, vit_large, vit_huge",  # msn.backbone.vit
        "head.out_dim=0 must be an integer >= 1",  # msn.head.ProjectionHead
        "loss.temperature=0 must be a number > 0",  # msn.loss.MSNLoss
        "optim.ref_lr=-1 must be a number >= 0",
        "num_prototypes=0 must be an integer >= 1",  # msn.head
        "mask_ratio=2 must be a number in [0, 1)",  # msn.masking
        "ema=[0.9, 1.5] must be [start, end] momentums in [0, 1]",
        "features='pixels' is unknown; allowed: cls_prenorm, cls, avgpool, last4",  # msn.backbone.vit
    ]
    assert MSNModule.problems(optim={"clip_grad": None}) == []  # null disables clipping, as 0 does
    assert MSNModule.problems(encoder={"patch_size": 5}, mask_mode="blocks", prototypes_grad="max") == [
        "encoder.patch_size=5 is not supported; allowed: (2, 4, 7, 8, 14, 16)",
        "mask_mode='blocks' is unknown; allowed: shared, per_sample",
        "prototypes_grad='max' is unknown; allowed: sum, mean",
    ]
    assert MSNModule.problems(encoder={"img_size": 8}, loss={"sharpen_temperature": -1}) == [
        "encoder.img_size=8 is smaller than one patch (patch_size=16)",
        "loss.sharpen_temperature=-1 must be a number > 0",
    ]
    both = r"^model\.mask_seed=-1 must be null or an integer >= 0; model\.compile=''"
    with pytest.raises(ValueError, match=both):
        MSNModule(mask_seed=-1, compile="")
    with pytest.raises(TypeError):
        MSNModule.problems(mask_ratios=0.1)


def test_prototype_probs_are_target_assignments():
    model = _module().eval()
    x = torch.randn(5, 1, 16, 16)
    probs = model.prototype_probs(x)
    assert probs.shape == (5, 10)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(5))
    # independent computation from the pieces
    _, h = backbone.encode(model.target_encoder, x)
    z = model.target_head(h)
    cos = torch.stack(
        [torch.nn.functional.cosine_similarity(z, p.expand_as(z), dim=1) for p in model.prototypes], 1
    )
    torch.testing.assert_close(probs, torch.softmax(cos / 0.1, dim=1), rtol=1e-5, atol=1e-6)
    # the very function the loss builds its targets from
    assert torch.equal(probs, prototype_probs(z, model.prototypes, model.criterion.temperature))
