"""Multi-process tests on gloo (CPU): expert parallelism equals one process; data-parallel pretraining
under torchrun; the loads summed over ranks drive the same bias update everywhere."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from tests.dist_worker import ep_layer, ep_mesh_grads, make_layer, make_net

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _single_process_reference():
    moe, x, g = make_layer()
    x.requires_grad_(True)
    y, aux, load = moe(x)
    (y * g).sum().backward()
    return moe, x, y, load


def _paths_give_the_same_bits(ranks):
    """Each rank's op path and planned path (issue 28 item 4: the dispatch, the rank's experts and the
    combine on a launch plan, the exchanges between them): the same output, aux, load, input
    gradient and every parameter gradient, bit for bit; the planned run made (or used) its plans."""
    for r in ranks:
        ops, planned = r["paths"][False], r["paths"][True]
        assert int(ops[-1]) == 0 and int(planned[-1]) >= 1  # the op path makes no plan; the planned one did
        assert len(ops) == len(planned)
        for i, (a, b) in enumerate(zip(ops[:-1], planned[:-1])):
            assert (a is None) == (b is None), i
            if a is not None:
                assert a.dtype == b.dtype and torch.equal(a, b), (i, (a.double() - b.double()).abs().max())


@pytest.mark.parametrize("empty_rank", [False, True])
def test_expert_parallel_equals_one_process(tmp_path, monkeypatch, empty_rank):
    if empty_rank:
        monkeypatch.setenv("GEOMOE_TEST_EMPTY_RANK", "1")
    mp.spawn(ep_layer, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    moe, x, y, load = _single_process_reference()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    _paths_give_the_same_bits(ranks)
    assert ranks[0]["range"] == (0, 4) and ranks[1]["range"] == (4, 7)  # 7 experts: 4 + 3 (torch.chunk's blocks)
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach(), rtol=0, atol=1e-13)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]), x.grad, rtol=0, atol=1e-13)
    assert torch.equal(ranks[0]["load"] + ranks[1]["load"], load)
    for name in ("w1", "b1", "w2", "b2"):  # expert gradients arrive divided by the world size
        got = torch.cat([r["grads"][name] for r in ranks]) * 2
        torch.testing.assert_close(got, getattr(moe, name).grad, rtol=0, atol=1e-12)
    for name in ("gate.weight", "shared_w1", "shared_b2"):  # replicated: the sum over ranks
        got = ranks[0]["grads"][name] + ranks[1]["grads"][name]
        torch.testing.assert_close(got, dict(moe.named_parameters())[name].grad, rtol=0, atol=1e-12)


# MoEMLP's LLM options, each sharded over two ranks (8 experts: 4 + 4)
EP_OPTIONS = {
    # DeepSeek-V3: no biases, sigmoid + bias selection in 4 groups (2 kept), scaling 2.5, a gated shared expert
    "deepseek": dict(
        num_shared_experts=1,
        score_func="sigmoid",
        activation="swiglu",
        bias=False,
        gate_bias=False,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        shared_gate=True,
    ),
    # Qwen-style softmax then top-k without renormalisation, SwiGLU side by side, no shared expert
    "softmax-no-renorm": dict(num_shared_experts=0, score_func="softmax", renormalize=False, activation="swiglu", bias=False),
    # softmax top-k renormalised, GPT-OSS's interleaved SwiGLU with biases
    "interleaved": dict(num_shared_experts=1, score_func="softmax", activation="swiglu", swiglu_layout="interleaved"),
}


@pytest.mark.parametrize("case", list(EP_OPTIONS))
def test_expert_parallel_with_llm_options_equals_one_process(tmp_path, monkeypatch, case):
    monkeypatch.setenv("GEOMOE_TEST_EP_OPTIONS", json.dumps(EP_OPTIONS[case]))
    mp.spawn(ep_layer, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    moe, x, y, load = _single_process_reference()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    _paths_give_the_same_bits(ranks)
    assert ranks[0]["range"] == (0, 4) and ranks[1]["range"] == (4, 8)
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]), x.grad, rtol=0, atol=1e-12)
    assert torch.equal(ranks[0]["load"] + ranks[1]["load"], load)
    for name, p in moe.named_parameters():
        if name in ("w1", "b1", "w2", "b2"):  # sharded: each rank's experts, divided by the world size
            got = torch.cat([r["grads"][name] for r in ranks]) * 2
        else:  # replicated: the sum over ranks
            got = ranks[0]["grads"][name] + ranks[1]["grads"][name]
        torch.testing.assert_close(got, p.grad, rtol=0, atol=1e-11, msg=lambda m: f"{name}: {m}")
    assert set(ranks[0]["grads"]) == {n for n, _ in moe.named_parameters()}


def test_expert_parallel_refuses_a_block_sharing_moe(monkeypatch):
    from geomoe_kernels import MoEMLP
    from geomoe_kernels.nn.expert_parallel import ExpertParallelMoEMLP

    class BlockSharing(MoEMLP):  # as the transformers adapter (integrations/transformers_moe.py) declares itself
        shares_expert_tensors = True

    moe = BlockSharing(8, 6, 4, 0, 2)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(ValueError, match="argument 'moe'.*from_transformers"):
        ExpertParallelMoEMLP.from_dense(moe)


def test_expert_parallel_with_fsdp_on_a_mesh_equals_one_process(tmp_path, monkeypatch):
    """4 gloo processes on a (dp 2, ep 2) mesh, float64: the experts over ep, FSDP2 over dp (and, without
    FSDP2, the gradient all-reduces on the mesh's groups) give one process's loss, gradient norm and
    clipped gradients on the whole batch."""
    net, x, t = make_net()
    loss = ((net(x) - t) ** 2).mean()
    loss.backward()
    names = [n for n, p in net.named_parameters()]
    max_norm = 0.5 * float(torch.nn.utils.get_total_norm([p.grad for p in net.parameters()]))
    norm = torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm)
    monkeypatch.setenv("GEOMOE_TEST_MAX_NORM", repr(max_norm))
    mp.spawn(ep_mesh_grads, args=(4, str(tmp_path / "init"), str(tmp_path), 2), nprocs=4)
    got = torch.load(tmp_path / "mesh.pt")
    for mode in ("fsdp", "sync"):
        r = got[mode]
        assert r["grads"].keys() == set(names), mode
        torch.testing.assert_close(r["loss"], loss.detach(), rtol=0, atol=1e-14)
        torch.testing.assert_close(r["norm"].double(), norm.double(), rtol=1e-6, atol=0)
        for n, p in net.named_parameters():
            torch.testing.assert_close(r["grads"][n], p.grad, rtol=0, atol=1e-13, msg=lambda m: f"{mode} {n}: {m}")


def _torchrun(out, *extra, steps=4, nproc=2, batch=4):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "geomoe",
        "pretrain",
        "--config",
        "tiny",
        "--steps",
        str(steps),
        *(["--batch-size", str(batch)] if batch else []),
        "--log-every",
        "1",
        "--out",
        str(out),
        "--no-progress",
        "--no-tensorboard",
        *extra,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _weights(run_dir, step):
    from safetensors.torch import load_file

    return load_file(os.path.join(run_dir, f"ckpt_{step:08d}", "model.safetensors"))


@pytest.mark.parametrize("mode", [[], ["--expert-parallel"], ["--fsdp"]], ids=["ddp", "expert_parallel", "fsdp"])
def test_two_process_pretraining_resumes_exactly(tmp_path, mode):
    straight = _torchrun(tmp_path / "a", *mode)
    _torchrun(tmp_path / "b", "--stop-after", "2", *mode)
    resumed = _torchrun(tmp_path / "b", "--resume", "auto", *mode)
    assert "resumed from" in resumed and "2 x cpu" in straight
    a, b = _weights(tmp_path / "a", 4), _weights(tmp_path / "b", 4)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [json.loads(l) for l in open(tmp_path / "a" / "metrics.jsonl")]
    assert [r["world"] for r in rows] == [2] * 4
    assert len(rows[-1]["load_per_layer"][0]) == 8 and len(rows[-1]["expert_bias_per_layer"]) == 2


def _to_format1(ckpt, world):
    """Rewrite a checkpoint of a `--expert-parallel` run on `world` processes as earlier versions
    wrote it (format 1): each rank's AdamW state in optimizer_rank<r>.pt, numbered in the unsharded
    model's parameter order, one group listing them in that order, each expert tensor that rank's
    block of ceil(E / world) experts; train_state.pt without "format"; no dcp/. (The layout of the
    files an older version wrote, checked against one when this was written.)"""
    import shutil

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from geomoe.configs import CONFIGS
    from geomoe.model import GeoMoE
    from geomoe_kernels.nn import MoEMLP

    dcp_to_torch_save(os.path.join(ckpt, "dcp"), os.path.join(ckpt, "full.pt"))
    optim = torch.load(os.path.join(ckpt, "full.pt"), weights_only=False)["optim"]
    dense = GeoMoE(**CONFIGS["tiny"]["model"])
    order = [n for n, _ in dense.named_parameters()]
    experts = {}
    for name, m in dense.named_modules():
        if isinstance(m, MoEMLP):
            block = -(-m.num_experts // world)
            experts.update({f"{name}.{p}": block for p in ("w1", "b1", "w2", "b2") if getattr(m, p, None) is not None})
    assert len(optim["param_groups"]) == 1 and experts
    group = {k: v for k, v in optim["param_groups"][0].items() if k != "params"}
    for r in range(world):
        state = {}
        for i, n in enumerate(order):
            if n in optim["state"]:
                cut = lambda v: v[r * experts[n] : (r + 1) * experts[n]] if n in experts and v.dim() else v  # noqa: E731
                state[i] = {k: cut(v).clone() for k, v in optim["state"][n].items()}
        torch.save(
            {"state": state, "param_groups": [dict(group, params=list(range(len(order))))]},
            os.path.join(ckpt, f"optimizer_rank{r}.pt"),
        )
    train_state = torch.load(os.path.join(ckpt, "train_state.pt"), weights_only=False)
    del train_state["format"]
    torch.save(train_state, os.path.join(ckpt, "train_state.pt"))
    shutil.rmtree(os.path.join(ckpt, "dcp"))
    os.remove(os.path.join(ckpt, "full.pt"))
    os.remove(os.path.join(ckpt, "checksums.json"))  # kept since format 2


def test_two_process_async_save_seals_every_ranks_part(tmp_path):
    """--async-save on 2 processes: the main rank's writer seals each checkpoint once both ranks'
    DCP shards and the metadata are written, so its checksums cover every rank's part."""

    from geomoe import checkpoint

    _torchrun(tmp_path / "a", "--async-save", "--save-every", "1", "--keep-last", "0", steps=2)
    for step in (1, 2):
        ckpt = str(tmp_path / "a" / f"ckpt_{step:08d}")
        files = json.load(open(os.path.join(ckpt, checkpoint.CHECKSUM_FILE)))["files"]
        assert {"model.safetensors", "train_state.pt", "dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp"} <= set(files)
        assert checkpoint.verify_checksums(ckpt) == f"{len(files)} files' checksums verified"


def test_format1_expert_parallel_checkpoint_resumes_exactly(tmp_path):
    """A checkpoint from before the DCP state, of an expert-parallel run (per-rank optimizer files
    numbered in the unsharded model's order, while the optimizer now holds each layer's experts after
    the rest of it), resumes to the uninterrupted run's weights, bit for bit. It used to be loaded
    with every moment on the wrong parameter, and the fused AdamW step segfaulted."""
    _torchrun(tmp_path / "a", "--expert-parallel")
    _torchrun(tmp_path / "b", "--stop-after", "2", "--expert-parallel")
    _to_format1(str(tmp_path / "b" / "ckpt_00000002"), world=2)
    resumed = _torchrun(tmp_path / "b", "--resume", "auto", "--expert-parallel")
    assert "resumed from" in resumed
    a, b = _weights(tmp_path / "a", 4), _weights(tmp_path / "b", 4)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_expert_parallel_trains_like_data_parallel(tmp_path):
    """Same data, seeds and masks: sharding the experts changes where they run, not the result."""
    _torchrun(tmp_path / "ddp", steps=3)
    _torchrun(tmp_path / "ep", "--expert-parallel", steps=3)
    a, b = _weights(tmp_path / "ddp", 3), _weights(tmp_path / "ep", 3)
    assert b["blocks3.0.mlp.w1"].shape[0] == 8  # the full set of experts, gathered from both ranks
    loss = lambda run: [json.loads(l)["loss"] for l in open(tmp_path / run / "metrics.jsonl")]
    assert loss("ep") == pytest.approx(loss("ddp"), rel=1e-6)
    # Adam turns last-bit differences of near-zero gradients into ~lr-sized steps: compare at 1e-4
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4, msg=lambda m: f"{k}: {m}")


def test_expert_parallel_run_saved_on_two_processes_resumes_on_one_and_on_four(tmp_path):
    """The training state is a DCP checkpoint: a run with --ep 2 and FSDP2 saved on 2 processes (global
    batch 2 x 4; each rank's experts written as shards of the global [E, ...] tensors) resumes on 1
    process (per-rank batch 8 from the checkpoint's global batch, no sharding) and on 4 (mesh dp 2 x
    ep 2, batch 2 per rank) with the uninterrupted run's global batches, masks and losses; the
    uninterrupted run is one process on the same global batch, so the 2-process steps before the save
    match it too. (DDP and FSDP checkpoints save their DCP state as get_state_dict gives it; the
    same-world resumes above read those.)"""
    import shutil

    _torchrun(tmp_path / "a", nproc=1, batch=8)
    _torchrun(tmp_path / "b", "--stop-after", "2", "--ep", "2", "--fsdp")
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    one = _torchrun(tmp_path / "b", "--resume", "auto", nproc=1, batch=None)
    four = _torchrun(tmp_path / "c", "--resume", "auto", "--ep", "2", "--fsdp", nproc=4, batch=None)
    assert "(saved by 2 processes, now 1)" in one and "batch 8 per rank" in one
    assert "(saved by 2 processes, now 4)" in four and "mesh dp 2 x ep 2" in four and "batch 2 per rank" in four
    rows = lambda run: [json.loads(l) for l in open(tmp_path / run / "metrics.jsonl")]
    a = [r["loss"] for r in rows("a")]
    for run, worlds in (("b", [2, 2, 1, 1]), ("c", [2, 2, 4, 4])):
        assert [r["world"] for r in rows(run)] == worlds
        assert [r["loss"] for r in rows(run)] == pytest.approx(a, rel=1e-4), run
    # Adam turns a last-bit sign flip of a near-zero gradient into a step of up to 2 x lr (2e-3) per
    # step, so single elements may differ by ~1e-2 after 4 steps; on average they agree closely
    wa = _weights(tmp_path / "a", 4)
    for run in ("b", "c"):
        w = _weights(tmp_path / run, 4)
        assert w.keys() == wa.keys() and w["blocks3.0.mlp.w1"].shape[0] == 8
        for k in wa:
            torch.testing.assert_close(w[k], wa[k], rtol=0, atol=1.2e-2, msg=lambda m: f"{run} {k}: {m}")
            assert float((w[k] - wa[k]).abs().mean()) < 1e-4, f"{run} {k}"


def test_ep_argument_errors(tmp_path):
    from geomoe.parallel import check_ep
    from geomoe.train import PretrainArgs, pretrain

    with pytest.raises(ValueError, match=r"'--ep' expected a divisor of the number of processes \(4\), got 3"):
        check_ep(3, 4, 8)
    check_ep(8, 8, 23)  # 7 x 3 + 2 experts
    with pytest.raises(
        ValueError, match=r"'--ep' expected a size that leaves every expert-parallel rank at least one of the model's 23"
    ):
        check_ep(16, 16, 23)  # blocks of 2: the 16th rank would have none
    with pytest.raises(ValueError, match=r"'--ep' expected an integer >= 1, got 0"):
        PretrainArgs(ep=0).validate()
    with pytest.raises(ValueError, match="'--expert-parallel' and '--ep' expected one at most"):
        PretrainArgs(ep=2, expert_parallel=True).validate()
    with pytest.raises(ValueError, match="'--ep' expected 1 in a one-process run"):
        pretrain(PretrainArgs(ep=2, steps=1, out=str(tmp_path / "run"), device="cpu"))
