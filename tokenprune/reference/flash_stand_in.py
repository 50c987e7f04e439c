"""FlashAttention-2's calling convention on the CPU, computed exactly: a stand-in for the kernel GPU users run.

Hugging Face models run FlashAttention-2 through transformers' own ``flash_attention_forward``: the mask the model
builds is 2-D (a padding mask over the keys, or None when nothing is padded), a padded batch is unpadded into one
ragged sequence and attended with the *varlen* kernel (``cu_seqlens``), a batch of one whose position ids are not
one increasing run is taken as packed sequences (varlen again, split where the position restarts), and the causal
mask is aligned to the bottom right (the last query sees every key). :func:`register` puts that whole route — the
attention function and the mask function transformers register for ``flash_attention_2`` — under a name of its
own, with the two kernels (``flash_attn_func``, ``flash_attn_varlen_func``) replaced by the same arithmetic done in
float32 on any device (:func:`flash_attn_func`, :func:`flash_attn_varlen_func`). Everything transformers does
around the kernel is its own code; only the kernel is ours.

>>> name = register()                           # "tokenprune_flash_cpu"
>>> model = tiny_llava(name)                    # or model.set_attn_implementation(name)

``register(name)`` with a name without "flash" gives the same convention under a name transformers does not
recognise as FlashAttention, which is how tokenprune is checked to detect the convention and not the name.
"""

from __future__ import annotations

import torch

#: The stand-in's default name (transformers treats an implementation whose name holds "flash" as FlashAttention).
NAME = "tokenprune_flash_cpu"
_registered: set[str] = set()


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, causal: bool,
            window: tuple[int, int], softcap: float) -> torch.Tensor:
    """One sequence: q (Sq, H, D), k/v (Sk, Hk, D) -> (Sq, H, D), as FlashAttention-2 defines it: causal aligned to
    the bottom right (query i stands at key position Sk - Sq + i), a window (left, right) around that position
    (-1: unbounded), logits soft-capped by ``softcap`` (> 0), heads grouped over the key heads; a query that may
    see no key gives zeros."""
    sq, h, d = q.shape
    sk, hk = k.shape[0], k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    qf = q.float().transpose(0, 1)  # (H, Sq, D)
    kf = k.float().transpose(0, 1).repeat_interleave(h // hk, dim=0)
    vf = v.float().transpose(0, 1).repeat_interleave(h // hk, dim=0)
    logits = qf @ kf.transpose(1, 2) * scale  # (H, Sq, Sk)
    if softcap and softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    pos = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
    key = torch.arange(sk, device=q.device)[None, :]
    allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if causal:
        allowed &= key <= pos
    left, right = window
    if left >= 0:
        allowed &= key >= pos - left
    if right >= 0 and not causal:
        allowed &= key <= pos + right
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a row with no visible key: zeros, as the kernel gives
    return (probs @ vf).transpose(0, 1).to(q.dtype)


def flash_attn_func(q, k, v, dropout_p: float = 0.0, softmax_scale: float | None = None, causal: bool = False,
                    window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0, deterministic: bool = False):
    """``flash_attn.flash_attn_func``: q (B, Sq, H, D), k/v (B, Sk, Hk, D), every sample the same lengths."""
    if dropout_p:
        raise ValueError("the FlashAttention stand-in computes inference only (dropout_p must be 0)")
    return torch.stack([_attend(q[b], k[b], v[b], softmax_scale, causal, tuple(window_size), softcap)
                        for b in range(q.shape[0])])


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                           dropout_p: float = 0.0, softmax_scale: float | None = None, causal: bool = False,
                           window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                           deterministic: bool = False):
    """``flash_attn.flash_attn_varlen_func``: q (total_q, H, D), k/v (total_k, Hk, D), sequence i at rows
    ``cu_seqlens[i]:cu_seqlens[i + 1]`` of each."""
    if dropout_p:
        raise ValueError("the FlashAttention stand-in computes inference only (dropout_p must be 0)")
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    out = torch.zeros_like(q)
    for i in range(len(cq) - 1):
        if cq[i + 1] > cq[i]:
            out[cq[i]:cq[i + 1]] = _attend(q[cq[i]:cq[i + 1]], k[ck[i]:ck[i + 1]], v[ck[i]:ck[i + 1]], softmax_scale,
                                           causal, tuple(window_size), softcap)
    return out


def _use_stand_in(name: str) -> None:
    """Make transformers' FlashAttention route find the stand-in's kernels for ``name`` (it loads kernels by
    implementation name, once, into module globals: a real FlashAttention loaded since is replaced again)."""
    import transformers.modeling_flash_attention_utils as fa

    if fa._loaded_implementation == name:
        return
    fa._flash_fn, fa._flash_varlen_fn, fa._flash_with_kvcache_fn = flash_attn_func, flash_attn_varlen_func, None
    fa._pad_fn, fa._unpad_fn = fa._pad_input, fa._unpad_input
    fa._process_flash_kwargs_fn = fa._lazy_define_process_function(flash_attn_varlen_func)
    fa._process_with_kvcache_kwargs_fn = dict
    fa._loaded_implementation = name


def register(name: str = NAME) -> str:
    """Register the stand-in under ``name`` with transformers' attention and attention-mask interfaces (the mask
    function is transformers' own for FlashAttention: 2-D or None); returns ``name``, for
    ``attn_implementation=``. Call it again before building a model with ``name`` when another FlashAttention
    implementation was loaded in between."""
    from transformers import AttentionInterface
    from transformers.integrations.flash_attention import flash_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    if name not in _registered:
        def attention(module, query, key, value, attention_mask, **kwargs):
            _use_stand_in(name)
            return flash_attention_forward(module, query, key, value, attention_mask, **kwargs)

        attention.__name__ = f"flash_stand_in_{name}"
        AttentionInterface.register(name, attention)
        AttentionMaskInterface.register(name, flash_attention_mask)
        _registered.add(name)
    _use_stand_in(name)  # a model built with a "flash" name loads its kernels when it is built
    return name
