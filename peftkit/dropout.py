"""Dropout masks that are cheap on a CPU: a counter-based hash instead of torch's one-thread Bernoulli sampler.

Why: torch's CPU `bernoulli_` draws about 7 ns per element on a single thread. A LoRA step on MiniLM draws 32 masks
(the model's own 0.1 dropouts, LoRA's dropout on its inputs and the attention probabilities) and spent 22% of its
time there (benchmarks/results/speed.md). Here a mask comes from a hash of (seed, element index) made with a few
vectorised integer ops on every core: the same Bernoulli(1 - p) keep per element, independent across elements
(tests/test_dropout.py checks rate, independence and gradients) and cheaper: a LoRA step on sst2
went from 126 to 105 ms (`benchmarks/profile_step.py`, modes after-torch-dropout and after).

Reproducible: each mask's seed is drawn from torch's default generator, so `train.seed` fixes the masks, an exact
resume restores them (the checkpoint carries the generator state), and gradient checkpointing's recompute, which
replays the generator, draws the same masks. CUDA keeps torch's own dropout (fused and fast there).

`train.dropout_rng: hash` (the default) turns it on for a CPU run; `torch` keeps stock nn.Dropout.
"""

from __future__ import annotations

import struct

import torch
from torch import nn

_MUL1, _MUL2 = 0x7FEB352D, 0x846CA68B - 2**32  # lowbias32's odd multipliers, as signed 32-bit integers
_hashed_indices: dict[torch.device, torch.Tensor] = {}  # lowbias32(0..n-1), grown on demand


def _lowbias32_(h: torch.Tensor) -> torch.Tensor:
    """Chris Wellons' lowbias32 integer hash, in place on int32 (logical shifts by masking the sign bits)."""
    h ^= (h >> 16) & 0xFFFF
    h *= _MUL1
    h ^= (h >> 15) & 0x1FFFF
    h *= _MUL2
    h ^= (h >> 16) & 0xFFFF
    return h


def _lowbias32(value: int) -> int:
    """The same hash on one Python integer, returned as a signed 32-bit value."""
    value &= 0xFFFFFFFF
    value ^= value >> 16
    value = (value * 0x7FEB352D) & 0xFFFFFFFF
    value ^= value >> 15
    value = (value * 0x846CA68B) & 0xFFFFFFFF
    value ^= value >> 16
    return value - 2**32 if value >= 2**31 else value


CHUNK = 1 << 22  # elements per pass: the cached hashed index never grows past 16 MB, whatever the model


def _hashed_index(count: int, device: torch.device) -> torch.Tensor:
    cached = _hashed_indices.get(device)
    if cached is None or cached.numel() < count:
        size = min(CHUNK, max(count, 2 * cached.numel() if cached is not None else 0))
        cached = _hashed_indices[device] = _lowbias32_(torch.arange(size, dtype=torch.int32, device=device))
    return cached[:count]


def scaled_keep_mask(shape: torch.Size | tuple[int, ...], p: float, seed: int, device: torch.device) -> torch.Tensor:
    """float32 mask: 1 / (1 - p) with probability 1 - p per element, else 0; a function of `seed` only.

    Per element: h = mix(hash(index) ^ hash(seed)), one multiply and one xorshift on the cached hashed index, so two
    seeds give unrelated masks; kept where its low 31 bits are >= p * 2^31. The float comes straight from the bits
    (an arithmetic shift turns the comparison into all-ones or zero, and-ed with the bits of the scale), because
    bool tensors are slow on the CPU: 10 integer kernels in all, 9 of them in place. Masks larger than CHUNK
    are made chunk by chunk, each chunk with its own seed."""
    numel = 1
    for size in shape:
        numel *= size
    out = torch.empty(numel, dtype=torch.int32, device=device)
    threshold = round(p * 2**31)
    scale_bits = struct.unpack("<i", struct.pack("<f", 1.0 / (1.0 - p)))[0]  # the float32 scale's bit pattern
    for start in range(0, numel, CHUNK):
        count = min(CHUNK, numel - start)
        h = torch.bitwise_xor(_hashed_index(count, device), _lowbias32(seed + start), out=out[start : start + count])
        h *= _MUL1
        h ^= (h >> 16) & 0xFFFF
        h &= 0x7FFFFFFF
        h -= threshold
        h >>= 31  # -1 where dropped (below the threshold), 0 where kept
        h ^= -1
        h &= scale_bits
    return out.view(torch.float32).view(shape)


class _HashDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
        mask = scaled_keep_mask(x.shape, p, seed, x.device).to(x.dtype)
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None


def hash_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`nn.functional.dropout(x, p, training)` with a hash mask on CPU tensors (torch's own elsewhere)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return nn.functional.dropout(x, p, training)
    seed = int(torch.randint(-(2**31), 2**31 - 1, (1,), dtype=torch.int64))  # from the default generator
    return _HashDropout.apply(x, p, seed)


class HashDropout(nn.Dropout):
    """nn.Dropout drawing its mask with `hash_dropout`. Same parameters (none), same p, same eval behaviour."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return hash_dropout(x, self.p, self.training)


def hash_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' sdpa attention, except that in training the probabilities' dropout uses `hash_dropout`.

    torch's CPU SDPA has no fused kernel for dropout > 0 and falls back to its math path anyway (scores, softmax,
    Bernoulli mask, product); this is that path with the cheap mask. Any other case is the stock function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain = kwargs.get("position_bias") is None and kwargs.get("softcap") is None
    if not (module.training and dropout > 0 and query.device.type == "cpu" and plain):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    return math_attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs)


def math_attention(module, query, key, value, attention_mask, dropout: float, scaling=None, **kwargs):
    """SDPA's math path (scores, mask, softmax, dropout, product) with `hash_dropout` on the probabilities."""
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q_len = query.shape[2]
    is_causal = kwargs.get("is_causal")  # as sdpa_attention_forward decides it
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if q_len > 1 and attention_mask is None and is_causal:  # SDPA's is_causal: top-left aligned, keys cut to q_len
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        attention_mask = torch.ones(q_len, q_len, dtype=torch.bool, device=query.device).tril()
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(hash_dropout(probs, dropout), value)
    return output.transpose(1, 2).contiguous(), None


HASH_SDPA = "peftkit_hash_sdpa"


def attention_keeps_torch_dropout(model: nn.Module) -> list[str]:
    """The sdpa model classes inside `model` whose attention `use_hash_dropout` leaves alone (torch's dropout).

    Their own code branches on the attention implementation's name instead of calling transformers' attention
    interface: Falcon runs SDPA only while `_attn_implementation == "sdpa"`, else an eager path that adds the
    boolean padding mask to the scores (so pads are attended and a row's logits depend on its batch). transformers
    marks the classes that route attention and masks through its interface with `_supports_attention_backend`."""
    sdpa = [m for m in _pretrained_parts(model) if getattr(m.config, "_attn_implementation", None) == "sdpa"]
    return sorted({type(m).__name__ for m in sdpa if not type(m)._supports_attention_backend})


def _pretrained_parts(model: nn.Module) -> list[nn.Module]:
    """The transformers models inside `model` (a peft wrapper, a classification model and its body), which own the
    attention settings."""
    from transformers import PreTrainedModel

    return [m for m in model.modules() if isinstance(m, PreTrainedModel)]


def use_hash_dropout(model: nn.Module) -> int:
    """Make every nn.Dropout of `model`, and its sdpa attention, draw hash masks; returns how many modules switched.

    For the model a training run builds and throws away: dropout modules hold no state, so a class swap keeps hooks
    and references intact, and the attention setting is a config field transformers never saves with a model.
    An eager-attention model keeps its own attention path (its other dropouts still switch), and so does a model
    whose code checks the implementation's name (`attention_keeps_torch_dropout`)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(HASH_SDPA, hash_sdpa_attention)
    AttentionMaskInterface.register(HASH_SDPA, sdpa_mask)  # the same masks as sdpa (else: no padding mask at all)
    switched = [m for m in model.modules() if type(m) is nn.Dropout]
    for m in switched:
        m.__class__ = HashDropout
    owners = _pretrained_parts(model)
    unsupported = {id(m.config) for m in owners if not type(m)._supports_attention_backend}  # a shared config too
    for config in {id(m.config): m.config for m in owners}.values():
        if getattr(config, "_attn_implementation", None) == "sdpa" and id(config) not in unsupported:
            config._attn_implementation = HASH_SDPA
    return len(switched)
