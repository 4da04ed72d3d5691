"""A faithful copy of the published GeoMoE computation, written from the model facts in docs/model.md in
the original code's structure: dense masked front end (Conv2d blocks, the mask multiplied in before each
depthwise conv), a per-expert nn.Linear MoE with the published loop (argsort of the expert ids,
split by the counts fetched to the host, one Linear pair per expert, index_add_ combine), and the
cross-attention decoder. Its state dict is in the original key layout.

It is the baseline the benchmarks measure against and, in tests, the reference that our GeoMoE must
match in loss and gradients after load_original_state_dict."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from geomoe.pos_embed import sincos_2d


class PatchEmbed(nn.Module):
    def __init__(self, in_chans, dim, stride):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, stride, stride)
        self.norm = nn.LayerNorm(dim)
        self.act = nn.GELU()

    def forward(self, x):
        x = self.proj(x)
        return self.act(self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


class CMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Conv2d(dim, hidden, 1), nn.GELU(), nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CBlock(nn.Module):
    def __init__(self, dim, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = CMlp(dim, int(dim * mlp_ratio))

    def forward(self, x, mask=None):
        h = self.conv1(self.norm1(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        if mask is not None:
            h = mask * h
        x = x + self.conv2(self.attn(h))
        return x + self.mlp(self.norm2(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class MoE(nn.Module):
    def __init__(self, dim, hidden, num_experts=23, top_k=3):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.gate = nn.Linear(dim, num_experts)
        self.unique_experts = nn.ModuleList(Mlp(dim, hidden) for _ in range(num_experts))
        self.share_experts = Mlp(dim, hidden)
        self.register_buffer("bias", torch.zeros(num_experts))

    def forward(self, x):
        B, L, C = x.shape
        flat = x.reshape(-1, C)
        T = flat.shape[0]
        acc = torch.promote_types(x.dtype, torch.float32)  # float32 under fp16 autocast, float64 in checks
        with torch.autocast(device_type=x.device.type, enabled=False):
            scores = torch.sigmoid(F.linear(flat.to(acc), self.gate.weight.to(acc), self.gate.bias.to(acc)))
        ids = torch.topk(scores + self.bias, self.top_k, dim=-1).indices
        w = scores.gather(1, ids)
        w = w / w.sum(-1, keepdim=True)
        flat_ids = ids.reshape(-1)
        order = torch.argsort(flat_ids)
        load = torch.bincount(flat_ids, minlength=self.num_experts)
        token_of = order // self.top_k
        y = torch.zeros(T, C, dtype=acc, device=x.device)
        start = 0
        for e, n in enumerate(load.tolist()):  # the host sync of the published loop
            if n:
                rows = order[start : start + n]
                out = self.unique_experts[e](flat[token_of[start : start + n]])
                y.index_add_(0, token_of[start : start + n], w.reshape(-1)[rows, None] * out.to(acc))
            start += n
        y = (y + self.share_experts(flat).to(acc)).to(x.dtype)
        P = (scores / scores.sum(-1, keepdim=True)).mean(0)
        aux = (P * self.num_experts * load.to(acc) / (self.top_k * T)).sum()
        return y.view(B, L, C), aux, load


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, L, C = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q * (C // self.heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, L, C))


class Block(nn.Module):
    def __init__(self, dim, heads, hidden, num_experts, top_k):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), MoE(dim, hidden, num_experts, top_k)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        y, aux, load = self.mlp(self.norm2(x))
        return x + y, aux, load


class CrossAttention(nn.Module):
    def __init__(self, dim, context_dim, heads):
        super().__init__()
        self.heads = heads
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(context_dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x, y):
        B, L, C = x.shape
        H = self.heads
        q = self.q(x).reshape(B, L, H, C // H).transpose(1, 2)
        k, v = self.kv(y).reshape(B, y.shape[1], 2, H, C // H).permute(2, 0, 3, 1, 4)
        attn = ((q * (C // H) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, L, C))


class DecoderBlock(nn.Module):
    def __init__(self, dim, context_dim, heads, mlp_ratio):
        super().__init__()
        self.norm1, self.cross_attn = nn.LayerNorm(dim, eps=1e-6), CrossAttention(dim, context_dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, y):
        x = x + self.cross_attn(self.norm1(x), y)
        return x + self.mlp(self.norm2(x))


class PublishedGeoMoE(nn.Module):
    def __init__(
        self,
        img_size=224,
        embed_dim=(256, 384, 768),
        depth=(2, 2, 11),
        num_heads=12,
        mlp_ratio=4.0,
        moe_mlp_ratio=0.75,
        num_experts=23,
        top_k=3,
        decoder_embed_dim=512,
        decoder_depth=8,
        decoder_num_heads=16,
    ):
        super().__init__()
        e1, e2, e3 = embed_dim
        self.grid = img_size // 16
        self.patch_embed1, self.patch_embed2, self.patch_embed3 = (
            PatchEmbed(3, e1, 4),
            PatchEmbed(e1, e2, 2),
            PatchEmbed(e2, e3, 2),
        )
        self.patch_embed4 = nn.Linear(e3, e3)
        self.stage1_output_decode = nn.Conv2d(e1, e3, 4, stride=4)
        self.stage2_output_decode = nn.Conv2d(e2, e3, 2, stride=2)
        self.pos_embed = nn.Parameter(sincos_2d(e3, self.grid, self.grid)[None], requires_grad=False)
        self.blocks1 = nn.ModuleList(CBlock(e1, mlp_ratio) for _ in range(depth[0]))
        self.blocks2 = nn.ModuleList(CBlock(e2, mlp_ratio) for _ in range(depth[1]))
        self.blocks3 = nn.ModuleList(Block(e3, num_heads, int(e3 * moe_mlp_ratio), num_experts, top_k) for _ in range(depth[2]))
        self.norm = nn.LayerNorm(e3, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(sincos_2d(decoder_embed_dim, self.grid, self.grid)[None], requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            DecoderBlock(decoder_embed_dim, e3, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, 16 * 16 * 3)

    def forward(self, imgs, mask_ratio=0.75, kept_mask_ratio=0.25, noise=None):
        N, G = imgs.shape[0], self.grid
        L = G * G
        if noise is None:
            noise = torch.rand(N, L, device=imgs.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        len_keep = int(L * (1 - mask_ratio))
        ids_keep = ids_shuffle[:, :len_keep]
        ids_build = torch.sort(ids_shuffle[:, L - int(L * kept_mask_ratio) :], dim=1).values
        mask = torch.ones(N, L, device=imgs.device)
        mask.scatter_(1, ids_keep, 0)  # 0 = kept
        vis = (1 - mask).reshape(N, 1, G, G)
        vis1 = vis.repeat_interleave(4, 2).repeat_interleave(4, 3).to(imgs.dtype)
        vis2 = vis.repeat_interleave(2, 2).repeat_interleave(2, 3).to(imgs.dtype)

        x = self.patch_embed1(imgs)
        for blk in self.blocks1:
            x = blk(x, vis1)
        s1 = self.stage1_output_decode(x).flatten(2).permute(0, 2, 1)
        x = self.patch_embed2(x)
        for blk in self.blocks2:
            x = blk(x, vis2)
        s2 = self.stage2_output_decode(x).flatten(2).permute(0, 2, 1)
        x = self.patch_embed3(x).flatten(2).permute(0, 2, 1)
        x = self.patch_embed4(x) + self.pos_embed
        keep = ids_keep[:, :, None]
        x = torch.gather(x, 1, keep.expand(-1, -1, x.shape[-1]))
        s1 = torch.gather(s1, 1, keep.expand(-1, -1, s1.shape[-1]))
        s2 = torch.gather(s2, 1, keep.expand(-1, -1, s2.shape[-1]))
        auxes, loads = [], []
        for blk in self.blocks3:
            x, aux, load = blk(x)
            auxes.append(aux)
            loads.append(load)
        latent = self.norm(x + s1 + s2)

        pos = torch.gather(
            self.decoder_pos_embed.expand(N, -1, -1), 1, ids_build[:, :, None].expand(-1, -1, self.mask_token.shape[-1])
        )
        q = self.mask_token + pos
        for blk in self.decoder_blocks:
            q = blk(q, latent)
        pred = self.decoder_pred(self.decoder_norm(q))

        p = 16
        target = imgs.reshape(N, 3, G, p, G, p)
        target = torch.einsum("nchpwq->nhwpqc", target).reshape(N, L, p * p * 3)
        target = torch.gather(target, 1, ids_build[:, :, None].expand(-1, -1, target.shape[-1]))
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(-1).mean()
        return loss, torch.stack(auxes), torch.stack(loads)
