"""MAE pretraining of GeoMoE with the published recipe (docs/recipe.md): AdamW (0.9, 0.95), weight decay 0.05, linear
warm-up then cosine to 1e-3 of the peak, gradient clip 1.0, aux loss weight 1e-4, the expert-bias
update after every optimizer step from the loads summed over all ranks, fp16 autocast on GPUs and
float32 on CPUs.

One process, or many under torchrun (`torchrun --nproc_per_node N -m geomoe pretrain ...`): data
parallel with DistributedDataParallel (or FSDP2 with --fsdp), optionally expert parallel
(--expert-parallel: the routed experts sharded over the ranks). Checkpoints are atomic and exact to
resume; a non-finite loss skips the step (and stops the run after --max-bad-steps in a row);
unreadable images are skipped and counted; SIGTERM writes a checkpoint and ends the run."""
from __future__ import annotations

import json
import os
import resource
import signal
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from geomoe_kernels.nn.expert_parallel import full_state_dict, local_state_dict, shard_experts

from . import checkpoint, distributed
from .configs import CONFIGS, RECIPE
from .data import ImageFolder, SyntheticScenes, skip_unreadable
from .model import GeoMoE
from .runtime import config_of, load_resume_state, lr_at, make_loader, rng_state, set_rng_state


@dataclass
class PretrainArgs:
    config: str = "tiny"
    data: Optional[str] = None
    steps: Optional[int] = None
    batch_size: Optional[int] = None  # per rank
    lr: Optional[float] = None
    out: str = "runs/pretrain"
    save_every: int = 0  # 0: only at the end
    keep_last: int = 3
    resume: Optional[str] = None  # "auto", a checkpoint directory, or None
    stop_after: Optional[int] = None  # end this run after N steps with a checkpoint (time-sliced jobs)
    device: str = "auto"
    backend: str = "auto"
    front_end: str = "sparse"
    seed: int = 0
    log_every: int = 10
    workers: Optional[int] = None
    amp: Optional[bool] = None  # default: on for CUDA
    progress: bool = True
    expert_parallel: bool = False
    fsdp: bool = False
    max_bad_steps: int = 5
    tensorboard: bool = True


class _Stop:
    """SIGTERM (a scheduler's pre-emption) asks the loop to save and end after the current step."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, nothing to stop
            self._old = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def load_balance(loads: torch.Tensor) -> float:
    """Max over mean expert load, worst layer (1.0 is perfectly balanced)."""
    loads = loads.float()
    return float((loads.max(dim=-1).values / loads.mean(dim=-1).clamp_min(1e-9)).max()) if loads.numel() else 1.0


def _memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class _Trainer:
    def __init__(self, args: PretrainArgs, env: distributed.DistEnv):
        if args.config not in CONFIGS:
            raise ValueError(f"argument '--config' expected one of {list(CONFIGS)}, got {args.config!r}")
        if args.expert_parallel and args.fsdp:
            raise ValueError("arguments '--expert-parallel' and '--fsdp' expected one at most, got both")
        self.args, self.env = args, env
        preset = CONFIGS[args.config]
        self.steps = args.steps or preset["steps"]
        self.batch = args.batch_size or preset["batch_size"]
        global_batch = self.batch * env.world
        self.peak_lr = args.lr or preset.get("lr") or preset["base_lr"] * global_batch / 256
        self.warmup = max(1, int(self.steps * preset["warmup_fraction"]))
        self.amp = env.device.type == "cuda" if args.amp is None else args.amp
        self.workers = args.workers if args.workers is not None else (4 if env.device.type == "cuda" else 0)

        torch.manual_seed(args.seed)  # the same initial weights on every rank
        model = GeoMoE(**preset["model"], front_end=args.front_end, backend=args.backend)
        self.local_params: List[str] = []
        if args.expert_parallel:
            if not env.enabled:
                raise ValueError("argument '--expert-parallel' expected a multi-process run (torchrun), got one process")
            self.local_params = shard_experts(model)
        self.model = model.to(env.device)
        self.dataset = ImageFolder(args.data, model.img_size, args.seed) if args.data else SyntheticScenes(
            preset["dataset_length"], model.img_size, args.seed)
        self.start = 0
        self.state = self._read_checkpoint()
        if self.state is not None:
            self._load_weights(self.state["model"])
        self.wrapped = self._wrap(self.model)
        # fused: one kernel over all parameters (on a CPU 4-5x faster than the per-op path with the
        # large stacked expert tensors); FSDP2's sharded DTensors keep the default implementation
        self.opt = torch.optim.AdamW(self.wrapped.parameters(), lr=self.peak_lr, betas=RECIPE["betas"],
                                     weight_decay=RECIPE["weight_decay"], fused=not args.fsdp)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=self.amp)
        torch.manual_seed(args.seed * 1_000_003 + env.rank)  # masking noise differs per rank
        if self.state is not None:
            self._restore(self.state)

    # ---- model placement --------------------------------------------------------------------------

    def _wrap(self, model):
        env = self.env
        if not env.enabled:
            return model
        if self.args.fsdp:
            from torch.distributed.fsdp import fully_shard

            for blk in list(model.blocks1) + list(model.blocks2) + list(model.blocks3) + list(model.decoder_blocks):
                fully_shard(blk)
            return fully_shard(model)
        from torch.nn.parallel import DistributedDataParallel as DDP

        if self.local_params:  # the rank's own experts are not replicas: leave them out of all-reduce
            DDP._set_params_and_buffers_to_ignore_for_model(model, self.local_params)
        return DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)

    def _full_state(self) -> Optional[Dict[str, torch.Tensor]]:
        """The whole model's weights (a collective under FSDP and expert parallelism)."""
        if self.args.fsdp and self.env.enabled:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.local_params:
            return full_state_dict(self.model)
        return self.model.state_dict()

    def _load_weights(self, full: Dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(local_state_dict(self.model, full) if self.local_params else full)

    # ---- checkpoints ------------------------------------------------------------------------------

    def _rank_file(self) -> Optional[str]:
        return f"optimizer_rank{self.env.rank}.pt" if (self.local_params or self.args.fsdp) else None

    def _read_checkpoint(self) -> Optional[Dict[str, Any]]:
        os.makedirs(self.args.out, exist_ok=True)
        state = load_resume_state(self.args.resume, self.args.out, self._rank_file())
        if state is None:
            return None
        if int(state.get("world", 1)) != self.env.world and self._rank_file() is not None:
            raise ValueError(
                f"checkpoint {state['path']} was written by {state.get('world')} ranks with sharded optimizer state; "
                f"resume it with the same number of ranks, got {self.env.world}"
            )
        return state

    def _restore(self, state: Dict[str, Any]) -> None:
        opt_state = state["rank_state"] if self._rank_file() else state["optimizer"]
        self.opt.load_state_dict(opt_state)
        self.scaler.load_state_dict(state["scaler"])
        rngs = state["rng"]
        if len(rngs) == self.env.world:
            set_rng_state(rngs[self.env.rank])
        elif self.env.main:
            warnings.warn(f"checkpoint has RNG states of {len(rngs)} ranks, this run has {self.env.world}: fresh masking noise")
        self.start = int(state["step"])
        if self.env.main:
            print(f"resumed from {state['path']} at step {self.start}")

    def save(self, step: int) -> Optional[str]:
        env, out = self.env, self.args.out
        weights = self._full_state()
        rngs = distributed.all_gather_objects(env, rng_state())
        path = None
        if env.main:
            tmp = checkpoint.begin(out, step)
            checkpoint.write_model(tmp, weights)
            train_state = dict(scaler=self.scaler.state_dict(), step=step, rng=rngs, config=config_of(self.args),
                               world=env.world)
            if self._rank_file() is None:
                train_state["optimizer"] = self.opt.state_dict()
            checkpoint.write_state(tmp, train_state)
        distributed.barrier(env)
        if self._rank_file() is not None:  # each rank's own optimizer shard, into the same directory
            checkpoint.write_state(checkpoint.temp_path(out, step), self.opt.state_dict(), self._rank_file())
        distributed.barrier(env)
        if env.main:
            path = checkpoint.commit(out, step)
            checkpoint.prune(out, self.args.keep_last)
        distributed.barrier(env)
        return path

    # ---- the loop ---------------------------------------------------------------------------------

    def run(self) -> Dict[str, Any]:
        args, env = self.args, self.env
        end = self.steps if args.stop_after is None else min(self.steps, self.start + args.stop_after)
        loader = make_loader(self.dataset, self.batch, args.seed, self.start, end, self.workers, env.device,
                             env.rank, env.world, collate_fn=skip_unreadable)
        main = env.main
        if main:
            n_params = sum(p.numel() for p in self.model.parameters())
            mode = "FSDP2" if args.fsdp else ("DDP" if env.enabled else "one process")
            mode += " + expert parallel" if args.expert_parallel else ""
            print(
                f"geomoe pretrain: config {args.config} ({n_params / 1e6:.2f} M parameters on rank 0), {env.world} x {env.device.type} "
                f"({mode}), backend {args.backend}, front end {args.front_end}, batch {self.batch} per rank, "
                f"steps {self.start}..{self.steps}, peak lr {self.peak_lr:.2e}, "
                f"data {'folder ' + args.data if args.data else 'embedded procedural scenes'} ({len(self.dataset)} images), "
                f"{'fp16 autocast' if self.amp else 'float32'}"
            )
        writer = self._tensorboard() if main else None
        bar = tqdm(total=self.steps, initial=self.start, disable=not (args.progress and main), dynamic_ncols=True, leave=False)
        history: List[Dict[str, Any]] = []
        window = _Window(env.device)
        step, bad_in_row, final = self.start, 0, None
        self.wrapped.train()
        with _Stop() as stop:
            for imgs, skipped in loader:
                lr = lr_at(step, self.steps, self.peak_lr, self.warmup, RECIPE["min_lr_ratio"])
                ok = self._train_step(imgs, lr, window)
                window.skipped_images += skipped
                step += 1
                bar.update(1)
                if ok:
                    bad_in_row = 0
                else:
                    bad_in_row += 1
                    window.bad_steps += 1
                    if main:
                        warnings.warn(f"step {step}: non-finite loss or empty batch, step skipped ({bad_in_row} in a row)")
                    if bad_in_row >= args.max_bad_steps:
                        raise RuntimeError(
                            f"stopping at step {step}: {bad_in_row} steps in a row had a non-finite loss or no readable "
                            f"images (--max-bad-steps {args.max_bad_steps}); the last checkpoint in {args.out} is intact"
                        )
                if step % args.log_every == 0 or step == end:
                    record = window.record(step, lr, self.model, env)
                    if main and record is not None:
                        history.append(record)
                        self._log(record, writer)
                stopping = self._agree(stop.requested)
                if stopping or (args.save_every and step % args.save_every == 0 and step != end):
                    final = self.save(step)
                if stopping:
                    if main:
                        print(f"SIGTERM: stopped at step {step}; checkpoint {final}")
                    break
            else:
                final = self.save(step)
        bar.close()
        if writer is not None:
            writer.close()
        if main:
            print(f"saved {final}")
        return {"history": history, "checkpoint": final, "model": self.model, "step": step}

    def _agree(self, flag: bool) -> bool:
        """True on every rank if it is true on any (so all ranks save and stop together)."""
        if not self.env.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.env.device)
        return bool(distributed.all_reduce(self.env, t, dist.ReduceOp.MAX).item())

    def _train_step(self, imgs: Optional[torch.Tensor], lr: float, window: "_Window") -> bool:
        env = self.env
        have = torch.tensor([0.0 if imgs is None else 1.0], device=env.device)
        if not bool(distributed.all_reduce(env, have, dist.ReduceOp.MIN).item()):
            return False  # some rank has no readable image: every rank skips together
        imgs = imgs.to(env.device, non_blocking=True)
        for group in self.opt.param_groups:
            group["lr"] = lr
        with torch.autocast(env.device.type, dtype=torch.float16, enabled=self.amp):
            loss, aux, loads = self.wrapped(imgs, RECIPE["mask_ratio"], RECIPE["kept_mask_ratio"])
            total = loss + RECIPE["aux_weight"] * aux.sum()
        finite = torch.isfinite(total.detach()).float().reshape(1)
        if not bool(distributed.all_reduce(env, finite, dist.ReduceOp.MIN).item()):
            self.opt.zero_grad(set_to_none=True)
            return False
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.unscale_(self.opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.wrapped.parameters(), RECIPE["clip_grad"])
        self.scaler.step(self.opt)
        self.scaler.update()
        loads = distributed.all_reduce(env, loads.clone())  # the published rule: sum over data-parallel ranks
        self.model.update_expert_biases(loads, RECIPE["bias_rate"])
        window.add(imgs.shape[0] * env.world, imgs.shape[0] * env.world * self._kept_tokens(), loss, aux, loads, grad_norm)
        return True

    def _kept_tokens(self) -> int:
        return int(self.model.grid**2 * (1 - RECIPE["mask_ratio"]))

    def _tensorboard(self):
        if not self.args.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard not installed: metrics.jsonl only
            return None
        return SummaryWriter(os.path.join(self.args.out, "tensorboard"))

    def _log(self, record: Dict[str, Any], writer) -> None:
        with open(os.path.join(self.args.out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        if writer is not None:
            for key in ("loss", "lr", "images_per_s", "tokens_per_s", "aux", "grad_norm", "load_max_over_mean"):
                writer.add_scalar(key, record[key], record["step"])
        extra = ""
        if record["bad_steps"] or record["skipped_images"]:
            extra = f" | skipped {record['bad_steps']} steps, {record['skipped_images']} images"
        tqdm.write(
            f"step {record['step']:>6}/{self.steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
            f"{record['images_per_s']:7.1f} img/s | aux {record['aux']:.4f} | "
            f"expert load max/mean {record['load_max_over_mean']:.2f}{extra}"
        )


class _Window:
    """Sums over a log interval kept on the device: one host sync per log line, not per step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.steps = self.images = self.tokens = 0
        self.loss = self.aux = self.grad_norm = self.loads = None
        self.bad_steps = self.skipped_images = 0

    def add(self, images: int, tokens: int, loss, aux, loads, grad_norm) -> None:
        self.steps += 1
        self.images += images
        self.tokens += tokens
        d = lambda acc, v: v.detach().float() if acc is None else acc + v.detach().float()
        self.loss, self.aux, self.grad_norm, self.loads = d(self.loss, loss), d(self.aux, aux), d(self.grad_norm, grad_norm), d(self.loads, loads)

    def record(self, step: int, lr: float, model: GeoMoE, env: distributed.DistEnv) -> Optional[Dict[str, Any]]:
        seconds = time.perf_counter() - self.t0
        if self.steps == 0:
            rec = None
        else:
            n = self.steps
            aux = (self.aux / n).tolist()
            loads = (self.loads / n).tolist()
            rec = {
                "step": step, "loss": float(self.loss) / n, "lr": lr,
                "images_per_s": self.images / seconds, "tokens_per_s": self.tokens / seconds,
                "aux": sum(aux) / max(len(aux), 1), "aux_per_layer": aux, "load_per_layer": loads,
                "load_max_over_mean": load_balance(self.loads / n),
                "expert_bias_per_layer": [m.expert_bias.tolist() for m in model.moe_layers()],
                "grad_norm": float(self.grad_norm) / n, "memory_bytes": _memory_bytes(env.device),
                "bad_steps": self.bad_steps, "skipped_images": self.skipped_images, "world": env.world,
            }
        self.reset()
        return rec


def pretrain(args: PretrainArgs) -> Dict[str, Any]:
    env = distributed.setup(args.device)
    try:
        result = _Trainer(args, env).run()
        distributed.barrier(env)  # on success only: no rank tears gloo down while another still talks to it
        return result
    finally:
        distributed.teardown(env)
