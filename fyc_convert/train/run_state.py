"""The resume contract: what an interrupted run leaves behind, and which options a resumed run must share with it.

Two files, both in the loop's `out_dir` (the job's `<output>/checkpoints`):

- `run.json` (RUN_STATE), written by the job before fine-tuning starts: the options the state before fine-tuning
  depends on (JOB_FIELDS) and the accuracies measured up to calibration, so a resumed run skips them;
- `finetune.pt` (CHECKPOINT_NAME), written by the loop for the starting point and after every epoch: the
  loop's options (LOOP_FIELDS), its precision and world size, the model, optimizer, schedule, history.

Both are checked the same way (`check_same`): every recorded field must equal this run's, and a mismatch is one
TrainingError that names the field, both values and what to do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fyc_convert.errors import TrainingError, describe
from fyc_convert.files import atomic_path, write_text_atomic
from fyc_convert.options import FinetuneConfig

CHECKPOINT_NAME = "finetune.pt"  # the one checkpoint file in `FinetuneConfig.out_dir`, replaced every epoch
CHECKPOINT_FORMAT = "fyc-finetune/1"
RUN_STATE = "run.json"  # what happened before fine-tuning (accuracies, calibration), written before epoch 0
RUN_FORMAT = "fyc-run/1"
# Options the state before fine-tuning depends on (the swap, the data, calibration).
JOB_FIELDS = ("head", "arch", "arch_kwargs", "layer", "data", "val_split", "distill", "fixed_scale", "bias",
              "seed", "hadamard_size", "temperature", "distill_weight")
# Options of the training loop.
LOOP_FIELDS = ("epochs", "max_epochs", "target_drop", "patience", "lr", "batch_size", "optimizer", "momentum",
               "weight_decay", "cosine", "distill", "temperature", "distill_weight", "seed", "class_lr_eta_mu",
               "class_lr_cutoff", "class_lr_layers")
_RESUME_HINT = "resume with the same options or start over (--force instead of --resume)"


def fields_of(config: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """{name: value} of `config`, as JSON would give them back (tuples as lists, paths as text)."""
    return _plain({k: getattr(config, k) for k in names})


def check_same(source: str, recorded: dict[str, Any], now: dict[str, Any]) -> None:
    """Raise one TrainingError for the first field of `now` whose value differs from `recorded`'s.

    `source` names what recorded it, e.g. "checkpoint out/checkpoints/finetune.pt".
    """
    recorded = _plain(recorded)
    for key, value in _plain(now).items():
        if recorded.get(key) != value:
            raise TrainingError(f"{source} was written with {key}={recorded.get(key)!r} but this run has "
                                f"{key}={value!r}; {_RESUME_HINT}")


# ---------------------------------------------------------------------------------------------- run.json


def write_run_state(ckpt_dir: Path, opts: Any, accuracy: dict[str, Any]) -> None:
    """Record the job's options (JOB_FIELDS) and the accuracies measured before fine-tuning."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state = {"format": RUN_FORMAT, "options": fields_of(opts, JOB_FIELDS), "accuracy": accuracy}
    write_text_atomic(ckpt_dir / RUN_STATE, json.dumps(state, indent=2) + "\n")


def read_run_state(ckpt_dir: Path, opts: Any) -> dict[str, Any] | None:
    """The state an interrupted run wrote before fine-tuning, checked against this run's options (None: none)."""
    path = ckpt_dir / RUN_STATE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TrainingError(f"cannot read {path} ({describe(e)}); start over (--force instead of --resume)") from e
    if not isinstance(state, dict) or state.get("format") != RUN_FORMAT:
        raise TrainingError(f"{path} is not a fyc-convert run state; start over (--force instead of --resume)")
    # a run state written before temperature/distill_weight were recorded: those two are not checked
    names = tuple(k for k in JOB_FIELDS if k in state["options"])
    check_same(f"the interrupted run in {ckpt_dir.parent}", state["options"], fields_of(opts, names))
    return state


# ---------------------------------------------------------------------------------------------- finetune.pt


def checkpoint_header(config: FinetuneConfig, *, precision: str, world: int) -> dict[str, Any]:
    """The part of a checkpoint a resumed run is checked against (`load_checkpoint`)."""
    return {"format": CHECKPOINT_FORMAT, "config": fields_of(config, LOOP_FIELDS), "precision": precision,
            "world_size": world}


def write_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write `payload` (a `checkpoint_header` and the loop's state) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path | None, config: FinetuneConfig, *, precision: str, world: int) -> dict[str, Any]:
    """Read the checkpoint to resume from and check that it fits this run (options, precision, processes)."""
    if path is None:
        raise TrainingError("--resume needs the output folder of the interrupted run")
    if not path.is_file():
        raise TrainingError(f"no checkpoint to resume at {path}; run without --resume to start over")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises many types for files it cannot read
        raise TrainingError(
            f"cannot read checkpoint {path} ({type(e).__name__}); delete it and run without --resume") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path} is not a fyc-convert fine-tuning checkpoint; run without --resume")
    header = checkpoint_header(config, precision=precision, world=world)
    recorded = {**state["config"], "precision": state.get("precision", "fp32"), "world_size": state["world_size"]}
    check_same(f"checkpoint {path}", recorded,
               {**header["config"], "precision": precision, "world_size": world})
    budget = config.max_epochs if config.epochs == "auto" else config.epochs
    if state["epoch"] > budget:
        raise TrainingError(f"checkpoint {path} is at epoch {state['epoch']} > epochs {budget}; {_RESUME_HINT}")
    return state


def _plain(values: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(values, default=str))


__all__ = [
    "CHECKPOINT_NAME",
    "JOB_FIELDS",
    "LOOP_FIELDS",
    "RUN_STATE",
    "check_same",
    "checkpoint_header",
    "fields_of",
    "load_checkpoint",
    "read_run_state",
    "write_checkpoint",
    "write_run_state",
]
