"""Where the names this module used to define live now, each with its topic (docs/trainer.md):
the machine and argument checks in geomoe.checks; the run directory and identity, stop signals and
bad steps, the loader, the schedule, checkpoint state and metrics lines in geomoe.trainer's
components. Re-exported here for code written against the earlier layout; new code imports them
from their modules."""

from __future__ import annotations

from .checks import check_float, check_int, check_torch_cache_dir, resolve_device
from .envvars import env_number
from .trainer.checkpointing import (
    check_checkpoint_fits,
    config_of,
    describe_run,
    load_resume_state,
    restore_single,
    rng_state,
    save_single,
    set_rng_state,
)
from .trainer.data import make_loader, start_batches
from .trainer.faults import STOP_SIGNALS, StopSignals
from .trainer.metrics import append_jsonl
from .trainer.rundir import (
    RunDirectory,
    new_run_id,
    refuse_fresh_run_into_used_directory,
    run_identity,
    warn_changed_run_arguments,
)
from .trainer.schedule import lr_at

__all__ = [
    "STOP_SIGNALS",
    "RunDirectory",
    "StopSignals",
    "append_jsonl",
    "check_checkpoint_fits",
    "check_float",
    "check_int",
    "check_torch_cache_dir",
    "config_of",
    "describe_run",
    "env_number",
    "load_resume_state",
    "lr_at",
    "make_loader",
    "new_run_id",
    "refuse_fresh_run_into_used_directory",
    "resolve_device",
    "restore_single",
    "rng_state",
    "run_identity",
    "save_single",
    "set_rng_state",
    "start_batches",
    "warn_changed_run_arguments",
]
