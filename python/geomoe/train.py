"""Single-process MAE pretraining of GeoMoE with the SPEC recipe: AdamW (0.9, 0.95), weight decay
0.05, linear warm-up then cosine to 1e-3 of the peak, gradient clip 1.0, aux loss weight 1e-4, the
expert-bias update after every optimizer step, fp16 autocast on GPU and float32 on CPU."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
from tqdm import tqdm

from . import checkpoint
from .configs import CONFIGS, RECIPE
from .data import ImageFolder, SyntheticScenes
from .model import GeoMoE
from .runtime import load_resume_state, lr_at, make_loader, resolve_device, restore_training_state, training_state


@dataclass
class PretrainArgs:
    config: str = "tiny"
    data: Optional[str] = None
    steps: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    out: str = "runs/pretrain"
    save_every: int = 0  # 0: only at the end
    keep_last: int = 3
    resume: Optional[str] = None  # "auto", a path, or None
    stop_after: Optional[int] = None  # end this run after N steps with a checkpoint (time-sliced jobs)
    device: str = "auto"
    backend: str = "auto"
    front_end: str = "sparse"
    seed: int = 0
    log_every: int = 10
    workers: Optional[int] = None
    amp: Optional[bool] = None  # default: on for CUDA
    progress: bool = True


def load_balance(loads: torch.Tensor) -> float:
    """Max over mean expert load, worst layer (1.0 is perfectly balanced)."""
    loads = loads.float()
    return float((loads.max(dim=-1).values / loads.mean(dim=-1).clamp_min(1e-9)).max()) if loads.numel() else 1.0


def pretrain(args: PretrainArgs) -> Dict[str, Any]:
    if args.config not in CONFIGS:
        raise ValueError(f"argument '--config' expected one of {list(CONFIGS)}, got {args.config!r}")
    preset = CONFIGS[args.config]
    device = resolve_device(args.device)
    steps = args.steps or preset["steps"]
    batch = args.batch_size or preset["batch_size"]
    peak_lr = args.lr or preset.get("lr") or preset["base_lr"] * batch / 256
    warmup = max(1, int(steps * preset["warmup_fraction"]))
    amp = device.type == "cuda" if args.amp is None else args.amp
    workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 0)

    torch.manual_seed(args.seed)
    model = GeoMoE(**preset["model"], front_end=args.front_end, backend=args.backend).to(device)
    img_size = model.img_size
    if args.data:
        dataset = ImageFolder(args.data, img_size, args.seed)
    else:
        dataset = SyntheticScenes(preset["dataset_length"], img_size, args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=RECIPE["betas"], weight_decay=RECIPE["weight_decay"])
    scaler = torch.amp.GradScaler(device.type, enabled=amp)

    os.makedirs(args.out, exist_ok=True)
    start = 0
    state = load_resume_state(args.resume, args.out)
    if state is not None:
        start = restore_training_state(state, model, opt, scaler)
        print(f"resumed from {state['path']} at step {start}")
    end = steps if args.stop_after is None else min(steps, start + args.stop_after)
    loader = make_loader(dataset, batch, args.seed, start, end, workers, device)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"geomoe pretrain: config {args.config} ({n_params / 1e6:.2f} M parameters), {device}, backend {args.backend}, "
        f"front end {args.front_end}, batch {batch}, steps {start}..{steps}, peak lr {peak_lr:.2e}, "
        f"data {'folder ' + args.data if args.data else 'embedded procedural scenes'} ({len(dataset)} images), "
        f"{'fp16 autocast' if amp else 'float32'}"
    )
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    bar = tqdm(total=steps, initial=start, disable=not args.progress, dynamic_ncols=True, leave=False)
    history = []
    t_last, images_since = time.perf_counter(), 0
    loss_sum = aux_sum = None  # device-side sums over the log interval: no sync per step
    step = start
    model.train()

    def save(step_done: int) -> str:
        path = checkpoint.checkpoint_path(args.out, step_done)
        checkpoint.save_atomic(training_state(model, opt, scaler, step_done, args), path)
        checkpoint.prune(args.out, args.keep_last)
        return path

    for imgs in loader:
        imgs = imgs.to(device, non_blocking=True)
        lr = lr_at(step, steps, peak_lr, warmup, RECIPE["min_lr_ratio"])
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            loss, aux, loads = model(imgs, RECIPE["mask_ratio"], RECIPE["kept_mask_ratio"])
            total = loss + RECIPE["aux_weight"] * aux.sum()
        opt.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), RECIPE["clip_grad"])
        scaler.step(opt)
        scaler.update()
        model.update_expert_biases(loads, RECIPE["bias_rate"])
        step += 1
        images_since += imgs.shape[0]
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        aux_sum = aux.detach().mean() if aux_sum is None else aux_sum + aux.detach().mean()
        bar.update(1)
        if step % args.log_every == 0 or step == end:
            now = time.perf_counter()
            n_steps = images_since // imgs.shape[0]
            record = {
                "step": step,
                "loss": float(loss_sum) / n_steps,
                "lr": lr,
                "images_per_s": images_since / (now - t_last),
                "aux": float(aux_sum) / n_steps,
                "grad_norm": float(grad_norm),
                "load_max_over_mean": load_balance(loads),
            }
            t_last, images_since, loss_sum, aux_sum = now, 0, None, None
            history.append(record)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            tqdm.write(
                f"step {step:>6}/{steps} | loss {record['loss']:.4f} | lr {lr:.2e} | {record['images_per_s']:7.1f} img/s | "
                f"aux {record['aux']:.4f} | expert load max/mean {record['load_max_over_mean']:.2f}"
            )
        if args.save_every and step % args.save_every == 0 and step != end:
            save(step)
    bar.close()
    final = save(step)
    print(f"saved {final}")
    return {"history": history, "checkpoint": final, "model": model}
