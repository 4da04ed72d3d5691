"""Scene-classification fine-tuning of the pretrained encoder: mean-pooled tokens -> LayerNorm ->
linear head, layer-wise lr decay, AdamW, warm-up + cosine, label smoothing, optional mixup/cutmix,
auxiliary loss weight 5e-6, MoE biases frozen, top-1 on a validation folder every epoch,
checkpoints and resume like pretraining."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from . import checkpoint
from .backbone import GeoMoEBackbone
from .configs import CONFIGS
from .data import ClassFolder, write_scene_classes
from .original import load_original_state_dict
from .runtime import load_resume_state, lr_at, make_loader, resolve_device, restore_single, save_single

AUX_WEIGHT = 5e-6
_BIAS_NAMES = {"b1", "b2", "shared_b1", "shared_b2"}  # stacked expert biases: 2-d, but biases


class GeoMoEClassifier(nn.Module):
    def __init__(self, backbone: GeoMoEBackbone, num_classes: int):
        super().__init__()
        self.backbone = backbone
        dim = backbone.embed_dims[2]
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, imgs: Tensor) -> Tuple[Tensor, Tensor]:
        """(logits [N, classes], summed auxiliary loss)."""
        out = self.backbone.forward_features(imgs)
        return self.head(self.fc_norm(out.pooled)), out.aux.sum()


def layer_id(name: str, num_layers: int) -> int:
    """0 for everything before the MoE blocks, i + 1 for MoE block i, num_layers for the head."""
    if name.startswith("backbone.blocks3."):
        return int(name.split(".")[2]) + 1
    if name.startswith("backbone."):
        return 0
    return num_layers


def param_groups(model: GeoMoEClassifier, weight_decay: float, layer_decay: float) -> List[Dict[str, Any]]:
    """One group per (layer, decay or not): lr scale layer_decay^(num_layers - layer); no weight decay
    on biases, norms and the position table."""
    num_layers = len(model.backbone.blocks3) + 1
    groups: Dict[Tuple[int, bool], Dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.rsplit(".", 1)[-1] in _BIAS_NAMES or name.endswith("pos_embed")
        lid = layer_id(name, num_layers)
        g = groups.setdefault(
            (lid, no_decay),
            {"params": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": layer_decay ** (num_layers - lid)},
        )
        g["params"].append(p)
    return list(groups.values())


def mix_batch(
    imgs: Tensor, labels: Tensor, num_classes: int, smoothing: float, mixup: float, cutmix: float, gen: torch.Generator
) -> Tuple[Tensor, Tensor]:
    """Soft targets with label smoothing; with mixup/cutmix alphas > 0, one of them (even odds when
    both) mixes the batch with its reverse."""
    off = smoothing / num_classes
    target = torch.full((labels.shape[0], num_classes), off, device=imgs.device)
    target.scatter_(1, labels[:, None], 1.0 - smoothing + off)
    if mixup <= 0 and cutmix <= 0:
        return imgs, target
    use_cutmix = cutmix > 0 and (mixup <= 0 or torch.rand(1, generator=gen).item() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = float(np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen))).beta(alpha, alpha))
    flipped = imgs.flip(0)
    if use_cutmix:
        H, W = imgs.shape[2:]
        ch, cw = int(H * (1 - lam) ** 0.5), int(W * (1 - lam) ** 0.5)
        cy, cx = int(torch.randint(0, H, (1,), generator=gen)), int(torch.randint(0, W, (1,), generator=gen))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, H)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, W)
        imgs = imgs.clone()
        imgs[:, :, y0:y1, x0:x1] = flipped[:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (H * W)
    else:
        imgs = lam * imgs + (1 - lam) * flipped
    return imgs, lam * target + (1 - lam) * target.flip(0)


@torch.no_grad()
def evaluate(model: GeoMoEClassifier, dataset: ClassFolder, device: torch.device, batch: int, amp: bool) -> float:
    model.eval()
    correct = 0
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=False)
    for imgs, labels in loader:
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            logits, _ = model(imgs.to(device))
        correct += int((logits.argmax(-1).cpu() == labels).sum())
    model.train()
    return correct / len(dataset)


def load_pretrained(backbone: GeoMoEBackbone, path: str) -> str:
    """Our pretraining checkpoint (a ckpt_* directory), or a file in the original layout (full or
    encoder-only)."""
    state = checkpoint.load(path) if os.path.isdir(path) else None
    if state is not None:
        own = backbone.state_dict()
        picked = {k: v for k, v in state["model"].items() if k in own}
        backbone.load_state_dict(picked, strict=False)
        return f"loaded {len(picked)} of {len(own)} backbone tensors from the pretraining checkpoint {path}"
    res = load_original_state_dict(backbone, path)
    return f"loaded {path} (original layout): {len(res.missing)} missing, {len(res.unexpected)} unexpected keys (decoder keys are expected)"


@dataclass
class FinetuneArgs:
    config: str = "tiny"
    data: Optional[str] = None  # folder with train/ and val/ class folders; None: the embedded scene classes
    weights: Optional[str] = None
    img_size: Optional[int] = None
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    layer_decay: float = 0.85
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    out: str = "runs/finetune"
    resume: Optional[str] = None
    keep_last: int = 2
    device: str = "auto"
    backend: str = "auto"
    seed: int = 0
    workers: Optional[int] = None
    amp: Optional[bool] = None
    progress: bool = True


def finetune(args: FinetuneArgs) -> Dict[str, Any]:
    if args.config not in CONFIGS:
        raise ValueError(f"argument '--config' expected one of {list(CONFIGS)}, got {args.config!r}")
    device = resolve_device(args.device)
    amp = device.type == "cuda" if args.amp is None else args.amp
    workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 0)
    model_cfg = {k: v for k, v in CONFIGS[args.config]["model"].items() if not k.startswith("decoder")}
    img_size = args.img_size or model_cfg.get("img_size", 224)
    os.makedirs(args.out, exist_ok=True)
    data = args.data
    if data is None:
        data = os.path.join(args.out, "scene_classes")
        if not os.path.isdir(os.path.join(data, "val")):
            write_scene_classes(data, per_class_train=64, per_class_val=16, size=max(img_size, 64), seed=args.seed)
    train_set = ClassFolder(os.path.join(data, "train"), img_size, train=True, seed=args.seed)
    val_set = ClassFolder(os.path.join(data, "val"), img_size, train=False, classes=train_set.classes)

    torch.manual_seed(args.seed)
    backbone = GeoMoEBackbone(**model_cfg, backend=args.backend)
    note = load_pretrained(backbone, args.weights) if args.weights else "from scratch (no --weights)"
    model = GeoMoEClassifier(backbone, len(train_set.classes)).to(device)
    groups = param_groups(model, args.weight_decay, args.layer_decay)
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    per_epoch = len(train_set) // args.batch_size
    total = per_epoch * args.epochs
    warmup = max(1, int(per_epoch * args.warmup_epochs))

    start, best = 0, 0.0
    state = load_resume_state(args.resume, args.out)
    if state is not None:
        start = restore_single(state, model, opt, scaler)
        best = float(state.get("best_top1", 0.0))
        print(f"resumed from {state['path']} at step {start}")
    print(
        f"geomoe finetune: config {args.config}, {img_size} px, {len(train_set.classes)} classes "
        f"({len(train_set)} train / {len(val_set)} val images), {device}, {note}"
    )
    loader = make_loader(train_set, args.batch_size, args.seed, start, total, workers, device)
    mix_gen = torch.Generator().manual_seed(args.seed)
    bar = tqdm(total=total, initial=start, disable=not args.progress, dynamic_ncols=True, leave=False)
    history, step, t0, seen = [], start, time.perf_counter(), 0
    model.train()
    for imgs, labels in loader:
        imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        mix_gen.manual_seed(args.seed * 1_000_003 + step)  # mixing depends on the step alone: resumable
        imgs, target = mix_batch(imgs, labels, len(train_set.classes), args.smoothing, args.mixup, args.cutmix, mix_gen)
        lr = lr_at(step, total, args.lr, warmup, 1e-3)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            logits, aux = model(imgs)
            loss = torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
            total_loss = loss + AUX_WEIGHT * aux
        opt.zero_grad(set_to_none=True)
        scaler.scale(total_loss).backward()
        scaler.step(opt)
        scaler.update()
        step += 1
        seen += imgs.shape[0]
        bar.update(1)
        if step % per_epoch == 0:
            epoch = step // per_epoch
            top1 = evaluate(model, val_set, device, args.batch_size, amp)
            best = max(best, top1)
            now = time.perf_counter()
            record = {"epoch": epoch, "step": step, "loss": float(loss.detach()), "lr": lr, "val_top1": top1,
                      "images_per_s": seen / (now - t0)}
            t0, seen = now, 0
            history.append(record)
            with open(os.path.join(args.out, "metrics.jsonl"), "a") as f:
                f.write(json.dumps(record) + "\n")
            tqdm.write(f"epoch {epoch:>3}/{args.epochs} | loss {record['loss']:.4f} | lr {lr:.2e} | "
                       f"val top-1 {100 * top1:.1f}% (best {100 * best:.1f}%) | {record['images_per_s']:.1f} img/s")
            save_single(args.out, step, args.keep_last, model, opt, scaler, args, best_top1=best)
    bar.close()
    return {"history": history, "best_top1": best, "model": model}
