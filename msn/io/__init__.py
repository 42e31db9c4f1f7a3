"""Checkpoints in and out: the formats read (:mod:`.formats`), their key names (:mod:`.keys`),
loading into models (:mod:`.load`) and export for other libraries (:mod:`.export`)."""

from msn.io.formats import ENCODERS, FORMATS, Checkpoint, detect_format, encoder_problems, read_checkpoint
from msn.io.keys import hf_encoder_kwargs, hf_to_timm, infer_encoder_kwargs, timm_to_hf, vit_kwargs
from msn.io.load import (
    build_encoder,
    data_stats,
    init_msn_module,
    load_encoder_state,
    msn_module,
    resample_pos_embed,
    set_layer_norm_eps,
)

__all__ = [
    "ENCODERS",
    "FORMATS",
    "Checkpoint",
    "build_encoder",
    "data_stats",
    "detect_format",
    "encoder_problems",
    "hf_encoder_kwargs",
    "hf_to_timm",
    "infer_encoder_kwargs",
    "init_msn_module",
    "load_encoder_state",
    "msn_module",
    "read_checkpoint",
    "resample_pos_embed",
    "set_layer_norm_eps",
    "timm_to_hf",
    "vit_kwargs",
]
