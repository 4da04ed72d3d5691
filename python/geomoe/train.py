"""MAE pretraining of GeoMoE with the published recipe (docs/recipe.md): AdamW (0.9, 0.95), weight decay 0.05, linear
warm-up then cosine to 1e-3 of the peak, gradient clip 1.0, aux loss weight 1e-4, the expert-bias
update after every optimizer step from the loads summed over all ranks, fp16 autocast on GPUs and
float32 on CPUs.

One process, or many under torchrun (`torchrun --nproc_per_node N -m geomoe pretrain ...`): data
parallel with DistributedDataParallel (or FSDP2 with --fsdp), optionally expert parallel
(--ep N: the routed experts sharded over groups of N ranks of a (dp, ep) DeviceMesh, with FSDP2 or
gradient all-reduces over the mesh's groups; parallel.py). Checkpoints are atomic and exact to
resume; a non-finite loss skips the step on every device (and stops the run after --max-bad-steps
in a row); unreadable images are skipped and counted; SIGTERM or SIGINT, to the process or its whole
group, writes a checkpoint and ends the run (a second one ends it at once). A run owns its --out:
a new run there is refused while checkpoints of another lie in it, and pruning removes only the
run's own older checkpoints (checkpoint.py)."""

from __future__ import annotations

import os
import resource
import shutil
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from geomoe_kernels._checks import non_finite_passes
from geomoe_kernels.nn.expert_parallel import canonical_name, expert_names, full_state_dict, local_state_dict

from . import checkpoint, distributed, parallel
from .config_cli import (
    DATA_FORMATS,
    alpha_opt,
    amp_opt,
    backend_opt,
    check_fields,
    device_opt,
    floats,
    in_chans_opt,
    ints,
    keep_last_opt,
    max_bad_steps_opt,
    max_raster_pixels_opt,
    opt,
    precision_opt,
    progress_opt,
    resume_opt,
    seed_opt,
    timeout_opt,
    workers_opt,
)
from .configs import BASE_EXPERTS, CONFIGS, MODELS, RECIPE
from .data import ImageFolder, SyntheticScenes, check_readable, open_image, skip_unreadable
from .geodata import BAND_STATS_FILE, RasterFolder, adapt_state_dict_in_chans, as_image_dataset
from .model import FRONT_ENDS, GeoMoE
from .moevit import MoEViTMAE
from .speed import (
    apply_activation_checkpointing,
    autocast,
    compile_blocks,
    default_compile_backend,
    grad_scaler,
    resolve_precision,
)
from .runtime import (
    RunDirectory,
    StopSignals,
    append_jsonl,
    check_checkpoint_fits,
    check_torch_cache_dir,
    config_of,
    load_resume_state,
    lr_at,
    make_loader,
    refuse_fresh_run_into_used_directory,
    rng_state,
    run_identity,
    set_rng_state,
    start_batches,
    warn_changed_run_arguments,
)


def _preset_help(key: str) -> str:
    """--steps, --batch-size, --lr: each preset's value (configs.CONFIGS), for their help."""

    def shown(c: Dict[str, Any]) -> Any:
        if key != "lr":
            return c[key]
        return f"{c['lr']:g}" if c.get("lr") else f"{c['base_lr']:.3g} x global batch / 256"

    return "(default: the preset's: " + ", ".join(f"{name} {shown(c)}" for name, c in sorted(CONFIGS.items())) + ")"


@dataclass
class PretrainArgs:
    """What `geomoe pretrain` takes: each field is its flag (config_cli.add_fields)."""

    config: str = opt("tiny", "model and recipe preset", choices=tuple(sorted(CONFIGS)))
    model: str = opt(
        "geomoe",
        "GeoMoE, or the plain-ViT MoE baseline (MoE-ViT; its pretraining recipe is assumed to be GeoMoE's)",
        choices=MODELS,
    )
    data: Optional[str] = opt(None, "image folder root/<subfolder>/...; default: the embedded procedural scenes")
    steps: Optional[int] = opt(None, f"optimizer steps {_preset_help('steps')}", check=ints(1))
    batch_size: Optional[int] = opt(None, f"images per process {_preset_help('batch_size')}", check=ints(1))
    lr: Optional[float] = opt(None, f"peak learning rate {_preset_help('lr')}", check=floats(0, low_open=True))
    out: str = opt("runs/pretrain", "run directory: checkpoints and metrics.jsonl; a new run needs one without checkpoints")
    save_every: int = opt(0, "also checkpoint every N steps (0: by --save-minutes only)", check=ints(0))
    save_minutes: float = opt(
        30.0,
        "checkpoint at the first step after this many minutes since the last checkpoint (0: off); the end of "
        "the run always saves",
        check=floats(0),
    )
    keep_last: int = keep_last_opt(3)
    resume: Optional[str] = resume_opt()
    stop_after: Optional[int] = opt(
        None,
        "end this run after N steps with a checkpoint, to resume later (default: run to --steps)",
        check=ints(1),
    )
    device: str = device_opt()
    backend: str = backend_opt()
    front_end: str = opt("sparse", "GeoMoE's convolutional front end", choices=FRONT_ENDS)
    seed: int = seed_opt("weights, masks, data order")
    in_chans: Optional[int] = in_chans_opt(" (GeoTIFF, needs the 'geo' extra)")
    data_format: str = opt(
        "auto",
        "image: 8-bit RGB files through PIL; raster: any bands and bit depth through rasterio, per-band "
        "normalisation, no-data at 0; auto (default): raster when --in-chans is not 3, --band-stats is given or "
        "--data holds band_stats.json",
        choices=DATA_FORMATS,
    )
    band_stats: Optional[str] = opt(
        None,
        'raster per-band {"mean": [...], "std": [...]} JSON (default: <data>/band_stats.json, written by `geomoe stats DATA`)',
    )
    alpha: str = alpha_opt()
    max_raster_pixels: int = max_raster_pixels_opt()
    init_weights: Optional[str] = opt(
        None,
        "start a new run from these weights (a checkpoint or an original-layout file); RGB weights get the "
        "first patch embedding adapted to --in-chans (each band: the mean RGB kernel x 3/bands) (default: random "
        "initial weights)",
    )
    allow_partial_init: bool = opt(
        False, "load what --init-weights has of the encoder and name what it lacks (kept at initial values)"
    )
    log_every: int = opt(10, "a metrics line every N steps", check=ints(1))
    workers: Optional[int] = workers_opt()
    precision: Optional[str] = precision_opt()
    amp: Optional[bool] = amp_opt()
    compile: bool = opt(
        False,
        "torch.compile each transformer block (fullgraph: the fused ops stay whole in its graph); backend "
        "inductor on CUDA and on a CPU with a C++ compiler, else aot_eager",
    )
    compile_backend: Optional[str] = opt(
        None,
        "torch.compile backend for --compile (inductor, aot_eager, ...) (default: inductor where it can build "
        "kernels, else aot_eager)",
    )
    activation_checkpointing: bool = opt(
        False, "recompute each transformer block's activations in the backward (less memory, about one more forward)"
    )
    progress: bool = progress_opt()
    ep: Optional[int] = opt(
        None,
        "expert-parallel size: the routed experts sharded over groups of N ranks in blocks of ceil(experts / N), "
        "data parallel over the world / N groups (one (dp, ep) device mesh; N divides the number of processes and "
        f"leaves every rank of a group at least one expert: {BASE_EXPERTS} experts on 8 ranks is fine) (default 1)",
        metavar="N",
        check=ints(1),
    )
    expert_parallel: bool = opt(False, "legacy: --ep <number of processes>")
    fsdp: bool = opt(False, "shard parameters and optimizer state with FSDP2 (fully_shard; with --ep on the mesh)")
    async_save: bool = opt(
        False,
        "write checkpoints in the background: a step waits only for a CPU copy; a checkpoint becomes "
        "ckpt_<step> once every rank has written it (at the next save or the end of the run)",
    )
    max_bad_steps: int = max_bad_steps_opt()
    tensorboard: bool = opt(True, "no TensorBoard events even if installed")
    timeout: float = timeout_opt("a collective between ranks or a data-loader batch")
    dataset: Any = opt(None, "in code: any torch Dataset of image tensors or dicts with 'image' (instead of --data)", cli=False)

    def validate(self) -> None:
        """Every number in range, with an error naming the flag (the CLI shows it as a usage error)."""
        check_fields(self)
        if self.data_format == "raster" and not self.data:
            raise ValueError("argument '--data-format raster' expected --data DIR too, got no --data")
        if self.dataset is not None and self.data:
            raise ValueError("arguments 'dataset' and '--data' expected one at most, got both")
        if self.compile_backend is not None and not self.compile:
            raise ValueError(f"argument '--compile-backend' expected --compile too, got --compile-backend {self.compile_backend}")
        if self.expert_parallel and self.ep is not None:
            raise ValueError(f"arguments '--expert-parallel' and '--ep' expected one at most, got both (--ep {self.ep})")


def load_init_weights(model, path: str, partial: bool = False) -> str:
    """--init-weights: a geomoe checkpoint (directory or its model.safetensors) or an original-layout
    file. Every encoder tensor must be in it with its shape (the decoder side may be missing: the
    released weights are encoder-only; it keeps its initial values) and nothing else unexpected,
    else a ValueError says what is missing and suggests --allow-partial-init; `partial` loads what
    matches. RGB weights for a model with another band count get the first patch embedding adapted
    (geodata.adapt_in_chans)."""
    from .finetune import _expected_extra, _names
    from .original import key_map, load_original_state_dict

    path, tensors = checkpoint.read_weights(path, "--init-weights")
    notes = adapt_state_dict_in_chans(tensors, model.in_chans)
    tensors = {k: v for k, v in tensors.items() if k not in getattr(model, "ORIGINAL_KEYS_RECOMPUTED", ())}
    own, original = model.state_dict(), key_map(model)
    use_original = any(k in original and k not in own for k in tensors)
    names = original if use_original else own
    missing = sorted(k for k in names if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in names and not _expected_extra(k))
    lacking = [k for k in missing if not _expected_extra(k)]  # encoder tensors
    if (lacking or unexpected) and not partial:
        raise ValueError(
            f"argument '--init-weights' expected weights for every encoder tensor of this {type(model).__name__} "
            f"({'original' if use_original else 'geomoe'} layout), got {path} with {len(names) - len(missing)} of its "
            f"{len(names)} tensors"
            + (f"; missing: {_names(lacking)}" if lacking else "")
            + (f"; unexpected: {_names(unexpected)}" if unexpected else "")
            + " (a checkpoint of another --model, --config or layout?). Pass --allow-partial-init to load only what "
            "matches"
        )
    if use_original:
        load_original_state_dict(model, tensors)
    else:
        for k in sorted(set(own) & set(tensors)):
            if tuple(own[k].shape) != tuple(tensors[k].shape):
                raise ValueError(
                    f"argument '--init-weights': tensor '{k}' in {path} expected shape {list(own[k].shape)}, "
                    f"got {list(tensors[k].shape)}"
                )
        model.load_state_dict({k: v for k, v in tensors.items() if k in own}, strict=False)
    note = f"--init-weights: loaded {len(names) - len(missing)} tensors from {path}"
    if notes:
        note += "; " + "; ".join(notes)
    if missing:
        note += f"; {len(missing)} left at their initial values ({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''})"
    if unexpected:
        note += f"; not used: {_names(unexpected)}"
    return note


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
        self.args, self.env = args, env
        preset = CONFIGS[args.config]
        self.steps = args.steps if args.steps is not None else preset["steps"]
        if args.expert_parallel and not env.enabled:
            raise ValueError("argument '--expert-parallel' expected a multi-process run (torchrun), got one process")
        self.ep = args.ep if args.ep is not None else (env.world if args.expert_parallel else 1)
        if self.ep > 1 and not env.enabled:
            raise ValueError(f"argument '--ep' expected 1 in a one-process run (use torchrun for more), got {self.ep}")
        self.state = self._read_checkpoint()  # before the model: a resume that cannot work ends here
        self.batch = self._per_rank_batch(preset["batch_size"])
        self.global_batch = global_batch = self.batch * env.world
        self.peak_lr = args.lr if args.lr is not None else (preset.get("lr") or preset["base_lr"] * global_batch / 256)
        self.warmup = max(1, int(self.steps * preset["warmup_fraction"]))
        self.precision = resolve_precision(args.precision, args.amp, env.device)
        self.workers = args.workers if args.workers is not None else (4 if env.device.type == "cuda" else 0)
        self.start = 0
        # what makes this run this run: a resume with any of these changed gets a warning
        self.run_args = dict(
            config=args.config,
            model=args.model,
            data=args.data,
            seed=args.seed,
            global_batch=global_batch,
            steps=self.steps,
            lr=self.peak_lr,
            front_end=args.front_end,
            in_chans=args.in_chans or 3,
        )
        self.run_id = run_identity(self.state)
        if self.state is not None:
            warn_changed_run_arguments(self.state, self.run_args, warn=env.main)

        torch.manual_seed(args.seed)  # the same initial weights on every rank
        in_chans = args.in_chans or 3
        if args.model == "moevit":  # no convolutional front end: --front-end does not apply
            model = MoEViTMAE(**preset["moevit"], in_chans=in_chans, backend=args.backend)
        else:
            model = GeoMoE(**preset["model"], in_chans=in_chans, front_end=args.front_end, backend=args.backend)
        if self.state is not None:  # before the load: what the checkpoint holds against what the run asked for
            check_checkpoint_fits(
                self.state, model.state_dict(), f"--model {args.model}, --config {args.config}, {in_chans} bands"
            )
        if args.init_weights and self.state is None:
            note = load_init_weights(model, args.init_weights, args.allow_partial_init)
            if env.main:
                print(note)
        # the parameters' order before sharding: format-1 expert-parallel optimizer files follow it
        self.dense_order = [name for name, _ in model.named_parameters()]
        self.mesh = None
        if self.ep > 1:
            parallel.check_ep(self.ep, env.world, model.moe_layers()[0].num_experts, "--ep" if args.ep else "--expert-parallel")
            self.mesh = parallel.build_mesh(env.device.type, env.world, self.ep)
            parallel.shard_model_experts(model, self.mesh)
        self.grad_sync: Optional[parallel.GradientSync] = None
        self.model = model.to(env.device)
        self.dataset = self._make_dataset(preset, model)
        if self.state is not None:
            self._load_weights(self.state["model"])
        # per block, before the wrapping (FSDP2 shards the blocks as they are); the keys do not change
        if args.activation_checkpointing:
            apply_activation_checkpointing(self.model)
        self.compile_backend = None
        if args.compile:  # only then: choosing a backend loads inductor
            self.compile_backend = args.compile_backend or default_compile_backend(env.device)
            compile_blocks(self.model, self.compile_backend)
        self.wrapped = self._wrap(self.model)
        # fused: one kernel over all parameters (on a CPU 4-5x faster than the per-op path with the
        # large stacked expert tensors); FSDP2's sharded DTensors keep the default implementation
        self.opt = torch.optim.AdamW(
            self.wrapped.parameters(),
            lr=self.peak_lr,
            betas=RECIPE["betas"],
            weight_decay=RECIPE["weight_decay"],
            fused=not args.fsdp,
        )
        self.scaler = grad_scaler(self.precision, env.device)
        # --async-save: the save in flight (step, its writes), the writer thread, and a process group
        # of its own for DCP's background collectives (they would otherwise interleave with training's)
        self._pending: Optional[Tuple[int, List[Any]]] = None
        self._executor = None
        self._save_group = dist.new_group(backend="gloo") if args.async_save and env.enabled else None
        torch.manual_seed(args.seed * 1_000_003 + env.rank)  # masking noise differs per rank
        if self.state is not None:
            self._restore(self.state)

    def _make_dataset(self, preset: Dict[str, Any], model) -> Any:
        args, in_chans = self.args, model.in_chans
        if args.dataset is not None:
            return as_image_dataset(args.dataset, in_chans, model.img_size)
        if not args.data:
            if in_chans != 3:
                raise ValueError(
                    f"argument '--in-chans' {in_chans} expected --data DIR (multispectral rasters): the embedded scenes are RGB"
                )
            return SyntheticScenes(preset["dataset_length"], model.img_size, args.seed)
        raster = args.data_format == "raster" or (
            args.data_format == "auto"
            and (in_chans != 3 or args.band_stats is not None or os.path.isfile(os.path.join(args.data, BAND_STATS_FILE)))
        )
        if in_chans != 3 and not raster:
            raise ValueError(f"argument '--in-chans' {in_chans} expected --data-format raster or auto, got image (RGB)")
        try:
            if raster:
                rasters = RasterFolder(
                    args.data, model.img_size, args.seed, in_chans, args.band_stats, args.alpha, args.max_raster_pixels
                )
                check_readable(rasters.files, rasters.read, f"under {args.data}/<subfolder>/")
                return rasters
            images = ImageFolder(args.data, model.img_size, args.seed)
            check_readable(images.files, open_image, f"under {args.data}/<subfolder>/")
            return images
        except FileNotFoundError as exc:  # e.g. no image files under it
            if "argument '" in str(exc):
                raise
            raise ValueError(f"argument '--data' expected a folder of images, got {args.data!r}: {exc}") from exc

    def _data_name(self) -> str:
        if self.args.dataset is not None:
            return type(self.args.dataset).__name__
        if not self.args.data:
            return "embedded procedural scenes"
        return ("raster folder " if isinstance(self.dataset, RasterFolder) else "folder ") + self.args.data

    # ---- model placement --------------------------------------------------------------------------

    def _wrap(self, model):
        env = self.env
        if not env.enabled:
            return model
        if self.args.fsdp:
            from torch.distributed.fsdp import fully_shard

            encoder = (
                list(model.blocks)
                if isinstance(model, MoEViTMAE)
                else (list(model.blocks1) + list(model.blocks2) + list(model.blocks3))
            )
            blocks = encoder + list(model.decoder_blocks)
            if self.mesh is not None:  # experts over dp, the rest over the (dp, ep) mesh
                return parallel.apply_fsdp(model, blocks, self.mesh)
            for blk in blocks:
                fully_shard(blk)
            return fully_shard(model)
        if self.mesh is not None:  # the experts are not replicas: gradients averaged on the mesh's groups
            self.grad_sync = parallel.GradientSync(model, self.mesh)
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)

    def _full_state(self) -> Optional[Dict[str, torch.Tensor]]:
        """The whole model's weights (a collective under FSDP and expert parallelism)."""
        if self.args.fsdp and self.env.enabled:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            if self.mesh is not None:  # every rank its group's experts whole, then gathered over ep
                sd = get_model_state_dict(self.wrapped, options=StateDictOptions(full_state_dict=True))
                return full_state_dict(self.model, {k: v.cpu() for k, v in sd.items()})
            return get_model_state_dict(self.wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.mesh is not None:
            return full_state_dict(self.model)
        return self.model.state_dict()

    def _load_weights(self, full: Dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(local_state_dict(self.model, full) if self.mesh is not None else full)

    # ---- checkpoints ------------------------------------------------------------------------------

    def _rank_file(self) -> Optional[str]:
        """Expert parallelism keeps each rank's optimizer state in a file of its own (format 1); it
        is also how FSDP runs saved it before the DCP state (read only)."""
        return f"optimizer_rank{self.env.rank}.pt" if (self.ep > 1 or self.args.fsdp) else None

    def _read_checkpoint(self) -> Optional[Dict[str, Any]]:
        distributed.barrier(self.env)  # rank 0 has claimed --out and recovered any interrupted save
        refuse_fresh_run_into_used_directory(self.args.out, self.args.resume)
        state = load_resume_state(self.args.resume, self.args.out, self._rank_file())
        if state is None:
            return None
        saved_world = int(state.get("world", 1))
        if not checkpoint.is_dcp(state) and saved_world != self.env.world and "optimizer" not in state:
            raise ValueError(
                f"checkpoint {state['path']} was written by {saved_world} ranks with per-rank optimizer files "
                f"(optimizer_rank<r>.pt: expert parallelism, or FSDP before resharding checkpoints); resume it with "
                f"{saved_world} ranks, got {self.env.world}"
            )
        return state

    def _per_rank_batch(self, preset_batch: int) -> int:
        """--batch-size (per rank); on a resume without it, the checkpoint's global batch over this
        run's ranks, so a run resumed on another number of processes sees the same batches."""
        args, env = self.args, self.env
        if args.batch_size is not None:
            return args.batch_size
        saved = (self.state or {}).get("run", {}).get("global_batch") if isinstance((self.state or {}).get("run"), dict) else None
        if saved is None:
            return preset_batch
        if saved % env.world:
            raise ValueError(
                f"checkpoint {self.state['path']} was written with a global batch of {saved} images; resuming it on "
                f"{env.world} processes needs a global batch divisible by {env.world}: pass --batch-size to change the "
                f"global batch (the run then differs from a straight one), or use a world size that divides {saved}"
            )
        return saved // env.world

    def _dcp_state(self) -> Dict[str, Any]:
        """This rank's view of the model and optimizer state (plain tensors, or FSDP2's DTensor shards)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        if self.mesh is not None:  # the experts under the unsharded names, as DTensors over ep
            return parallel.dcp_state(self.wrapped, self.opt, self.mesh)
        model_sd, optim_sd = get_state_dict(self.wrapped, self.opt)
        return {"model": model_sd, "optim": optim_sd}

    def _restore(self, state: Dict[str, Any]) -> None:
        if checkpoint.is_dcp(state) and self.mesh is not None:
            parallel.restore_from_dcp(self.wrapped, self.opt, self.mesh, lambda s: checkpoint.read_dcp(state["path"], s))
        elif checkpoint.is_dcp(state):
            from torch.distributed.checkpoint.state_dict import set_state_dict

            dcp_state = self._dcp_state()
            checkpoint.read_dcp(state["path"], dcp_state)
            set_state_dict(self.wrapped, self.opt, model_state_dict=dcp_state["model"], optim_state_dict=dcp_state["optim"])
        elif self.mesh is not None and self._rank_file() and not self.args.fsdp:  # format 1, expert parallel
            self.opt.load_state_dict(self._reorder_format1(state["rank_state"]))
        else:
            self.opt.load_state_dict(state["rank_state"] if self._rank_file() else state["optimizer"])
        self._check_optimizer_state()
        self.scaler.load_state_dict(state["scaler"])
        rngs = state["rng"]
        # masking noise is a function of (seed, step), not of these: they are restored where they fit
        if len(rngs) == self.env.world:
            set_rng_state(rngs[self.env.rank])
        self.start = int(state["step"])
        if self.env.main:
            saved_world = int(state.get("world", 1))
            moved = f" (saved by {saved_world} processes, now {self.env.world})" if saved_world != self.env.world else ""
            print(f"resumed from {state['path']} at step {self.start}{moved}")

    def _uses_dcp(self) -> bool:
        """True: the training state goes into dcp/ (format 2). False (one process or DDP only) writes
        format 1, the optimizer in train_state.pt: the tests use it to check that such checkpoints
        still resume."""
        return True

    def _reorder_format1(self, osd: Dict[str, Any]) -> Dict[str, Any]:
        """A format-1 expert-parallel optimizer file numbers the parameters in the unsharded model's
        order (dense_order); the optimizer now holds each layer's experts after the rest of it.
        load_state_dict pairs the file's group lists with the optimizer's groups by position, so
        each group lists, in the optimizer's own order, the file's number for that parameter."""
        names = expert_names(self.model)
        in_file = {n: i for i, n in enumerate(self.dense_order)}
        canonical = {id(p): canonical_name(n, names) for n, p in self.model.named_parameters()}
        groups = self.opt.param_groups
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in osd["param_groups"]]:
            raise ValueError(
                f"checkpoint {self.state['path'] if self.state else '?'}: its per-rank optimizer state has groups of "
                f"{[len(g['params']) for g in osd['param_groups']]} parameters, this model's optimizer "
                f"{[len(g['params']) for g in groups]}; start a new run from its weights with --init-weights"
            )
        out_groups = [
            dict(saved, params=[in_file[canonical[id(p)]] for p in g["params"]]) for g, saved in zip(groups, osd["param_groups"])
        ]
        return dict(osd, param_groups=out_groups)

    def _check_optimizer_state(self) -> None:
        """Every loaded moment has its parameter's shape: load_state_dict does not check, and a fused
        AdamW step on a mismatched moment reads out of bounds (a segfault, not an error)."""
        for group in self.opt.param_groups:
            for p in group["params"]:
                for key, value in self.opt.state.get(p, {}).items():
                    if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != tuple(p.shape):
                        name = next((n for n, q in self.model.named_parameters() if q is p), "?")
                        raise ValueError(
                            f"checkpoint {self.state['path'] if self.state else '?'}: optimizer state {key!r} of "
                            f"parameter {name} has shape {list(value.shape)}, the parameter {list(p.shape)} (a "
                            f"checkpoint of another model or layout; older per-rank expert-parallel files split the "
                            f"experts r*E//W, this version in blocks of ceil(E/W)); start a new run from its weights "
                            f"with --init-weights"
                        )

    def save(self, step: int, final: bool = False) -> Optional[str]:
        """Checkpoint `step`; returns its path once it is in place. With --async-save (and not
        `final`), the step waits only for the CPU copies: the files are written in the background and
        the checkpoint moved into place at the next save or the end of the run (returns None)."""
        self._finish_pending()
        env, out = self.env, self.args.out
        weights = self._full_state()
        rngs = distributed.all_gather_objects(env, rng_state())
        dcp_state = self._dcp_state() if self._uses_dcp() else None
        background = self.args.async_save
        tmp, train_state = checkpoint.temp_path(out, step), None
        if env.main:
            checkpoint.begin(out, step)
            train_state = dict(
                scaler=self.scaler.state_dict(),
                step=step,
                rng=rngs,
                config=config_of(self.args),
                world=env.world,
                data=dict(step=step, global_batch=self.global_batch, seed=self.args.seed),
                run=dict(id=self.run_id, **self.run_args),
            )
            if dcp_state is not None:
                train_state["format"] = checkpoint.FORMAT
            else:
                train_state["optimizer"] = self.opt.state_dict()
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
            path = checkpoint.commit(self.args.out, step, self.run_id)
            checkpoint.prune(self.args.out, self.args.keep_last, self.run_id)
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

    def _settle_pending(self) -> None:
        """The run ends by an exception with an asynchronous save in flight: wait (at most --timeout,
        with no collective: another rank may be gone) for this rank's writes; the main rank then
        commits the checkpoint if it was sealed (every rank's part written), else removes it (the
        previous checkpoint stands). Either way, one line says which."""
        if self._pending is None:
            return
        (step, waits), self._pending = self._pending, None
        env, out, error = self.env, self.args.out, None
        try:
            for w in waits:
                w.result(timeout=self.args.timeout)
        except BaseException as exc:  # a failed write, or a timeout
            error = exc
        if not env.main:
            return
        tmp = checkpoint.temp_path(out, step)
        if error is None and checkpoint.is_sealed(tmp):
            path = checkpoint.commit(out, step, self.run_id)
            checkpoint.prune(out, self.args.keep_last, self.run_id)
            print(f"the run stopped by an error: the save of step {step} in flight was finished and committed, {path}")
        else:
            why = f"{type(error).__name__}: {error}" if error is not None else "not every part was written"
            warnings.warn(
                f"the run stopped by an error: the save of step {step} in flight did not finish ({why}); it was removed, "
                f"the last committed checkpoint in {out} stands"
            )
            shutil.rmtree(tmp, ignore_errors=True)

    # ---- the loop ---------------------------------------------------------------------------------

    def _saves(self) -> str:
        """When this run writes checkpoints, for the banner."""
        args, when = self.args, []
        if args.save_minutes:
            when.append(f"every {args.save_minutes:g} min")
        if args.save_every:
            when.append(f"every {args.save_every} steps")
        return f"checkpoints {' and '.join(when + ['at the end'])} into {args.out}"

    def run(self, stop: StopSignals) -> Dict[str, Any]:
        """The loop; a normal end or a signal commits every save (the last one included); an
        exception finishes and commits a save in flight (or removes it) before it propagates."""
        try:
            return self._loop(stop)
        except BaseException:
            try:
                self._settle_pending()
            except Exception as exc:  # the run's own error is the one to see
                warnings.warn(f"the save in flight could not be settled ({type(exc).__name__}: {exc})")
            raise

    def _loop(self, stop: StopSignals) -> Dict[str, Any]:
        args, env = self.args, self.env
        if self.state is not None and self.start >= self.steps:  # e.g. a second `make pretrain`
            if env.main:
                print(
                    f"geomoe pretrain: the run in {args.out} is complete: {self.state['path']} is at step {self.start} "
                    f"of {self.steps}; nothing to do (pass --steps N above {self.start} to train on, or a new --out)"
                )
            return {"history": [], "checkpoint": self.state["path"], "model": self.model, "step": self.start}
        end = self.steps if args.stop_after is None else min(self.steps, self.start + args.stop_after)
        loader = make_loader(
            self.dataset,
            self.batch,
            args.seed,
            self.start,
            end,
            self.workers,
            env.device,
            env.rank,
            env.world,
            collate_fn=skip_unreadable,
            timeout=args.timeout,
        )
        main = env.main
        if main:
            n_params = sum(p.numel() for p in self.model.parameters())
            mode = "FSDP2" if args.fsdp else ("DDP" if env.enabled and self.mesh is None else "one process")
            if self.mesh is not None:
                mode = (
                    "FSDP2" if args.fsdp else "data parallel"
                ) + f" x expert parallel, mesh dp {env.world // self.ep} x ep {self.ep}"
            print(
                f"geomoe pretrain: {args.model} config {args.config} ({n_params / 1e6:.2f} M parameters on rank 0), "
                f"{env.world} x {env.device.type} ({mode}), backend {args.backend}, "
                f"{'front end ' + args.front_end + ', ' if args.model == 'geomoe' else ''}batch {self.batch} per rank, "
                f"steps {self.start}..{self.steps}, peak lr {self.peak_lr:.2e}, "
                f"data {self._data_name()} ({len(self.dataset)} images, {self.model.in_chans} bands), "
                f"precision {self.precision}{' (GradScaler)' if self.scaler.is_enabled() else ''}"
                f"{', compiled blocks (' + self.compile_backend + ')' if args.compile else ''}"
                f"{', activation checkpointing' if args.activation_checkpointing else ''}; {self._saves()}"
            )
        writer = self._tensorboard() if main else None
        bar = tqdm(total=self.steps, initial=self.start, disable=not (args.progress and main), dynamic_ncols=True, leave=False)
        history: List[Dict[str, Any]] = []
        window = _Window(env.device)
        step, bad_in_row, final = self.start, 0, None
        trained, read_any, unreadable = 0, False, 0  # of this run: steps that trained; an image decoded here; skips
        last_save = time.monotonic()
        self.wrapped.train()
        for imgs, skipped in start_batches(loader):
            lr = lr_at(step, self.steps, self.peak_lr, self.warmup, RECIPE["min_lr_ratio"])
            ok = self._train_step(imgs, lr, window, step)
            window.skipped_images += skipped
            read_any, unreadable = read_any or imgs is not None, unreadable + skipped
            step += 1
            bar.update(1)
            if ok:
                trained += 1
                bad_in_row = 0
            else:
                bad_in_row += 1
                window.bad_steps += 1
                if main:
                    warnings.warn(f"step {step}: non-finite loss or empty batch, step skipped ({bad_in_row} in a row)")
                if bad_in_row >= args.max_bad_steps:
                    raise distributed.RunFailure(
                        f"stopping at step {step}: {bad_in_row} steps in a row had a non-finite loss or no readable "
                        f"images (--max-bad-steps {args.max_bad_steps}); the last checkpoint in {args.out} is intact"
                    )
            if step % args.log_every == 0 or step == end:
                record = window.record(step, lr, self.model, env)
                if main and record is not None:
                    history.append(record)
                    self._log(record, writer)
            # a crash loses at most --save-minutes of work: rank 0's clock decides for all (one all-reduce)
            due = bool(args.save_minutes) and env.main and time.monotonic() - last_save >= 60 * args.save_minutes
            stopping, due = self._agree(stop.requested, due)
            due = due or bool(args.save_every and step % args.save_every == 0)
            if stopping or (due and step != end):
                final = self.save(step, final=stopping)
                last_save = time.monotonic()
            if stopping:
                if main:
                    print(f"{stop.received or 'SIGTERM'}: stopped at step {step}; checkpoint {final}")
                break
        else:
            if trained == 0 and step > self.start and not self._agree(read_any)[0]:
                # a run shorter than --max-bad-steps would otherwise save the untrained model and exit 0
                raise RuntimeError(
                    f"argument '{'--data' if args.data else 'dataset'}' expected images that can be read, got none "
                    f"among the {unreadable} this run drew from {self._data_name()}: no step trained; stopped at "
                    f"step {step}, nothing was saved"
                )
            final = self.save(step, final=True)
        bar.close()
        if writer is not None:
            writer.close()
        if main:
            print(f"saved {final}")
        return {"history": history, "checkpoint": final, "model": self.model, "step": step}

    def _agree(self, *flags: bool) -> List[bool]:
        """Each flag true on every rank if it is true on any (so all ranks save and stop together)."""
        if not self.env.enabled:
            return list(flags)
        t = torch.tensor([1.0 if f else 0.0 for f in flags], device=self.env.device)
        return [bool(v) for v in distributed.all_reduce(self.env, t, dist.ReduceOp.MAX).tolist()]

    def _noise(self, step: int, rows: int) -> torch.Tensor:
        """This rank's masking noise at `step`: rows of one [global batch, tokens] draw seeded by
        (seed, step), so an image's mask depends on its place in the global batch, not on the number
        of processes (a run resumed on another world size masks as the straight run does)."""
        seed = int(np.random.SeedSequence([self.args.seed, step, 0x6D61736B]).generate_state(1, np.uint64)[0])
        g = torch.Generator().manual_seed(seed)
        noise = torch.rand(self.global_batch, self.model.grid**2, generator=g)
        lo = self.env.rank * self.batch
        return noise[lo : lo + rows].to(self.env.device, non_blocking=True)

    def _train_step(self, imgs: Optional[torch.Tensor], lr: float, window: "_Window", step: int) -> bool:
        env = self.env
        have = torch.tensor([0.0 if imgs is None else 1.0], device=env.device)
        if not bool(distributed.all_reduce(env, have, dist.ReduceOp.MIN).item()):
            return False  # some rank has no readable image: every rank skips together
        imgs = imgs.to(env.device, non_blocking=True)
        for group in self.opt.param_groups:
            group["lr"] = lr
        # NaN/Inf router scores flow on to the loss check below, as they do on a GPU (where the ops'
        # value checks are off), instead of raising in the CPU value check: a skipped step everywhere
        with autocast(self.precision, env.device), non_finite_passes():
            noise = self._noise(step, imgs.shape[0])
            loss, aux, loads = self.wrapped(imgs, RECIPE["mask_ratio"], RECIPE["kept_mask_ratio"], noise)
            total = loss + RECIPE["aux_weight"] * aux.sum()
        finite = torch.isfinite(total.detach()).float().reshape(1)
        if not bool(distributed.all_reduce(env, finite, dist.ReduceOp.MIN).item()):
            self.opt.zero_grad(set_to_none=True)
            return False
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.grad_sync is not None:
            self.grad_sync()
        self.scaler.unscale_(self.opt)
        if self.mesh is not None:  # parameters on several meshes (or not replicated): one norm over all
            grad_norm = parallel.clip_grad_norm(self.model, self.mesh, self.args.fsdp, RECIPE["clip_grad"])
        else:
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
        append_jsonl(os.path.join(self.args.out, "metrics.jsonl"), record)
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
        self.loss, self.aux, self.grad_norm, self.loads = (
            d(self.loss, loss),
            d(self.aux, aux),
            d(self.grad_norm, grad_norm),
            d(self.loads, loads),
        )

    def record(self, step: int, lr: float, model: GeoMoE, env: distributed.DistEnv) -> Optional[Dict[str, Any]]:
        seconds = time.perf_counter() - self.t0
        if self.steps == 0:
            rec = None
        else:
            n = self.steps
            # the loss and aux losses averaged over the ranks (equal shares of the global batch):
            # the global batch's loss, whatever the number of processes
            both = distributed.all_reduce(env, torch.cat([self.loss.reshape(1), self.aux.reshape(-1)])) / env.world
            self.loss, self.aux = both[0], both[1:]
            aux = (self.aux / n).tolist()
            loads = (self.loads / n).tolist()
            rec = {
                "step": step,
                "loss": float(self.loss) / n,
                "lr": lr,
                "images_per_s": self.images / seconds,
                "tokens_per_s": self.tokens / seconds,
                "aux": sum(aux) / max(len(aux), 1),
                "aux_per_layer": aux,
                "load_per_layer": loads,
                "load_max_over_mean": load_balance(self.loads / n),
                "expert_bias_per_layer": [m.expert_bias.tolist() for m in model.moe_layers()],
                "grad_norm": float(self.grad_norm) / n,
                "memory_bytes": _memory_bytes(env.device),
                "bad_steps": self.bad_steps,
                "skipped_images": self.skipped_images,
                "world": env.world,
            }
        self.reset()
        return rec


def pretrain(args: PretrainArgs) -> Dict[str, Any]:
    args.validate()
    check_torch_cache_dir()
    with StopSignals() as stop:  # from the start: a signal during set-up stops the run after its first step
        env = distributed.setup(args.device, args.timeout)
        try:
            try:
                if env.main:
                    with RunDirectory(args.out):
                        result = _Trainer(args, env).run(stop)
                else:
                    result = _Trainer(args, env).run(stop)
            except RuntimeError as exc:  # a peer gone inside DDP/FSDP/DCP: say so, not the backend's words
                failure = distributed.peer_failure(env, exc)
                if failure is None:
                    raise
                raise failure from exc
            distributed.barrier(env)  # on success only: no rank tears gloo down while another still talks to it
            return result
        finally:
            distributed.teardown(env)
