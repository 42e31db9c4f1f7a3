"""MSN pre-training entry point (``python train.py`` / ``msn-train``), configured by Hydra.

Builds everything from the config with ``hydra.utils.instantiate``, fits, then evaluates the
target encoder with the official low-shot protocol and prints the table.

Failures end with one message and an exit code: 2 for an invalid config (before any compute), 1
for a run stopped by a guard (non-finite loss, collapse with ``stop``, unreadable images with
``on_bad_image=raise``, a checkpoint that cannot be written); a run stopped by SIGTERM, SIGUSR1
or Ctrl-C saves its checkpoint, prints the command that resumes it and exits 0.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from msn.checks import ConfigError
from msn.cli.common import BAD_CONFIG, hydra_entry
from msn.cli.console import progress_bar, quiet_lightning
from msn.data.decode import BadImageError, bad_image_summary
from msn.eval.reports import MSN_ROW, EvalRun, build_evaluation
from msn.io.load import init_msn_module
from msn.module import REFERENCE_BATCH, global_batch, scaled_optim
from msn.report import PAGE, REPORT_DIR, log_report_images
from msn.training.checkpointing import CheckpointWriteError, ResumeCheckpoint
from msn.training.config import validate_config, writable_problem
from msn.training.guards import PreemptionHandler, TrainingAborted
from msn.training.loggers import WANDB_RUN_ID, LoggerRecord, recorded_logger_ids, wandb_resume_kwargs
from msn.training.precision import AUTO, explain_precision
from msn.training.resume import (
    RunRecord,
    check_resume_point,
    requested_ckpt_path,
    resolve_ckpt_path,
    run_signature,
)

log = logging.getLogger("msn")


def resume_command(output_dir: Path) -> str:
    """The command line that continues this run in its own folder: this run's overrides, with
    ``ckpt_path=last`` and ``hydra.run.dir`` set to ``output_dir``."""
    overrides: list[str] = []
    if HydraConfig.initialized():
        overrides = [
            o for o in HydraConfig.get().overrides.task if o.split("=", 1)[0].lstrip("+~") != "ckpt_path"
        ]
    words = ["python", "train.py", *overrides, "ckpt_path=last", f"hydra.run.dir={output_dir}"]
    return " ".join(shlex.quote(w) for w in words)


def _wandb_offline_if_no_key(logger_cfg: DictConfig) -> None:
    # A run must never die because nobody logged in to wandb: log offline into the run dir.
    wb = logger_cfg.get("wandb")
    if wb is not None and not os.environ.get("WANDB_API_KEY") and not Path("~/.netrc").expanduser().exists():
        wb.offline = True


def built(group: str, cfg: DictConfig, **kwargs: Any) -> Any:
    """``instantiate(cfg)``; a constructor's complaint (a misspelt key, a bad value) becomes a
    one-line :class:`~msn.training.config.ConfigError` that names the config group."""
    try:
        return instantiate(cfg, _convert_="all", **kwargs)
    except InstantiationException as err:
        cause = err.__cause__ or err
        raise ConfigError([f"{group}: {' '.join(str(cause).split())}"]) from err


def build_loggers(cfg: DictConfig, wandb_run_id: str | None = None) -> list[Any]:
    """The loggers of ``cfg.logger``; ``wandb_run_id`` (a resumed checkpoint's) continues that
    wandb run unless ``logger.wandb.id`` names one."""
    _wandb_offline_if_no_key(cfg.logger)
    loggers = []
    for name, node in cfg.logger.items():
        if node is None:
            continue
        extra = wandb_resume_kwargs(node, wandb_run_id) if name == "wandb" else {}
        if extra:
            log.info("wandb: continuing run %s of the resumed checkpoint", extra["id"])
        loggers.append(instantiate(node, **extra))
    return loggers


def build_callbacks(cfg: DictConfig) -> list[Any]:
    return [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]


def recipe_summary(cfg: DictConfig, model: Any, world_size: int, precision: str | None = None) -> str:
    """What will run, in a few lines: model, views, masking, batch, schedule, precision
    (``precision``: what ``trainer.precision`` resolved to, when it was ``auto``)."""
    m, d, t = cfg.model, cfg.data, cfg.trainer
    batch = global_batch(d.batch_size, world_size, t.accumulate_grad_batches)
    o = scaled_optim(model.optim_cfg, batch)  # the rates the run will use
    scaling = ""
    if o["lr_scaling"] != "none":
        scaling = f" (lr_scaling={o['lr_scaling']}: x {batch}/{REFERENCE_BATCH})"
    compute = f"{t.precision} -> {precision}" if precision not in (None, str(t.precision)) else t.precision
    experiment = HydraConfig.get().runtime.choices.get("experiment") if HydraConfig.initialized() else None
    enc = model.encoder
    views = d.transform
    steps = f"{t.max_steps} steps" if t.max_steps and t.max_steps > 0 else f"{t.max_epochs} epochs"
    lines = [
        f"recipe {cfg.name} (experiment={experiment or 'none'}):",
        f"  model    {m.encoder.arch}/{m.encoder.patch_size} ({enc.embed_dim} wide, {len(enc.blocks)} "
        f"blocks), head {m.head.hidden_dim}-{m.head.out_dim}, {m.num_prototypes} prototypes",
        f"  views    1 target + {views.rand_views} anchor at {views.rand_size} px (mask {m.mask_ratio}, "
        f"{m.mask_mode}), {views.focal_views} focal at {views.focal_size} px, made in the {d.augment_on}",
        f"  batch    {d.batch_size} x {world_size} process(es) x {t.accumulate_grad_batches} accumulated "
        f"= {batch} per step",
        f"  schedule {steps}, lr {o['start_lr']:g} -> {o['ref_lr']:g} ({o['warmup_epochs']:g} warmup epochs)"
        f" -> {o['final_lr']:g}, wd {o['ref_wd']:g} -> {o['final_wd']:g}{scaling}",
        f"  compute  {compute}, strategy {t.strategy}, {t.accelerator}",
    ]
    return "\n".join(lines)


def startup_notes(
    cfg: DictConfig, model: Any, world_size: int, precision_note: str | None = None
) -> list[str]:
    """One line for each thing of this run that differs from the official recipe without saying so:
    the global batch with unscaled lrs, accumulated micro-batches, and what ``precision=auto`` chose."""
    d, t = cfg.data, cfg.trainer
    accumulate = t.accumulate_grad_batches
    batch = global_batch(d.batch_size, world_size, accumulate)
    notes = []
    if model.optim_cfg["lr_scaling"] == "none" and batch != REFERENCE_BATCH:
        linear = scaled_optim(model.optim_cfg, batch, rule="linear")
        notes.append(
            f"lr: global batch {batch} != {REFERENCE_BATCH} of the official recipe; model.optim.lr_scaling="
            f"linear would use ref_lr {linear['ref_lr']:g}, start_lr {linear['start_lr']:g}"
        )
    if accumulate > 1:
        # The loss (and its batch statistics) is computed per forward; accumulation only sums gradients.
        micro = global_batch(d.batch_size, world_size)
        notes.append(
            f"accumulate: trainer.accumulate_grad_batches={accumulate}: ME-MAX and Sinkhorn see each "
            f"micro-batch of {micro} images only, not the {batch} of the accumulated step, so the "
            f"regulariser differs from that of one batch of {batch}"
        )
    if precision_note is not None:
        notes.append(precision_note)
    return notes


def run_evaluation(key: str, model: Any, datamodule: Any, cfg: DictConfig, output_dir: Path) -> str | None:
    """The evaluation ``cfg.<key>`` (``lowshot``, ``report``) of the trained model, as
    ``finetune.py mode=<key>`` runs it; None when the data has none of what it needs (labels for
    the low-shot table)."""
    evaluation = build_evaluation(key, cfg[key])
    try:
        train_ds, test_ds = evaluation.datasets(datamodule)
    except ValueError as err:  # unlabeled data: nothing to evaluate, not an error
        log.info("skipping the %s evaluation: %s", key, err)
        return None
    run = EvalRun(
        train_ds=train_ds,
        test_ds=test_ds,
        dataset=cfg.data.name,
        output_dir=output_dir,
        seed=cfg.seed,
        device=model.device,
        datamodule=datamodule,
        preloaded=model,
    )
    return evaluation(run)


def objective_value(lowshot: dict[str, Any], column: str) -> float:
    """The number a hyper-parameter sweeper optimises: mean accuracy of the first MSN row of
    ``lowshot.json`` in ``column`` (``"1"`` for k=1, ``"10%"``, a subset file's stem ...)."""
    row = next((name for name in lowshot if name.startswith(MSN_ROW)), None)
    if row is None:
        raise ConfigError([f"optimized_metric={column!r}: the low-shot table has no MSN row"])
    if column not in lowshot[row]:
        raise ConfigError(
            [f"optimized_metric={column!r} is not a low-shot column; this run has: {', '.join(lowshot[row])}"]
        )
    return float(lowshot[row][column]["mean"])


def train(cfg: DictConfig) -> dict[str, Any]:
    """Validate, build, fit and evaluate. Returns paths and metrics of the run."""
    quiet_lightning()
    validate_config(cfg)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    signature = run_signature(cfg)
    ckpt_path = resolve_ckpt_path(requested_ckpt_path(cfg.ckpt_path), output_dir, signature)
    if ckpt_path is not None:
        check_resume_point(ckpt_path)
    L.seed_everything(cfg.seed, workers=True)
    # Lightning has no precision "auto": decided here, for the accelerator the trainer will use.
    requested = cfg.trainer.get("precision", "32-true")
    precision, why = explain_precision(requested, cfg.trainer.get("accelerator", "auto"))
    precision_note = None
    if requested == AUTO:
        precision_note = f"precision: trainer.precision=auto -> {precision} ({why})"
    # A resumed run continues the wandb run of its checkpoint (ckpt_path=last, a file, a SLURM requeue).
    wandb_id = None
    if ckpt_path is not None and cfg.logger.get("wandb") is not None:
        wandb_id = recorded_logger_ids(ckpt_path).get(WANDB_RUN_ID)

    datamodule = built("data", cfg.data)
    model = built("model", cfg.model)
    try:  # the training images are listed and probed now, so that a wrong folder stops before compute
        datamodule.setup("fit")
    except BadImageError:
        raise
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError([f"data: {err}"]) from err
    if cfg.get("init_from"):
        # Weights only, any format msn.io reads (ours, official .pth.tar, HF, timm); the
        # schedules start afresh from them.
        try:
            loaded = init_msn_module(model, cfg.init_from)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError([f"init_from={cfg.init_from!r}: {err}"]) from err
        log.info("init_from %s: %s", cfg.init_from, ", ".join(f"{k} <- {v}" for k, v in loaded.items()))
    callbacks = [*build_callbacks(cfg), RunRecord(signature, str(output_dir)), LoggerRecord()]
    bar = progress_bar() if cfg.trainer.get("enable_progress_bar", True) else None
    callbacks += [bar] if bar is not None else []
    loggers = build_loggers(cfg, wandb_id) or False
    trainer = built("trainer", cfg.trainer, precision=precision, logger=loggers, callbacks=callbacks)
    if trainer.is_global_zero:
        print(recipe_summary(cfg, model, trainer.world_size, precision), flush=True)
        for note in startup_notes(cfg, model, trainer.world_size, precision_note):
            print(note, flush=True)
    log.info("output dir: %s", output_dir)

    start = time.perf_counter()
    stopped_by_lightning = False
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        # Lightning's own stop, for a SIGTERM before PreemptionHandler took over (or without it).
        stopped_by_lightning = True
    finally:
        summary = bad_image_summary(getattr(datamodule, "bad_image_log", None))
        if summary and trainer.is_global_zero:
            print(summary, flush=True)
    fit_seconds = time.perf_counter() - start
    result: dict[str, Any] = {"output_dir": str(output_dir), "fit_seconds": fit_seconds}
    resume_cb = next((cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ResumeCheckpoint)), None)
    if resume_cb is not None and resume_cb.last_model_path:
        result["last_checkpoint"] = resume_cb.last_model_path

    preemption = next((cb for cb in trainer.callbacks if isinstance(cb, PreemptionHandler)), None)
    if preemption is not None and preemption.preempted_by is not None:
        result["preempted_by"] = preemption.preempted_by
        if trainer.is_global_zero:
            requeued = "; the SLURM job was requeued" if preemption.requeued else ""
            print(
                f"stopped by {preemption.preempted_by}: checkpoint of step {preemption.saved_step} "
                f"saved to {result.get('last_checkpoint')}{requeued}\n"
                f"resume with: {resume_command(output_dir)}",
                flush=True,
            )
        return result
    if stopped_by_lightning:
        result["preempted_by"] = "SIGTERM"
        if trainer.is_global_zero:
            saved = result.get("last_checkpoint") or "no checkpoint yet"
            print(f"stopped by SIGTERM (last checkpoint: {saved}); resume with ckpt_path=last", flush=True)
        return result

    if cfg.lowshot.enabled and trainer.is_global_zero:
        table = run_evaluation("lowshot", model, datamodule, cfg, output_dir)
        if table is not None:
            print("\n" + table, flush=True)
            result["lowshot_table"] = table
            result["lowshot"] = json.loads((output_dir / "lowshot.json").read_text())
    if cfg.report.enabled and trainer.is_global_zero:
        text = run_evaluation("report", model, datamodule, cfg, output_dir)
        if text is not None:
            sent = log_report_images(trainer.loggers, output_dir / REPORT_DIR, model.global_step)
            if sent:
                text += f"\n  images also logged to {', '.join(sent)}"
            print("\n" + text, flush=True)
            result["report"] = str(output_dir / REPORT_DIR / PAGE)
    print(f"pre-training: {fit_seconds:.0f} s; outputs in {output_dir}", flush=True)
    return result


def train_task(cfg: DictConfig) -> float | None:
    """:func:`train`, then the value a Hydra sweeper optimises (``optimized_metric``), if any."""
    result = train(cfg)
    metric = cfg.get("optimized_metric")
    if metric is None:
        return None
    # A stopped run or one without labels has no table, which must not pass for a score.
    if "lowshot" not in result:
        raise ConfigError(
            [f"optimized_metric={str(metric)!r} needs the low-shot table (lowshot.enabled and labelled data)"]
        )
    value = objective_value(result["lowshot"], str(metric))
    print(f"optimized_metric {metric}: {value:.2f}", flush=True)
    return value


# The default experiment and the group choices it was made for (configs/experiment/digits.yaml).
DEFAULT_RECIPE = ("digits", {"data": "digits", "model": "vit_nano"})


def without_foreign_default_recipe(overrides: list[str]) -> list[str]:
    """``overrides`` with ``~experiment`` added when they choose other data or another model than
    the default experiment was made for and name no experiment themselves."""
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o or o.startswith("~")}
    if "experiment" in keys:
        return overrides
    for override in overrides:
        key, _, value = override.partition("=")
        if DEFAULT_RECIPE[1].get(key.lstrip("+"), value) != value:
            log.info("data/model chosen without an experiment: experiment=%s is left out", DEFAULT_RECIPE[0])
            return [*overrides, "~experiment"]
    return overrides


def exit_on_unwritable_run_dir(overrides: list[str]) -> None:
    """Exit 2 with one line when ``hydra.run.dir`` / ``hydra.sweep.dir`` given on the command line
    cannot be created (Hydra would end in a traceback before any of our checks run)."""
    for override in overrides:
        key, _, value = override.partition("=")
        if key in ("hydra.run.dir", "hydra.sweep.dir") and value and "${" not in value:
            problem = writable_problem(value, key)
            if problem:
                print(f"error: {problem}", file=sys.stderr)
                sys.exit(2)


def main() -> None:
    """Console-script entry (``msn-train``); same as ``python train.py``."""
    entry = hydra_entry(
        "train",
        train_task,
        # Reading errors during training are bugs, not input: they keep their traceback.
        bad_input=BAD_CONFIG,
        stopped=(TrainingAborted, BadImageError, CheckpointWriteError),
    )
    sys.argv[1:] = without_foreign_default_recipe(sys.argv[1:])
    exit_on_unwritable_run_dir(sys.argv[1:])
    entry()


__all__ = [
    "main",
    "objective_value",
    "resume_command",
    "train",
    "train_task",
    "without_foreign_default_recipe",
]
