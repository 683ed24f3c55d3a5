"""Checkpoint directories: checked before use, written atomically."""

from __future__ import annotations

import shutil
from pathlib import Path

from flywheel.errors import UserError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def require_checkpoint(path: Path) -> Path:
    """A `save_pretrained` directory with a config and weights, or a one-line UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model path {path} does not exist")
    if not (path / "config.json").is_file():
        raise UserError(f"model path {path} has no config.json: not a save_pretrained checkpoint")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise UserError(f"model path {path} has no weights ({', '.join(WEIGHT_FILES)})")
    return path


def save_checkpoint(model, tokenizer, target: Path) -> Path:
    """save_pretrained (safetensors) plus tokenizer into `target`, renamed into place last."""
    target = Path(target)
    scratch = target.with_name(target.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    model.save_pretrained(scratch, safe_serialization=True)
    tokenizer.save_pretrained(scratch)
    shutil.rmtree(target, ignore_errors=True)
    scratch.rename(target)
    return target
