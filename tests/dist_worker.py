"""Worker functions for the multi-process tests (spawned; importable by the children)."""

import os

import torch
import torch.distributed as dist


def init(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


def make_layer():
    """The layer and data every rank (and the single-process reference) starts from; with
    GEOMOE_TEST_EP_OPTIONS (JSON) MoEMLP's LLM options on 8 experts, every parameter drawn."""
    import json

    from geomoe_kernels import MoEMLP

    torch.manual_seed(0)
    options = json.loads(os.environ.get("GEOMOE_TEST_EP_OPTIONS", "null"))
    if options is not None:
        moe = MoEMLP(16, 12, 8, top_k=3, **options).double()
        with torch.no_grad():
            for p in moe.parameters():
                p.copy_(torch.randn_like(p) * 0.5)
            moe.expert_bias.copy_(torch.randn(8, dtype=torch.float64) * 0.1)
        return moe, torch.randn(40, 16, dtype=torch.float64), torch.randn(40, 16, dtype=torch.float64)
    moe = MoEMLP(16, 12, 7, 1, 3).double()
    with torch.no_grad():
        moe.expert_bias.copy_(torch.tensor([0.0, 0.3, 0, 0, 0, -0.2, 0], dtype=torch.float64))
        for p in (moe.b1, moe.b2):
            p.normal_()
    return moe, torch.randn(40, 16, dtype=torch.float64), torch.randn(40, 16, dtype=torch.float64)


def ep_layer(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Each rank: the same MoEMLP, sharded; its half of the tokens; saves output and gradients."""
    from geomoe_kernels.nn import _layer_plan
    from geomoe_kernels.nn.expert_parallel import ExpertParallelMoEMLP

    init(rank, world, init_file)
    moe, x, g = make_layer()
    ep = ExpertParallelMoEMLP.from_dense(moe)
    lo, hi = rank * 40 // world, (rank + 1) * 40 // world
    if os.environ.get("GEOMOE_TEST_EMPTY_RANK"):  # rank 0 takes every token, rank 1 none
        lo, hi = (0, 40) if rank == 0 else (40, 40)
    # the op path and the planned path (the default), with the aux loss in the loss: the same bits
    paths = {}
    for use_plan in (False, True):
        ep.use_plan = use_plan
        ep.zero_grad(set_to_none=True)
        built = _layer_plan.plans_built
        xs = x[lo:hi].clone().requires_grad_(True)
        y, aux, load = ep(xs)
        ((y * g[lo:hi]).sum() + aux).backward()
        paths[use_plan] = [y.detach(), aux.detach(), load, xs.grad] + [p.grad for p in ep.parameters()]
        paths[use_plan].append(torch.tensor(_layer_plan.plans_built - built))
    ep.zero_grad(set_to_none=True)
    xs = x[lo:hi].clone().requires_grad_(True)
    y, aux, load = ep(xs)
    (y * g[lo:hi]).sum().backward()
    torch.save(
        {
            "paths": paths,
            "y": y.detach(),
            "x_grad": xs.grad,
            "load": load,
            "lo": lo,
            "hi": hi,
            "grads": {n.replace("experts.", ""): p.grad for n, p in ep.named_parameters() if p.grad is not None},
            "range": (ep.expert_start, ep.expert_end),
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()
    # the results are written: leave without the interpreter's teardown, where torch's threads once
    # ended the process with "terminate called without an active exception" (SIGABRT, under load in
    # CI's run; not reproduced in 9 runs beside it, alone or under load) after the work was done
    os._exit(0)


class _Block(torch.nn.Module):
    def __init__(self, dim: int):
        from geomoe_kernels import MoEMLP

        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.mlp = MoEMLP(dim, 12, 4, 1, 2)

    def forward(self, h):
        y, aux, load = self.mlp(self.norm(h))
        return h + y


class TinyMoENet(torch.nn.Module):
    """Two MoE blocks between linear layers: small enough for 4 gloo processes in float64."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.embed = torch.nn.Linear(8, dim)
        self.blocks = torch.nn.ModuleList([_Block(dim) for _ in range(2)])
        self.head = torch.nn.Linear(dim, 4)

    def forward(self, x):
        h = self.embed(x)
        for blk in self.blocks:
            h = blk(h)
        return self.head(h)


def make_net():
    """The net, inputs [48, 8] and targets [48, 4] (float64) every rank and the reference start from."""
    torch.manual_seed(1)
    net = TinyMoENet().double()
    with torch.no_grad():
        for blk in net.blocks:
            blk.mlp.expert_bias.copy_(torch.tensor([0.1, -0.2, 0.0, 0.3], dtype=torch.float64))
            blk.mlp.b1.normal_()
    return net, torch.randn(48, 8, dtype=torch.float64), torch.randn(48, 4, dtype=torch.float64)


CLIP = 0.5  # times the gradient's norm: the clipping scales every gradient


def ep_mesh_grads(rank: int, world: int, init_file: str, out_dir: str, ep: int) -> None:
    """Each rank: TinyMoENet on the (dp, ep) mesh, experts over ep, with FSDP2 and without; its share
    of the batch; the loss averaged over the ranks, the whole model's gradients after clipping."""
    from torch.distributed.tensor import DTensor

    from geomoe import parallel
    from geomoe_kernels.nn.expert_parallel import full_state_dict

    init(rank, world, init_file)
    mesh = parallel.build_mesh("cpu", world, ep)
    out = {}
    for fsdp in (True, False):
        net, x, t = make_net()
        parallel.shard_model_experts(net, mesh)
        sync = None
        if fsdp:
            parallel.apply_fsdp(net, list(net.blocks), mesh)
        else:
            parallel.BUCKET_ELEMENTS = 200  # several all-reduce buckets, a parameter larger than one alone
            sync = parallel.GradientSync(net, mesh)
        lo, hi = rank * 48 // world, (rank + 1) * 48 // world
        loss = ((net(x[lo:hi]) - t[lo:hi]) ** 2).mean()
        loss.backward()
        if sync is not None:
            sync()
        norm = parallel.clip_grad_norm(net, mesh, fsdp, float(os.environ["GEOMOE_TEST_MAX_NORM"]))
        grads = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad) for n, p in net.named_parameters()}
        grads = full_state_dict(net, grads)
        avg = loss.detach().clone()
        dist.all_reduce(avg)
        out["fsdp" if fsdp else "sync"] = {"loss": avg / world, "norm": norm, "grads": grads}
    if rank == 0:
        torch.save(out, os.path.join(out_dir, "mesh.pt"))
    dist.barrier()
    dist.destroy_process_group()


def stalled_peer(rank: int, world: int, port: int, out_dir: str) -> None:
    """Rank 1 joins, then stops answering (as a SIGSTOPped or hung rank would) until rank 0 is done;
    rank 0's next collective must end within the --timeout with a message, not wait 30 minutes."""
    import time

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from geomoe import distributed

    env = distributed.setup("cpu", timeout=2.0)
    done = os.path.join(out_dir, "rank0_done")
    if rank == 1:
        t0 = time.time()
        while not os.path.exists(done) and time.time() - t0 < 60:
            time.sleep(0.05)
        return
    t0 = time.time()
    try:
        distributed.all_reduce(env, torch.ones(1))
        message = "no error"
    except RuntimeError as exc:
        message = str(exc)
    with open(os.path.join(out_dir, "rank0.txt"), "w") as f:
        f.write(f"{time.time() - t0:.2f}\n{message}")
    open(done, "w").close()
    # leave without tearing down: a process group whose collective timed out may abort (SIGABRT) in
    # its destructor, which was seen once under load and is not what this test checks
    os._exit(0)


def killed_peer(rank: int, world: int, port: int, out_dir: str) -> None:
    """A two-process pretraining (DDP) in which rank 1 dies (SIGKILL) in its second step, after the
    step's guarded check and before DDP's own collectives: rank 0 must end with the run's message
    that another rank stopped or died, not the backend's words. Rank 0 writes what it raised."""
    import signal
    import time

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from geomoe import train

    calls = []

    def dying(*args, **kwargs):
        calls.append(1)
        if rank == 1 and len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    real, train.non_finite_passes = train.non_finite_passes, dying
    args = train.PretrainArgs(
        out=os.path.join(out_dir, "run"), steps=4, batch_size=4, device="cpu", progress=False, tensorboard=False, timeout=20
    )
    t0 = time.time()
    try:
        train.pretrain(args)
        message = "no error"
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}"
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(f"{time.time() - t0:.2f}\n{message}")
    os._exit(0)
