"""What autograd keeps for backward: the bytes of the distinct storages saved while fn runs,
parameters not counted (they are not activations). A device-independent view of activation memory."""

import torch


def bytes_saved_for_backward(fn, params) -> int:
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    kept = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in param_storages:
            kept[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(kept.values())
