"""Both encoders as the published dense-prediction backbones (segmentation and detection).

GeoMoE: the stage maps as they are, no final norm: stride 4 (256 channels), 8 (384), the stage-3
tokens as a stride-16 map (768) and a 2x2 max-pool of it (stride 32, 768).
MoE-ViT: the tokens (cls dropped) after blocks 3, 5, 7 and 11 as stride-16 maps through the
deconvolution pyramid (2 transposed convs with a channel LayerNorm + GELU between: stride 4; one:
stride 8; as is: 16; 2x2 max-pool: 32), 768 channels each.

No masking; the position table interpolated bicubically (align_corners=False) from the pretraining
grid to the input's; stochastic depth rising linearly over the blocks (GeoMoE's 2 + 2 + 11, the
MoE-ViT's 12) up to `drop_path_rate`; the expert biases frozen buffers (nothing here updates them).
forward(imgs) -> (the 4 maps, aux) with aux = 5e-6 x the sum of the MoE layers' load-balancing
losses, which the task adds to its loss with weight 1.

Input: H and W multiples of 16 (the token size) and at least 32 (the stride-32 level must have a
cell); the max-pool floors as published (an odd token grid loses its last row / column there)."""

from __future__ import annotations

import re
from typing import Any, Dict, List, NamedTuple, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from .. import checkpoint
from ..backbone import GeoMoEBackbone
from ..configs import CONFIGS, MODELS
from ..layer_decay import _one_dimensional_in_original
from ..model import PATCH
from ..moevit import MoEViTBackbone
from ..original import key_map, load_original_state_dict

AUX_WEIGHT = 5e-6
"""The published weight of the summed MoE load-balancing losses in the downstream task loss."""

Features = Tuple[Tensor, Tensor, Tensor, Tensor]


def check_dense_input(owner: str, imgs: Tensor, in_chans: int) -> None:
    if not isinstance(imgs, Tensor) or imgs.dim() != 4 or imgs.shape[1] != in_chans:
        got = list(imgs.shape) if isinstance(imgs, Tensor) else type(imgs).__name__
        raise ValueError(f"{owner}: argument 'imgs' expected a tensor [N, {in_chans}, H, W], got {got}")
    H, W = imgs.shape[2], imgs.shape[3]
    if H % PATCH or W % PATCH or H < 2 * PATCH or W < 2 * PATCH:
        raise ValueError(
            f"{owner}: argument 'imgs' expected H and W multiples of {PATCH} and at least {2 * PATCH} "
            f"(pyramid strides 4, 8, 16, 32), got {H} x {W}"
        )


class DenseGeoMoE(GeoMoEBackbone):
    """GeoMoE's published detection / segmentation backbone (module names as the encoder's)."""

    def __init__(self, aux_weight: float = AUX_WEIGHT, **kw):
        kw.pop("features_only", None)
        super().__init__(**kw)
        self.aux_weight = aux_weight

    def forward(self, imgs: Tensor) -> Tuple[Features, Tensor]:  # type: ignore[override]
        check_dense_input("DenseGeoMoE", imgs, self.in_chans)
        out = self.forward_features(imgs)
        c1, c2, c3, _ = out.features
        self.aux_loss = self.aux_weight * out.aux.sum()
        return (c1, c2, c3, F.max_pool2d(c3, 2)), self.aux_loss


class DenseMoEViT(MoEViTBackbone):
    """The MoE-ViT's published backbone: blocks (3, 5, 7, 11) through the deconvolution pyramid."""

    def forward(self, imgs: Tensor) -> Tuple[Features, Tensor]:  # type: ignore[override]
        check_dense_input("DenseMoEViT", imgs, self.in_chans)
        feats = super().forward(imgs)
        assert self.aux_loss is not None
        return feats, self.aux_loss

    @property
    def out_channels(self) -> Tuple[int, int, int, int]:
        return (self.embed_dim,) * 4


def build_backbone(
    model: str, config: str = "base", drop_path_rate: float = 0.1, backend: str = "auto", in_chans: int = 3
) -> nn.Module:
    """The published backbone of --model (geomoe | moevit) at --config's sizes, built at the
    pretraining size (its position table is interpolated to each input)."""
    if model not in MODELS:
        raise ValueError(f"argument '--model' expected one of {list(MODELS)}, got {model!r}")
    if config not in CONFIGS:
        raise ValueError(f"argument '--config' expected one of {sorted(CONFIGS)}, got {config!r}")
    preset = CONFIGS[config]["moevit" if model == "moevit" else "model"]
    cfg = {k: v for k, v in preset.items() if not k.startswith("decoder")}
    cfg["in_chans"] = in_chans
    if model == "moevit":
        depth = cfg.get("depth", 12)
        # the published levels: blocks 3, 5, 7, 11 of 12; a smaller preset takes the same fractions
        out = (3, 5, 7, 11) if depth == 12 else tuple(min(depth - 1, round(i * depth / 12)) for i in (3, 5, 7, 11))
        return DenseMoEViT(drop_path_rate=drop_path_rate, backend=backend, out_indices=out, **cfg)
    return DenseGeoMoE(drop_path_rate=drop_path_rate, backend=backend, **cfg)


# ---- layer-wise lr decay of the dense tasks ------------------------------------------------------

_GEOMOE_IDS = (
    (r"^(?:patch_embed1|pos_embed)(?:\.|$)", lambda m: 0),
    (r"^blocks1\.(\d+)\.", lambda m: 1 + int(m.group(1))),
    (r"^patch_embed2\.", lambda m: 3),
    (r"^blocks2\.(\d+)\.", lambda m: 4 + int(m.group(1))),
    (r"^patch_embed3\.", lambda m: 6),
    (r"^patch_embed4\.", lambda m: 7),
    (r"^blocks3\.(\d+)\.", lambda m: 8 + int(m.group(1))),
)
_MOEVIT_IDS = (
    (r"^patch_embed\.", lambda m: 0),
    (r"^blocks\.(\d+)\.", lambda m: 1 + int(m.group(1))),
)


def _num_layers(backbone: nn.Module) -> int:
    if isinstance(backbone, DenseMoEViT):
        return len(backbone.blocks) + 2  # 14 for 12 blocks
    return 5 + len(backbone.blocks3) + 4  # 20 for 2 + 2 + 11 (ids 0..7 before blocks3, one after)


def dense_layer_id(name: str, backbone: nn.Module) -> int:
    """The published dense-task layer id of a parameter named inside `backbone`.
    GeoMoE (N = 20): patch_embed1, pos_embed -> 0; blocks1.i -> 1 + i; patch_embed2 -> 3; blocks2.i
    -> 4 + i; patch_embed3 -> 6; patch_embed4 -> 7; blocks3.i -> 8 + i; else -> 19.
    MoE-ViT (N = 14): patch_embed -> 0; blocks.i -> 1 + i; else (cls_token, fpn1, fpn2) -> 13."""
    rules = _MOEVIT_IDS if isinstance(backbone, DenseMoEViT) else _GEOMOE_IDS
    for pattern, rule in rules:
        m = re.search(pattern, name)
        if m:
            return rule(m)
    return _num_layers(backbone) - 1


def dense_param_groups(
    model: nn.Module, backbone: nn.Module, base_lr: float, weight_decay: float = 0.05, layer_decay: float = 0.85
) -> List[Dict[str, Any]]:
    """AdamW groups of a segmenter / detector (`model`, holding `backbone`) as the published
    optimiser constructor makes them: lr scale layer_decay^(N - 1 - id) by `dense_layer_id`
    (everything outside the backbone the last id, scale 1); weight decay 0 on one-dimensional
    parameters and biases (the stacked expert biases count as biases); frozen tensors left out."""
    if not any(m is backbone for m in model.modules()):
        raise ValueError("argument 'backbone' expected a module inside 'model'")
    inside = {id(p): n for n, p in backbone.named_parameters()}
    N = _num_layers(backbone)
    biases = _one_dimensional_in_original(model)
    groups: Dict[Tuple[int, bool], Dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = dense_layer_id(inside[id(p)], backbone) if id(p) in inside else N - 1
        decay = not (p.ndim == 1 or name.endswith(".bias") or id(p) in biases)
        scale = layer_decay ** (N - 1 - lid)
        g = groups.setdefault(
            (lid, decay),
            dict(
                params=[], names=[], layer_id=lid, lr_scale=scale, lr=base_lr * scale, weight_decay=weight_decay if decay else 0.0
            ),
        )
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]


# ---- weights -------------------------------------------------------------------------------------


class WeightsReport(NamedTuple):
    path: str
    layout: str  # "geomoe layout" or "original layout"
    loaded: int
    missing: List[str]  # backbone tensors the file lacks (left at their initial values)
    unexpected: List[str]  # tensors of the file the backbone does not have
    new_layers: List[str]  # tensors the pretraining never had (the MoE-ViT's fpn1 / fpn2): expected missing

    def describe(self) -> str:
        s = f"loaded {self.loaded} backbone tensors from {self.path} ({self.layout})"
        if self.new_layers:
            s += f"; {len(self.new_layers)} tensors new to the dense task (initialised): {', '.join(self.new_layers)}"
        if self.missing:
            s += f"; MISSING, left at their initial values: {', '.join(self.missing)}"
        if self.unexpected:
            s += f"; unexpected, not used: {', '.join(self.unexpected)}"
        return s


_PRETRAIN_ONLY = ("decoder", "mask_token", "stage1_output_decode", "stage2_output_decode", "norm.", "fc_norm.", "head.")
_NEW_LAYERS = ("fpn1.", "fpn2.", "fpn3.", "fpn4.")


def _unwrap(tensors: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """A segment / finetune checkpoint holds the backbone under 'backbone.' (and maybe a head)."""
    if any(k.startswith("backbone.") for k in tensors):
        return {k[len("backbone.") :]: v for k, v in tensors.items() if k.startswith("backbone.")}
    return tensors


def load_backbone_weights(backbone: nn.Module, path: str, strict: bool = True, flag: str = "--weights") -> WeightsReport:
    """Load released pretraining weights (original layout, bare or under 'model'; .pth / .pt /
    .safetensors), a `geomoe pretrain` / `finetune` / `segment` checkpoint (directory or
    model.safetensors) into a dense backbone, by name, no renames. Every missing and unexpected key
    is in the report; the pretraining-only tensors (decoder, mask token, final norm, a
    classification head) are skipped silently, and the MoE-ViT's fpn1 / fpn2 are expected to be
    new. The position table: GeoMoE's is loaded at its pretraining grid and interpolated per input;
    the MoE-ViT's is recomputed (a file's is ignored). strict: a missing or unexpected tensor is a
    ValueError naming every one. A shape that does not match is always an error."""
    path, tensors = checkpoint.read_weights(path, flag)
    tensors = _unwrap(tensors)
    recomputed = set(getattr(backbone, "ORIGINAL_KEYS_RECOMPUTED", ()))
    tensors = {k: v for k, v in tensors.items() if k not in recomputed and not k.startswith(_PRETRAIN_ONLY)}
    own = backbone.state_dict()
    original = key_map(backbone)
    new_layers = sorted(k for k in own if k.startswith(_NEW_LAYERS))
    ours = not any(k in original and k not in own for k in tensors)
    if ours:
        layout = "geomoe layout"
        want = {k for k in own if k not in recomputed}
    else:
        layout = "original layout"
        want = {k for k in original if k not in recomputed}
    new_layers = [k for k in new_layers if k not in tensors]
    missing = sorted(k for k in want if k not in tensors and not k.startswith(_NEW_LAYERS))
    unexpected = sorted(k for k in tensors if k not in want)
    if strict and (missing or unexpected):
        raise ValueError(
            f"argument '{flag}' expected weights for every backbone tensor, got {path} ({layout})"
            + (f"; missing: {', '.join(missing)}" if missing else "")
            + (f"; unexpected: {', '.join(unexpected)}" if unexpected else "")
        )
    if ours:
        for k in sorted(set(own) & set(tensors)):
            if tuple(own[k].shape) != tuple(tensors[k].shape):
                raise ValueError(
                    f"argument '{flag}': tensor '{k}' in {path} expected shape {list(own[k].shape)}, got {list(tensors[k].shape)}"
                )
        backbone.load_state_dict({k: v for k, v in tensors.items() if k in own}, strict=False)
        loaded = len([k for k in tensors if k in own])
    else:
        try:
            load_original_state_dict(backbone, {k: v for k, v in tensors.items() if k in original})
        except ValueError as exc:
            raise ValueError(f"argument '{flag}': {path}: {exc}") from exc
        loaded = len([k for k in tensors if k in original])
    return WeightsReport(path, layout, loaded, missing, unexpected, new_layers)
