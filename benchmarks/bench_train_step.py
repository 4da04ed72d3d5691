"""One pretraining step (forward, backward, AdamW) of the default model: ours (visible-only front end,
geomoe MoE layers) against the faithful copy of the published implementation and against ours with
the dense masked front end, same batch and precision (fp16 autocast with a grad scaler on a GPU, as
published; float32 on the CPU); and ours with activation checkpointing per transformer block
(`geomoe_checkpointed`: on a GPU its row records, and prints, the peak memory it saves)."""

import pytest
import torch

from benchmarks import common as C
from benchmarks.published_geomoe import PublishedGeoMoE
from geomoe import GeoMoE, original_state_dict
from geomoe.speed import apply_activation_checkpointing


BATCHES = {"smoke": [2], "cpu": [2, 8], "gpu": [64]}[C.mode()]  # the first is the summary's


def published_step(model, opt, scaler, imgs, amp: bool):
    """One step of the published recipe: fp16 autocast (where `amp`), the aux loss at 1e-4, the
    grad scaler, clipping at 1.0, the optimizer step (also benchmarks.host_overhead's train step)."""

    def step():
        with torch.autocast(imgs.device.type, dtype=torch.float16, enabled=amp):
            loss, aux, load = model(imgs)
            total = loss + 1e-4 * aux.sum()
        opt.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()

    return step


@pytest.mark.parametrize("impl", ("geomoe", "geomoe_dense", "geomoe_checkpointed", "published"))
@pytest.mark.parametrize("batch", BATCHES)
def test_pretrain_step(benchmark, impl, batch):
    cfg = C.SMOKE_MODEL if C.mode() == "smoke" else {}
    dev = C.device()
    torch.manual_seed(0)
    ours = GeoMoE(**cfg, front_end="dense" if impl == "geomoe_dense" else "sparse")
    if impl.startswith("geomoe"):
        model = ours.to(dev)
    else:
        keys = {k: v for k, v in cfg.items() if k != "num_shared_experts"}
        model = PublishedGeoMoE(**keys)
        model.load_state_dict(original_state_dict(ours))
        model = model.to(dev)
    # the same fused AdamW for both: the step measures the models, not two optimizer code paths
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)
    amp = dev.type == "cuda"
    scaler = torch.amp.GradScaler(dev.type, enabled=amp)
    imgs = torch.randn(batch, 3, model.grid * 16, model.grid * 16, device=dev)

    step = published_step(model, opt, scaler, imgs, amp)

    def peak_of_one_step():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    saved = None
    if impl == "geomoe_checkpointed":
        plain = peak_of_one_step() if dev.type == "cuda" else None
        apply_activation_checkpointing(model)
        if plain is not None:
            saved = plain - peak_of_one_step()
            print(f"\nactivation checkpointing, batch {batch}: peak {plain / 2**20:.0f} MiB -> {(plain - saved) / 2**20:.0f} MiB")
    step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    C.run_pedantic(benchmark, step)
    benchmark.extra_info.update(
        group="train_step",
        impl=impl,
        images=batch,
        peak_memory_bytes=torch.cuda.max_memory_allocated() if dev.type == "cuda" else None,
        memory_saved_bytes=saved,
    )
