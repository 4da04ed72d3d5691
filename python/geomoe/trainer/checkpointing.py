"""Checkpointing: reading the checkpoint a run resumes from, restoring it, and atomic saves
(optionally asynchronous: a step waits only for a CPU copy) that prune only the run's own older
checkpoints; the RNG states and the run's configuration each checkpoint carries. The file format
and its atomicity are geomoe.checkpoint's."""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import asdict
from typing import Any, Dict, List, Optional, Tuple

import torch

from .. import checkpoint, distributed
from .rundir import refuse_fresh_run_into_used_directory


def rng_state() -> Dict[str, Any]:
    """The global torch RNGs. Data randomness is a pure function of (seed, epoch, index)."""
    state: Dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def config_of(args) -> Dict[str, Any]:
    return {k: v for k, v in asdict(args).items() if v is None or isinstance(v, (int, float, str, bool))}


def load_resume_state(resume: Optional[str], directory: str, rank_file: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """--resume auto: the newest readable checkpoint in the run directory (None if there is none);
    --resume PATH: that checkpoint directory, which must read."""
    if not resume:
        return None
    if resume == "auto":
        state = checkpoint.load_latest(directory, rank_file)
        if state is None and checkpoint.list_checkpoints(directory):
            raise RuntimeError(
                f"--resume auto: no checkpoint in {directory} can be read (see the warnings above); "
                "refusing to start over on top of them: move them aside or name one with --resume PATH"
            )
        return state
    if not os.path.isdir(resume):
        raise ValueError(f"argument '--resume' expected 'auto' or a checkpoint directory (ckpt_<step>/), got {resume!r}")
    return checkpoint.load(resume, rank_file)


def describe_run(state: Dict[str, Any]) -> str:
    """What run wrote a checkpoint, in flags (its "run" or "config" record), for errors."""
    rec = state.get("run") if isinstance(state.get("run"), dict) else state.get("config")
    if not isinstance(rec, dict):
        return "a run of an unrecorded model"
    parts = [f"--{k} {rec[k]}" for k in ("model", "config") if rec.get(k) is not None]
    if rec.get("in_chans") is not None:
        parts.append(f"{rec['in_chans']} bands")
    return ", ".join(parts) or "a run of an unrecorded model"


def check_checkpoint_fits(state: Dict[str, Any], model_state: Dict[str, torch.Tensor], asked: str, held: str = "") -> None:
    """Resuming: the checkpoint's weights (`state["model"]`) must be the run's model's tensors, with
    their shapes; else a ValueError says what the checkpoint holds (`held`: more about it, e.g. a
    class count) and what this run asked for (`asked`), with counts and the first names that differ,
    instead of load_state_dict's list of every key."""
    saved = state["model"]
    missing = [k for k in model_state if k not in saved]
    unexpected = [k for k in saved if k not in model_state]
    shapes = [
        f"{k}: checkpoint {list(saved[k].shape)}, this run {list(v.shape)}"
        for k, v in model_state.items()
        if k in saved and tuple(saved[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or shapes):
        return
    first = lambda names: ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    parts = []
    if missing:
        parts.append(f"{len(missing)} of this run's {len(model_state)} tensors are not in it ({first(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} of its {len(saved)} tensors are not in this run's model ({first(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} have another shape ({first(shapes)})")
    raise ValueError(
        f"checkpoint {state['path']} holds the weights of {describe_run(state)}{held}; this run asked for {asked}: "
        + "; ".join(parts)
        + ". Resume it with the arguments it was written with, or start a new run from its weights (--init-weights, "
        "fine-tuning --weights)"
    )


def save_single(directory: str, step: int, keep_last: int, model, optimizer, scaler, args, run: Dict[str, Any], **extra) -> str:
    """A one-process checkpoint outside the Trainer: weights, optimizer, scaler, step, RNG, config
    and the run's identity and run-defining arguments (`run`: {"id": ..., ...})."""
    state = dict(
        optimizer=optimizer.state_dict(),
        scaler=scaler.state_dict(),
        step=step,
        rng=[rng_state()],
        config=config_of(args),
        world=1,
        run=run,
        **extra,
    )
    path = checkpoint.save(directory, step, model.state_dict(), state)
    checkpoint.prune(directory, keep_last, run["id"])
    return path


def restore_single(state: Dict[str, Any], model, optimizer, scaler) -> int:
    """Loads what save_single saved; returns the step to continue from."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"][0])
    return int(state["step"])


class Checkpointer:
    """A task's checkpoints in its `args.out`. `dcp`: the optimizer state goes into dcp/ through
    torch.distributed.checkpoint (format 2, reshardable: another world size or placement can resume
    it); else into train_state.pt (format 1). `async_save`: see `save`. Reads from the task at each
    save: placement (weights, DCP state), optimizer, scaler, args (config), run_id, run_args and
    checkpoint_state(step)."""

    def __init__(self, env: distributed.DistEnv, task: Any, dcp: bool = False, async_save: bool = False):
        self.env, self.task, self.dcp, self.async_save = env, task, dcp, async_save
        self.out, self.keep_last = task.args.out, task.args.keep_last
        self.state: Optional[Dict[str, Any]] = None  # what the run resumed from
        # --async-save: the save in flight (step, its writes), the writer thread, and a process group
        # of its own for DCP's background collectives (they would otherwise interleave with training's)
        self._pending: Optional[Tuple[int, List[Any]]] = None
        self._executor = None
        self._save_group = None

    # ---- resuming -------------------------------------------------------------------------------

    def refuse_fresh_run(self) -> None:
        refuse_fresh_run_into_used_directory(self.out, self.task.args.resume)

    def load(self, rank_file: Optional[str] = None) -> Optional[Dict[str, Any]]:
        """The checkpoint --resume names (None: a new run). A checkpoint with per-rank optimizer
        files resumes only on its number of ranks."""
        state = load_resume_state(self.task.args.resume, self.out, rank_file)
        if state is None:
            return None
        saved_world = int(state.get("world", 1))
        if not checkpoint.is_dcp(state) and saved_world != self.env.world and "optimizer" not in state:
            raise ValueError(
                f"checkpoint {state['path']} was written by {saved_world} ranks with per-rank optimizer files "
                f"(optimizer_rank<r>.pt: expert parallelism, or FSDP before resharding checkpoints); resume it with "
                f"{saved_world} ranks, got {self.env.world}"
            )
        self.state = state
        return state

    def restore(self, state: Dict[str, Any]) -> None:
        """The optimizer, scaler and RNG states of `state` (the weights are loaded before: the
        placement's load_weights); sets the task's start step and says so."""
        task = self.task
        placement, opt = task.placement, task.optimizer
        if checkpoint.is_dcp(state) and placement.mesh is not None:
            from .. import parallel

            parallel.restore_from_dcp(placement.wrapped, opt, placement.mesh, lambda s: checkpoint.read_dcp(state["path"], s))
        elif checkpoint.is_dcp(state):
            from torch.distributed.checkpoint.state_dict import set_state_dict

            dcp_state = placement.dcp_state(opt)
            checkpoint.read_dcp(state["path"], dcp_state)
            set_state_dict(placement.wrapped, opt, model_state_dict=dcp_state["model"], optim_state_dict=dcp_state["optim"])
        elif placement.mesh is not None and placement.rank_file() and not placement.fsdp:  # format 1, expert parallel
            opt.load_state_dict(placement.reorder_format1(opt, state["rank_state"], state["path"]))
        else:
            opt.load_state_dict(state["rank_state"] if placement.rank_file() else state["optimizer"])
        self._check_optimizer_state(state["path"])
        task.scaler.load_state_dict(state["scaler"])
        rngs = state["rng"]
        # the run's own randomness is a function of (seed, step), not of these: restored where they fit
        if len(rngs) == self.env.world:
            set_rng_state(rngs[self.env.rank])
        task.start = int(state["step"])
        if self.env.main:
            saved_world = int(state.get("world", 1))
            moved = f" (saved by {saved_world} processes, now {self.env.world})" if saved_world != self.env.world else ""
            print(f"resumed from {state['path']} at step {task.start}{moved}")

    def _check_optimizer_state(self, path: str) -> None:
        """Every loaded moment has its parameter's shape: load_state_dict does not check, and a fused
        AdamW step on a mismatched moment reads out of bounds (a segfault, not an error)."""
        opt = self.task.optimizer
        for group in opt.param_groups:
            for p in group["params"]:
                for key, value in opt.state.get(p, {}).items():
                    if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != tuple(p.shape):
                        name = next((n for n, q in self.task.model.named_parameters() if q is p), "?")
                        raise ValueError(
                            f"checkpoint {path}: optimizer state {key!r} of "
                            f"parameter {name} has shape {list(value.shape)}, the parameter {list(p.shape)} (a "
                            f"checkpoint of another model or layout; older per-rank expert-parallel files split the "
                            f"experts r*E//W, this version in blocks of ceil(E/W)); start a new run from its weights "
                            f"with --init-weights"
                        )

    # ---- saving ---------------------------------------------------------------------------------

    def enable_async(self) -> None:
        """--async-save: DCP's background collectives get a process group of their own (a collective)."""
        if self.async_save and self.env.enabled:
            import torch.distributed as dist

            self._save_group = dist.new_group(backend="gloo")

    def _uses_dcp(self) -> bool:
        """True: the training state goes into dcp/ (format 2). False writes format 1, the optimizer
        in train_state.pt (the tests also use it to check that such checkpoints still resume)."""
        return self.dcp

    def _train_state(self, step: int, rngs: List[Any], dcp: bool) -> Dict[str, Any]:
        task = self.task
        state = dict(
            scaler=task.scaler.state_dict(),
            step=step,
            rng=rngs,
            config=config_of(task.args),
            world=self.env.world,
            **task.checkpoint_state(step),
            run=dict(id=task.run_id, **task.run_args),
        )
        if dcp:
            state["format"] = checkpoint.FORMAT
        else:
            state["optimizer"] = task.optimizer.state_dict()
        return state

    def save(self, step: int, final: bool = False) -> Optional[str]:
        """Checkpoint `step`; returns its path once it is in place. With async_save (and not
        `final`), the step waits only for the CPU copies: the files are written in the background and
        the checkpoint moved into place at the next save or the end of the run (returns None)."""
        self._finish_pending()
        env, out = self.env, self.out
        weights = self.task.placement.full_state()
        rngs = distributed.all_gather_objects(env, rng_state())
        dcp_state = self.task.placement.dcp_state(self.task.optimizer) if self._uses_dcp() else None
        background = self.async_save
        tmp, train_state = checkpoint.temp_path(out, step), None
        if env.main:
            checkpoint.begin(out, step)
            train_state = self._train_state(step, rngs, dcp_state is not None)
            if not background:
                checkpoint.write_model(tmp, weights)
                checkpoint.write_state(tmp, train_state)
        distributed.barrier(env)
        if background:
            # a CPU copy of everything now (training goes on changing the originals), the writing later
            waits: List[Any] = [] if dcp_state is None else [checkpoint.write_dcp_async(tmp, dcp_state, self._save_group)]
            if env.main:
                staged = {k: v.detach().to("cpu", copy=True) for k, v in weights.items()}
                dcp_done = waits[0] if waits else None
                waits.append(self._writer().submit(checkpoint.write_files_and_seal, tmp, staged, train_state, dcp_done))
            self._pending = (step, waits)
            return self._finish_pending() if final else None
        if dcp_state is not None:
            checkpoint.write_dcp(tmp, dcp_state)  # every rank writes its part (a collective)
        return self._commit(step)

    def _commit(self, step: int) -> Optional[str]:
        """After every rank's writes: move the checkpoint into place and prune (rank 0), in step."""
        env, path = self.env, None
        distributed.barrier(env)
        if env.main:
            path = checkpoint.commit(self.out, step, self.task.run_id)
            checkpoint.prune(self.out, self.keep_last, self.task.run_id)
        distributed.barrier(env)
        return path

    def _writer(self):
        if self._executor is None:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="geomoe-save")
        return self._executor

    def _finish_pending(self) -> Optional[str]:
        """An asynchronous save: wait for every rank's writes, then move the checkpoint into place
        (until then it is a `.tmp` directory that is never read: a crash leaves the previous one)."""
        if self._pending is None:
            return None
        (step, waits), self._pending = self._pending, None
        for w in waits:
            w.result()  # a failed write raises here
        checkpoint._fault_pause("ASYNC_COMMIT")  # fault-injection tests: the instant before the commit
        return self._commit(step)

    def settle_pending(self) -> None:
        """The run ends by an exception with an asynchronous save in flight: wait (at most --timeout,
        with no collective: another rank may be gone) for this rank's writes; the main rank then
        commits the checkpoint if it was sealed (every rank's part written), else removes it (the
        previous checkpoint stands). Either way, one line says which."""
        if self._pending is None:
            return
        (step, waits), self._pending = self._pending, None
        env, out, error = self.env, self.out, None
        try:
            for w in waits:
                w.result(timeout=self.task.args.timeout)
        except BaseException as exc:  # a failed write, or a timeout
            error = exc
        if not env.main:
            return
        tmp = checkpoint.temp_path(out, step)
        if error is None and checkpoint.is_sealed(tmp):
            path = checkpoint.commit(out, step, self.task.run_id)
            checkpoint.prune(out, self.keep_last, self.task.run_id)
            print(f"the run stopped by an error: the save of step {step} in flight was finished and committed, {path}")
        else:
            why = f"{type(error).__name__}: {error}" if error is not None else "not every part was written"
            warnings.warn(
                f"the run stopped by an error: the save of step {step} in flight did not finish ({why}); it was removed, "
                f"the last committed checkpoint in {out} stands"
            )
            shutil.rmtree(tmp, ignore_errors=True)
