"""finetune.py mode=lowshot: loading checkpoints, bad input, the report."""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from msn.checks import ConfigError
from msn.cli.common import CONFIG_DIR
from msn.cli.evaluate import evaluate, evaluation_modes, load_checkpoint
from msn.eval.finetune import FineTuneEvaluation
from msn.eval.knn import KnnEvaluation
from msn.eval.linear_probe import LinearProbeEvaluation
from msn.eval.reports import EvalRun, Evaluation, LowShotEvaluation, build_evaluation
from msn.report import ReportEvaluation
from tests.helpers import composed, tiny_module


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model = tiny_module(num_prototypes=8, mask_ratio=0.15, mask_seed=None)
    with torch.no_grad():  # make target differ from anchor so loading the wrong one shows
        model.target_encoder.cls_token.add_(1.0)
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)
    return path, model


def _cfg(tmp_path, *overrides):
    return composed(
        "finetune",
        f"output_dir={tmp_path}",
        "cache_dir=null",
        "lowshot.shots=[1,2]",
        "lowshot.seeds=[0,1]",
        *overrides,
    )


def test_load_checkpoint_restores_target_encoder(ckpt):
    path, model = ckpt
    loaded = load_checkpoint(path)
    x = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(loaded.features(x), model.eval().features(x))
    assert not loaded.training


def test_missing_and_wrong_kind_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "nope.ckpt")
    (tmp_path / "junk.ckpt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(tmp_path / "junk.ckpt")
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an msn-lightning pre-training checkpoint.*found \\['model'\\]"):
        load_checkpoint(tmp_path / "other.pth")


def test_lowshot_report_on_digits(ckpt, tmp_path):
    out = evaluate(_cfg(tmp_path, f"ckpt={ckpt[0]}"))
    for row in ("MSN target encoder", "random init", "raw pixels"):
        assert row in out["report"]
    table = json.loads((tmp_path / "lowshot.json").read_text())
    assert set(table["raw pixels"]) == {"1", "2"}
    assert all(0 <= v["mean"] <= 100 for res in table.values() for v in res.values())
    png = (tmp_path / "lowshot.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_unlabeled_data_is_a_clear_error(ckpt, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.new("L", (16, 16), color=i * 40).save(folder / f"{i}.png")
    cfg = _cfg(
        tmp_path,
        f"ckpt={ckpt[0]}",
        "data=imagefolder",
        f"data.root={folder}",
        "data.in_chans=1",
        "data.mean=[0.5]",
        "data.std=[0.5]",
    )
    with pytest.raises(ValueError, match="label"):
        evaluate(cfg)


def test_channel_mismatch_and_unknown_mode(ckpt, tmp_path):
    with pytest.raises(ConfigError, match="data.in_chans=3 but the checkpoint's encoder takes 1"):
        evaluate(_cfg(tmp_path, f"ckpt={ckpt[0]}", "data=cifar10"))
    allowed = "cls_prenorm, cls, avgpool, last4"
    with pytest.raises(ConfigError, match=f"features='last7' is unknown; allowed: {allowed}"):
        evaluate(_cfg(tmp_path, f"ckpt={ckpt[0]}", "features=last7"))
    with pytest.raises(
        ConfigError, match="mode='dance' is not available; allowed: lowshot, knn, linear, finetune, report$"
    ):
        evaluate(_cfg(tmp_path, f"ckpt={ckpt[0]}", "mode=dance"))


def test_knn_mode_on_digits(ckpt, tmp_path, caplog):
    with caplog.at_level("INFO", logger="msn"):
        out = evaluate(_cfg(tmp_path, f"ckpt={ckpt[0]}", "mode=knn", "knn.k=5"))
    # Logged (so the run's finetune.log keeps it), with where the results went.
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert out["report"] in logged and f"results in {tmp_path}" in logged
    result = json.loads((tmp_path / "knn.json").read_text())
    assert result["k"] == 5 and result["train"] == 1347
    assert 0 <= result["accuracy"] <= 100
    assert f"{result['accuracy']:.1f} %" in out["report"]


def test_feature_cache_hit_and_invalidation(ckpt, tmp_path, monkeypatch):
    from msn.eval import features as ev

    calls = []
    real = ev.extract_features

    def counting(*args, **kwargs):
        calls.append(kwargs.get("desc"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ev, "extract_features", counting)
    cache_dir = tmp_path / "cache"
    base = [f"ckpt={ckpt[0]}", "mode=knn", f"cache_dir={cache_dir}"]
    first = evaluate(_cfg(tmp_path / "a", *base))
    assert len(calls) == 2 and len(list(cache_dir.glob("*.npz"))) == 1
    second = evaluate(_cfg(tmp_path / "b", *base))
    assert len(calls) == 2  # served from the cache
    assert first["report"] == second["report"]
    # a different eval transform (crop) is a different entry
    evaluate(_cfg(tmp_path / "c", *base, "data.eval_crop_pct=0.5"))
    assert len(calls) == 4
    # rewriting a checkpoint in place invalidates its entries
    copy = tmp_path / "copy.ckpt"
    copy.write_bytes(Path(ckpt[0]).read_bytes())
    evaluate(_cfg(tmp_path / "d", f"ckpt={copy}", "mode=knn", f"cache_dir={cache_dir}"))
    assert len(calls) == 6  # another file: another entry
    state = torch.load(copy, map_location="cpu", weights_only=False)
    state["state_dict"]["target_encoder.cls_token"] += 1.0
    state["note"] = "rewritten"
    torch.save(state, copy)
    evaluate(_cfg(tmp_path / "d2", f"ckpt={copy}", "mode=knn", f"cache_dir={cache_dir}"))
    assert len(calls) == 8
    # a truncated entry is a miss, not a crash
    for f in cache_dir.glob("*.npz"):
        f.write_bytes(b"garbage")
    evaluate(_cfg(tmp_path / "e", *base))
    assert len(calls) == 10


def test_linear_mode_on_digits(ckpt, tmp_path):
    out = evaluate(_cfg(tmp_path, f"ckpt={ckpt[0]}", "mode=linear", "linear.epochs=2", "linear.lr=0.5"))
    result = json.loads((tmp_path / "linear.json").read_text())
    assert result["train"] == 1347 and result["test"] == 450 and result["epochs"] == 2
    assert 0 <= result["accuracy"] <= 100
    assert f"{result['accuracy']:.1f} %" in out["report"]


def test_feature_kind_override_changes_features(ckpt, tmp_path):
    cache = tmp_path / "cache"
    for name, kind in (("a", "null"), ("b", "avgpool")):
        evaluate(
            _cfg(tmp_path / name, f"ckpt={ckpt[0]}", "mode=knn", f"features={kind}", f"cache_dir={cache}")
        )
    entries = [np.load(p)["test_x"] for p in sorted(cache.glob("*.npz"))]
    assert len(entries) == 2  # two feature kinds, two cache entries
    assert entries[0].shape == entries[1].shape and not np.allclose(entries[0], entries[1])


@pytest.mark.parametrize(
    ("mode", "cls"),
    [
        ("lowshot", LowShotEvaluation),
        ("knn", KnnEvaluation),
        ("linear", LinearProbeEvaluation),
        ("finetune", FineTuneEvaluation),
        ("report", ReportEvaluation),
    ],
)
def test_each_evaluation_is_built_from_its_yaml(tmp_path, mode, cls):
    cfg = _cfg(tmp_path, "ckpt=x")
    evaluation = build_evaluation(mode, cfg[mode])
    assert type(evaluation) is cls
    values = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "eval" / f"{mode}.yaml"))
    values.pop("_target_")
    if mode == "lowshot":  # as _cfg sets them
        values.update(shots=[1, 2], seeds=[0, 1])
    assert {key: getattr(evaluation, key) for key in values} == values


def test_bad_values_are_all_reported_before_the_checkpoint_is_read(tmp_path):
    missing = tmp_path / "no_such.ckpt"  # never opened: FileNotFoundError if it were
    cfg = _cfg(tmp_path, f"ckpt={missing}", "mode=knn", "knn.k=0", "knn.temperature=-1", "features=last7")
    with pytest.raises(ConfigError) as err:
        evaluate(cfg)
    assert err.value.problems == [
        "features='last7' is unknown; allowed: cls_prenorm, cls, avgpool, last4",
        "knn.k=0 must be an integer >= 1",
        "knn.temperature=-1 must be > 0",
    ]
    with pytest.raises(ConfigError) as err:
        evaluate(
            _cfg(tmp_path, f"ckpt={missing}", "lowshot.shots=[0]", "lowshot.seeds=[]", "lowshot.lambd=0")
        )
    assert len(err.value.problems) == 3 and "lowshot.shots=[0]" in err.value.problems[0]
    with pytest.raises(ConfigError, match=r"linear.epochs=0 must be >= 1"):
        evaluate(_cfg(tmp_path, f"ckpt={missing}", "mode=linear", "linear.epochs=0"))
    with pytest.raises(ConfigError, match=r"knn: .*unexpected keyword argument 'kk'"):
        evaluate(_cfg(tmp_path, f"ckpt={missing}", "mode=knn", "+knn.kk=3"))


@dataclass
class Echo(Evaluation):
    """A new evaluation, known to finetune.py by its yaml and one defaults entry alone."""

    word: str

    def problems(self) -> list[str]:
        return [] if self.word else ["echo.word must not be empty"]

    def __call__(self, run: EvalRun) -> str:
        run.output_dir.mkdir(parents=True, exist_ok=True)
        (run.output_dir / "echo.json").write_text(json.dumps({"word": self.word}))
        feats = run.model.features(torch.stack([run.test_ds[i][0] for i in range(2)]))
        return f"echo {self.word}: {len(run.train_ds)} train images, features {tuple(feats.shape)}"


def test_a_new_evaluation_needs_a_yaml_and_a_defaults_entry_only(ckpt, tmp_path, caplog):
    configs = tmp_path / "configs"
    (configs / "eval").mkdir(parents=True)
    (configs / "eval" / "echo.yaml").write_text(f"_target_: {__name__}.Echo\nword: hello\n")
    registry = [f"hydra.searchpath=[file://{configs}]", "+eval@echo=echo"]  # the registry line
    cfg = _cfg(tmp_path / "out", f"ckpt={ckpt[0]}", *registry, "mode=echo", "echo.word=hi")
    assert evaluation_modes(cfg) == ["lowshot", "knn", "linear", "finetune", "report", "echo"]
    with caplog.at_level("INFO", logger="msn"):
        out = evaluate(cfg)
    assert out["report"] == "echo hi: 1347 train images, features (2, 96)"
    assert json.loads((tmp_path / "out" / "echo.json").read_text()) == {"word": "hi"}
    assert f"results in {tmp_path / 'out'}" in caplog.text
    with pytest.raises(ConfigError, match="echo.word must not be empty"):
        evaluate(_cfg(tmp_path, f"ckpt={ckpt[0]}", *registry, "mode=echo", "echo.word="))
    with pytest.raises(ConfigError, match="allowed: lowshot, knn, linear, finetune, report, echo$"):
        evaluate(_cfg(tmp_path, f"ckpt={ckpt[0]}", *registry, "mode=echoes"))
