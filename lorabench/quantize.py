"""A 4-bit or 8-bit frozen base: QLoRA's memory saving as a run option for any additive variant.

QLoRA (Dettmers, Pagnoni, Holtzman, Zettlemoyer 2023, arXiv:2305.14314) stores the frozen
pretrained weights in 4-bit NormalFloat (NF4, with double quantization of the block
scales) and trains a LoRA adapter in 16/32-bit on top; gradients flow through the
dequantized weights into the adapter. ``quantize_base: nf4`` (or ``int8``, LLM.int8(),
Dettmers et al. 2022, arXiv:2208.07339) puts every linear layer of the base, outside the
task and LM heads, into bitsandbytes' layers before the variant attaches its hooks; the
variant's tensors stay in the model's precision. The adapter file is the same as on a
full-precision base, so it loads (and merges) onto the unquantized checkpoint.

bitsandbytes runs these layers on CPU (slowly: they dequantize at every call) and on CUDA.
"""

from __future__ import annotations

import torch
from torch import nn

FORMATS = ("none", "nf4", "int8")
NF4_BLOCK_SIZE = 64  # QLoRA's block size for the first quantization (its section 3)


class QuantizeError(ValueError):
    """A base that cannot be quantized as asked (format, missing package)."""


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError as error:
        raise QuantizeError(f"quantize_base needs bitsandbytes ({error}); pip install 'lorabench[bnb]'") from error
    return bitsandbytes


def quantized_copy(layer: nn.Linear, fmt: str) -> nn.Linear:
    """The bitsandbytes layer holding ``layer``'s weight in ``fmt``; the bias stays full-precision."""
    bnb = _bitsandbytes()
    device, dtype = layer.weight.device, layer.weight.dtype
    weight = layer.weight.detach().cpu()
    if fmt == "nf4":
        quantized = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                      compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
        quantized.weight = bnb.nn.Params4bit(weight, requires_grad=False, blocksize=NF4_BLOCK_SIZE,
                                             compress_statistics=True, quant_type="nf4")
        # bitsandbytes repacks the weight for a CPU inference kernel at the first eval-mode call,
        # for good; that kernel has no backward, so training after an evaluation would break.
        quantized.support_avx512bf16_for_cpu = False
    elif fmt == "int8":
        quantized = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                        has_fp16_weights=False, threshold=6.0)
        quantized.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        raise QuantizeError(f"quantize_base={fmt!r}: use one of {', '.join(FORMATS)}")
    if layer.bias is not None:
        quantized.bias = nn.Parameter(layer.bias.detach().cpu().clone(), requires_grad=False)
    return quantized.to(device)  # moving a bitsandbytes layer is what quantizes its weight


def nf4_roundtrip(weight: torch.Tensor) -> torch.Tensor:
    """dequant(NF4(``weight``)): the matrix an NF4 base computes with in place of ``weight``, from
    the same bitsandbytes layer ``quantize_base`` builds (its output equals x @ this^T exactly)."""
    bnb = _bitsandbytes()
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
    quantized = quantized_copy(layer, "nf4").weight
    return bnb.functional.dequantize_4bit(quantized.data, quantized.quant_state).to(weight.device, torch.float32)


def quantize_base(model: nn.Module, fmt: str) -> list[str]:
    """Replace every base linear layer by its quantized copy, in place; the names replaced.

    The layers are those ``targets: all-linear`` adapts, so task heads and the LM head keep
    full precision, as in QLoRA.
    """
    from lorabench.adapters import find_targets

    if fmt not in FORMATS:
        raise QuantizeError(f"quantize_base={fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "none":
        return []
    if hasattr(model, "lorabench_attachment"):
        raise QuantizeError("quantize the base before attaching an adapter, not after")
    layers = find_targets(model, "all-linear")
    for layer_name, layer in layers.items():
        parent_name, _, child = layer_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, quantized_copy(layer, fmt))
    return list(layers)


def is_quantized(layer: nn.Module) -> bool:
    weight = getattr(layer, "weight", None)
    return weight is not None and not weight.is_floating_point()


def require_bitsandbytes(what: str) -> None:
    """Refuse ``what`` before a run starts when bitsandbytes is missing, rather than after training."""
    try:
        _bitsandbytes()
    except QuantizeError as error:
        raise QuantizeError(f"{what}: {error}") from error
