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

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from geomoe_kernels._checks import non_finite_passes

from . import checkpoint, cuda_graphs, distributed
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
    transformer_blocks,
)
from .trainer import Checkpointer, MoEWindow, Placement, Schedule, Task, Trainer, launch, set_lr
from .trainer.checkpointing import check_checkpoint_fits
from .trainer.data import make_loader
from .trainer.metrics import load_balance  # noqa: F401  (public here before geomoe.trainer)
from .trainer.rundir import run_identity, warn_changed_run_arguments


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
        "start a new run from these weights (a checkpoint, an original-layout file or hf:OWNER/REPO/PATH[@REV]); RGB weights get the "
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
    cuda_graphs: bool = opt(
        False,
        "replay each transformer block's forward and backward as CUDA graphs, captured after the first step "
        "(CUDA only; a fixed batch size; not with --fsdp, --ep above 1, --compile, --activation-checkpointing or "
        "--backend torch; docs/pretraining.md)",
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
        if self.cuda_graphs:
            why = cuda_graphs.combination_refusal(
                self.fsdp, self.ep, self.expert_parallel, self.compile, self.activation_checkpointing, self.backend
            )
            if why is None and (self.device == "cpu" or (self.device == "auto" and not torch.cuda.is_available())):
                why = cuda_graphs.refusal(torch.device("cpu"))  # before --out is claimed (setup checks the rest)
            if why:
                raise ValueError(why)


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


class PretrainTask(Task):
    """MAE pretraining as a run kind of the one trainer (geomoe.trainer): the GeoMoE or MoE-ViT MAE,
    its data, AdamW with the recipe's schedule, placed over one process, DDP, FSDP2 or expert
    parallel; masking noise a function of (seed, step), expert biases updated after each step."""

    kind = "pretrain"
    multi_process = True
    tensorboard_keys = ("loss", "lr", "images_per_s", "tokens_per_s", "aux", "grad_norm", "load_max_over_mean")

    def __init__(self, args: PretrainArgs):
        self.args = args

    # ---- set-up -----------------------------------------------------------------------------------

    def setup(self, trainer: Trainer) -> None:
        args, env = self.args, trainer.env
        self.env, preset = env, CONFIGS[args.config]
        self.steps = args.steps if args.steps is not None else preset["steps"]
        self.stop_after = args.stop_after
        if args.expert_parallel and not env.enabled:
            raise ValueError("argument '--expert-parallel' expected a multi-process run (torchrun), got one process")
        self.ep = args.ep if args.ep is not None else (env.world if args.expert_parallel else 1)
        if self.ep > 1 and not env.enabled:
            raise ValueError(f"argument '--ep' expected 1 in a one-process run (use torchrun for more), got {self.ep}")
        why = cuda_graphs.refusal(env.device, self.ep) if args.cuda_graphs else None
        if why:  # before any work: a CPU, expert parallelism, value checks on the GPU
            raise ValueError(why)
        self.placement = Placement(env, self.ep, args.fsdp)
        self.checkpointer = Checkpointer(env, self, dcp=True, async_save=args.async_save)
        distributed.barrier(env)  # rank 0 has claimed --out and recovered any interrupted save
        self.checkpointer.refuse_fresh_run()
        self.state = self.checkpointer.load(self.placement.rank_file())  # before the model: a resume that cannot work ends here
        self._recipe(preset)
        model = self._build_model(preset)
        self.placement.shard(model, "--ep" if args.ep else "--expert-parallel")
        self.model = model.to(env.device)
        self.dataset = self._make_dataset(preset, model)
        if self.state is not None:
            self.placement.load_weights(self.state["model"])
        self._speed_ups()
        self.wrapped = self.placement.wrap(self.model, self._blocks())
        # fused: one kernel over all parameters (on a CPU 4-5x faster than the per-op path with the
        # large stacked expert tensors); FSDP2's sharded DTensors keep the default implementation
        self.optimizer = torch.optim.AdamW(
            self.wrapped.parameters(),
            lr=self.peak_lr,
            betas=RECIPE["betas"],
            weight_decay=RECIPE["weight_decay"],
            fused=not args.fsdp,
        )
        self.scaler = grad_scaler(self.precision, env.device)
        self.schedule = Schedule(self.steps, self.peak_lr, self.warmup, RECIPE["min_lr_ratio"])
        self.window = MoEWindow(env.device)
        self.checkpointer.enable_async()
        torch.manual_seed(args.seed * 1_000_003 + env.rank)  # masking noise differs per rank
        if self.state is not None:
            self.checkpointer.restore(self.state)

    def _recipe(self, preset: Dict[str, Any]) -> None:
        """The batch, lr, warm-up, precision and workers; the run's identity and defining arguments."""
        args, env = self.args, self.env
        self.batch = self._per_rank_batch(preset["batch_size"])
        self.global_batch = global_batch = self.batch * env.world
        self.peak_lr = args.lr if args.lr is not None else (preset.get("lr") or preset["base_lr"] * global_batch / 256)
        self.warmup = max(1, int(self.steps * preset["warmup_fraction"]))
        self.precision = resolve_precision(args.precision, args.amp, env.device)
        self.workers = args.workers if args.workers is not None else (4 if env.device.type == "cuda" else 0)
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

    def _build_model(self, preset: Dict[str, Any]):
        """The MAE model, seeded alike on every rank; checked against the checkpoint; --init-weights."""
        args = self.args
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
            if self.env.main:
                print(note)
        return model

    def _speed_ups(self) -> None:
        """Per block, before the wrapping (FSDP2 shards the blocks as they are); the keys do not change."""
        args = self.args
        if args.activation_checkpointing:
            apply_activation_checkpointing(self.model)
        self.compile_backend = None
        if args.compile:  # only then: choosing a backend loads inductor
            self.compile_backend = args.compile_backend or default_compile_backend(self.env.device)
            compile_blocks(self.model, self.compile_backend)
        # --cuda-graphs: the blocks record their inputs in the first step, then are captured (train_step)
        self.graphs = (
            cuda_graphs.BlockGraphs(transformer_blocks(self.model), self.env.device, self.precision) if args.cuda_graphs else None
        )

    def _blocks(self) -> List[torch.nn.Module]:
        """The transformer blocks FSDP2 shards one by one."""
        model = self.model
        if isinstance(model, MoEViTMAE):
            encoder = list(model.blocks)
        else:
            encoder = list(model.blocks1) + list(model.blocks2) + list(model.blocks3)
        return encoder + list(model.decoder_blocks)

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

    # ---- what the loop asks -----------------------------------------------------------------------

    def complete(self) -> Optional[Dict[str, Any]]:
        if self.state is None or self.start < self.steps:
            return None
        if self.env.main:  # e.g. a second `make pretrain`
            print(
                f"geomoe pretrain: the run in {self.args.out} is complete: {self.state['path']} is at step {self.start} "
                f"of {self.steps}; nothing to do (pass --steps N above {self.start} to train on, or a new --out)"
            )
        return {"history": [], "checkpoint": self.state["path"], "model": self.model, "step": self.start}

    def loader(self, start: int, end: int):
        env = self.env
        return make_loader(
            self.dataset,
            self.batch,
            self.args.seed,
            start,
            end,
            self.workers,
            env.device,
            env.rank,
            env.world,
            collate_fn=skip_unreadable,
            timeout=self.args.timeout,
        )

    def _saves(self) -> str:
        """When this run writes checkpoints, for the banner."""
        args, when = self.args, []
        if args.save_minutes:
            when.append(f"every {args.save_minutes:g} min")
        if args.save_every:
            when.append(f"every {args.save_every} steps")
        return f"checkpoints {' and '.join(when + ['at the end'])} into {args.out}"

    def banner(self) -> str:
        args, env = self.args, self.env
        n_params = sum(p.numel() for p in self.model.parameters())
        mesh = self.placement.mesh
        mode = "FSDP2" if args.fsdp else ("DDP" if env.enabled and mesh is None else "one process")
        if mesh is not None:
            mode = (
                "FSDP2" if args.fsdp else "data parallel"
            ) + f" x expert parallel, mesh dp {env.world // self.ep} x ep {self.ep}"
        return (
            f"geomoe pretrain: {args.model} config {args.config} ({n_params / 1e6:.2f} M parameters on rank 0), "
            f"{env.world} x {env.device.type} ({mode}), backend {args.backend}, "
            f"{'front end ' + args.front_end + ', ' if args.model == 'geomoe' else ''}batch {self.batch} per rank, "
            f"steps {self.start}..{self.steps}, peak lr {self.peak_lr:.2e}, "
            f"data {self._data_name()} ({len(self.dataset)} images, {self.model.in_chans} bands), "
            f"precision {self.precision}{' (GradScaler)' if self.scaler.is_enabled() else ''}"
            f"{', compiled blocks (' + self.compile_backend + ')' if args.compile else ''}"
            f"{', activation checkpointing' if args.activation_checkpointing else ''}"
            f"{', CUDA graphs per block (captured after the first step)' if args.cuda_graphs else ''}; {self._saves()}"
        )

    def _noise(self, step: int, rows: int) -> torch.Tensor:
        """This rank's masking noise at `step`: rows of one [global batch, tokens] draw seeded by
        (seed, step), so an image's mask depends on its place in the global batch, not on the number
        of processes (a run resumed on another world size masks as the straight run does)."""
        seed = int(np.random.SeedSequence([self.args.seed, step, 0x6D61736B]).generate_state(1, np.uint64)[0])
        g = torch.Generator().manual_seed(seed)
        noise = torch.rand(self.global_batch, self.model.grid**2, generator=g)
        lo = self.env.rank * self.batch
        return noise[lo : lo + rows].to(self.env.device, non_blocking=True)

    def train_step(self, batch: Tuple[Any, ...], lr: float, step: int) -> Optional[str]:
        env, (imgs, _) = self.env, batch
        skip = "non-finite loss or empty batch"
        if env.world > 1:  # some rank has no readable image: every rank skips together
            have = torch.tensor([0.0 if imgs is None else 1.0], device=env.device)
            if not bool(distributed.all_reduce(env, have, dist.ReduceOp.MIN).item()):
                return skip
        elif imgs is None:  # one process knows on the host: no wait for the device's previous step
            return skip
        imgs = imgs.to(env.device, non_blocking=True)
        set_lr(self.optimizer, lr)
        # NaN/Inf router scores flow on to the loss check below, as they do on a GPU (where the ops'
        # value checks are off), instead of raising in the CPU value check: a skipped step everywhere.
        # --cuda-graphs: no cast cache; a batch shortened by unreadable images runs the blocks eagerly
        graphs = self.graphs
        eager = graphs.eager(imgs.shape[0] != self.batch) if graphs is not None else contextlib.nullcontext()
        with autocast(self.precision, env.device, cache=graphs is None), non_finite_passes(), eager:
            noise = self._noise(step, imgs.shape[0])
            loss, aux, loads = self.wrapped(imgs, RECIPE["mask_ratio"], RECIPE["kept_mask_ratio"], noise)
            total = loss + RECIPE["aux_weight"] * aux.sum()
        # The loss is checked after the backward is queued, not before: the one wait for the device
        # in a step then comes when the host has launched all of it, so the device is never idle
        # while the host queues the backward. A non-finite step costs a wasted backward, nothing else.
        finite = torch.isfinite(total.detach()).float().reshape(1)
        self.optimizer.zero_grad(set_to_none=True)
        with non_finite_passes():
            self.scaler.scale(total).backward()
        if self.placement.grad_sync is not None:
            self.placement.grad_sync()
        if not bool(distributed.all_reduce(env, finite, dist.ReduceOp.MIN).item()):
            self.optimizer.zero_grad(set_to_none=True)
            return skip
        self.scaler.unscale_(self.optimizer)
        grad_norm = self.placement.clip_grad_norm(RECIPE["clip_grad"])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        loads = distributed.all_reduce(env, loads.clone())  # the published rule: sum over data-parallel ranks
        self.model.update_expert_biases(loads, RECIPE["bias_rate"])  # in place: a captured router reads the new biases
        if graphs is not None and graphs.ready():  # after the first step: plans, kernels and verdicts are made
            graphs.capture()
        kept = int(self.model.grid**2 * (1 - RECIPE["mask_ratio"]))
        self.window.add(imgs.shape[0] * env.world, imgs.shape[0] * env.world * kept, loss, aux, loads, grad_norm)
        return None

    def log_due(self, step: int, end: int) -> bool:
        return step % self.args.log_every == 0 or step == end

    def record(self, step: int, lr: float) -> Optional[Dict[str, Any]]:
        return self.window.record(step, lr, self.model, self.env)

    def log_line(self, record: Dict[str, Any]) -> str:
        extra = ""
        if record["bad_steps"] or record["skipped_images"]:
            extra = f" | skipped {record['bad_steps']} steps, {record['skipped_images']} images"
        return (
            f"step {record['step']:>6}/{self.steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
            f"{record['images_per_s']:7.1f} img/s | aux {record['aux']:.4f} | "
            f"expert load max/mean {record['load_max_over_mean']:.2f}{extra}"
        )

    def checkpoint_state(self, step: int) -> Dict[str, Any]:
        return {"data": dict(step=step, global_batch=self.global_batch, seed=self.args.seed)}

    def check_end(self, step: int) -> None:
        counters = self.trainer.counters
        if counters.trained == 0 and step > self.start and not self.trainer.agree(counters.read_any)[0]:
            # a run shorter than --max-bad-steps would otherwise save the untrained model and exit 0
            raise RuntimeError(
                f"argument '{'--data' if self.args.data else 'dataset'}' expected images that can be read, got none "
                f"among the {counters.unreadable} this run drew from {self._data_name()}: no step trained; stopped at "
                f"step {step}, nothing was saved"
            )

    def result(self, history: List[Dict[str, Any]], checkpoint: Optional[str], step: int) -> Dict[str, Any]:
        if self.env.main:
            print(f"saved {checkpoint}")
        return {"history": history, "checkpoint": checkpoint, "model": self.model, "step": step}


def pretrain(args: PretrainArgs) -> Dict[str, Any]:
    args.validate()
    return launch(PretrainTask(args), args.device, args.timeout)
