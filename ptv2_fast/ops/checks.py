"""Input validation for prefix attention: every bad input becomes a clear exception naming the argument.

Messages are built only on failure (lambdas), so that torch.compile does not specialise on the sizes
they mention.
"""

from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
_INT_DTYPES = (torch.int32, torch.int64)


def _need(cond: bool, msg, exc=ValueError):
    if not cond:
        raise exc(msg())


def _check_int_vector(name: str, x, n: int, n_name: str, device):
    if x is None:
        return
    _need(isinstance(x, torch.Tensor), lambda: f"{name} must be a torch.Tensor or None, got {type(x).__name__}",
          TypeError)
    _need(x.dtype in _INT_DTYPES, lambda: f"{name} must be int32 or int64, got {x.dtype}", TypeError)
    _need(x.dim() == 1 and x.shape[0] == n,
          lambda: f"{name} must have shape [{n_name}] = [{n}], got {list(x.shape)}")
    _need(x.device == device, lambda: f"{name} is on {x.device} but q is on {device}")


_Tensor = torch.Tensor
_FLOAT_DTYPES = frozenset(SUPPORTED_DTYPES)
_INT_DTYPE_SET = frozenset(_INT_DTYPES)


def _vec_ok(x, n: int, device) -> bool:
    return x is None or (type(x) is _Tensor and x.dtype in _INT_DTYPE_SET and x.dim() == 1 and x.shape[0] == n
                         and x.device == device)


def shapes_ok(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask, dropout_p,
              scale) -> bool:
    """True when every static check of ``check_shapes`` passes: the cheap path of a valid call (one
    expression, a few attribute reads; no message is built). False says: run ``check_shapes`` for the error."""
    try:
        qs, ks, pks = q.shape, k.shape, prefix_k.shape
        dev, dt = q.device, q.dtype
        if not (len(qs) == 4 and len(ks) == 4 and len(pks) == 4 and v.shape == ks and prefix_v.shape == pks
                and dt in _FLOAT_DTYPES and k.dtype is dt and v.dtype is dt and prefix_k.dtype is dt
                and prefix_v.dtype is dt and k.device == dev and v.device == dev and prefix_k.device == dev
                and prefix_v.device == dev):
            return False
        B, Hq, _, D = qs
        _, Hkv, S, _ = ks
        T = pks[0]
        if not (MIN_HEAD_DIM <= D <= MAX_HEAD_DIM and ks[0] == B and ks[3] == D and Hkv > 0 and Hq % Hkv == 0
                and pks[1] == Hkv and pks[3] == D and T >= 1 and (prefix_index is not None or T == 1)
                and _vec_ok(prefix_index, B, dev) and _vec_ok(prefix_lens, T, dev) and _vec_ok(kv_lens, B, dev)
                and type(dropout_p) is float and 0.0 <= dropout_p < 1.0
                and (scale is None or (type(scale) is float and 0.0 < scale < float("inf")))):
            return False
        if key_padding_mask is not None:
            kpm = key_padding_mask
            return (kv_lens is None and type(kpm) is _Tensor and kpm.dtype is torch.bool and kpm.dim() == 2
                    and kpm.shape[0] == B and kpm.shape[1] == S and kpm.device == dev)
        return True
    except (AttributeError, TypeError, ValueError):  # non-tensors and other oddities: the slow path says what
        return False


def check_shapes(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask,
                 dropout_p: float, scale) -> None:
    """Static checks (no device sync): types, ranks, shapes, dtypes, devices, head dim, dropout_p, scale.

    A valid call costs one ``shapes_ok`` expression; the detailed checks below run only to name what is wrong."""
    if shapes_ok(q, k, v, prefix_k, prefix_v, prefix_index, prefix_lens, kv_lens, key_padding_mask, dropout_p,
                 scale):
        return
    names = ("q", "k", "v", "prefix_k", "prefix_v")
    for name, x in zip(names, (q, k, v, prefix_k, prefix_v)):
        _need(isinstance(x, torch.Tensor),
              lambda name=name, x=x: f"{name} must be a torch.Tensor, got {type(x).__name__}", TypeError)
    for name, x in zip(names[:3], (q, k, v)):
        _need(x.dim() == 4, lambda name=name, x=x: f"{name} must be 4-D [B, H, len, D], got shape {list(x.shape)}")
    for name, x in zip(names[3:], (prefix_k, prefix_v)):
        _need(x.dim() == 4, lambda name=name, x=x: f"{name} must be [T, Hkv, P, D] or [Hkv, P, D], got shape {list(x.shape)}")
    _need(q.dtype in SUPPORTED_DTYPES,
          lambda: f"q has unsupported dtype {q.dtype}; use float16, bfloat16 or float32 (float64 for checks)", TypeError)
    for name, x in zip(names[1:], (k, v, prefix_k, prefix_v)):
        _need(x.dtype == q.dtype, lambda name=name, x=x: f"{name} has dtype {x.dtype} but q has {q.dtype}", TypeError)
        _need(x.device == q.device, lambda name=name, x=x: f"{name} is on {x.device} but q is on {q.device}")

    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    T = prefix_k.shape[0]
    _need(MIN_HEAD_DIM <= D <= MAX_HEAD_DIM,
          lambda: f"head dim D={D} (q.shape[-1]) is unsupported: it must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]")
    _need(k.shape[0] == B, lambda: f"k has batch {k.shape[0]} but q has batch {B}")
    _need(k.shape[3] == D, lambda: f"k has head dim {k.shape[3]} but q has {D}")
    _need(v.shape == k.shape, lambda: f"v has shape {list(v.shape)} but k has {list(k.shape)}")
    _need(Hkv > 0 and Hq % Hkv == 0,
          lambda: f"q has {Hq} heads, which is not a multiple of the {Hkv} key/value heads of k (Hq % Hkv must be 0)")
    _need(prefix_k.shape[1] == Hkv, lambda: f"prefix_k has {prefix_k.shape[1]} heads but k has {Hkv}")
    _need(prefix_k.shape[3] == D, lambda: f"prefix_k has head dim {prefix_k.shape[3]} but q has {D}")
    _need(prefix_v.shape == prefix_k.shape,
          lambda: f"prefix_v has shape {list(prefix_v.shape)} but prefix_k has {list(prefix_k.shape)}")
    _need(T >= 1, lambda: "the prefix bank prefix_k must have at least one task row (T >= 1)")

    if prefix_index is None:
        _need(T == 1, lambda: f"prefix_index is None but the bank has T={T} task rows; pass prefix_index [B]")
    _check_int_vector("prefix_index", prefix_index, B, "B", q.device)
    _check_int_vector("prefix_lens", prefix_lens, T, "T", q.device)
    _check_int_vector("kv_lens", kv_lens, B, "B", q.device)
    if key_padding_mask is not None:
        kpm = key_padding_mask
        _need(kv_lens is None, lambda: "pass either kv_lens or key_padding_mask, not both")
        _need(isinstance(kpm, torch.Tensor), lambda: "key_padding_mask must be a torch.Tensor", TypeError)
        _need(kpm.dtype == torch.bool, lambda: f"key_padding_mask must be bool (True = attend), got {kpm.dtype}", TypeError)
        _need(kpm.dim() == 2 and kpm.shape[0] == B and kpm.shape[1] == S,
              lambda: f"key_padding_mask must have shape [B, S] = [{B}, {S}], got {list(kpm.shape)}")
        _need(kpm.device == q.device, lambda: f"key_padding_mask is on {kpm.device} but q is on {q.device}")
    _need(isinstance(dropout_p, (int, float)) and 0.0 <= float(dropout_p) < 1.0,
          lambda: f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if scale is not None:
        _need(isinstance(scale, (int, float)) and 0.0 < float(scale) < float("inf"),
              lambda: f"scale must be a positive finite float or None, got {scale!r}")


def check_backward(dout, dlse, out, lse, q) -> None:
    """The backward's own inputs: dout like out [B, Hq, L, D] in q's dtype; dlse None or like lse [B, Hq, L]."""
    for name, x, like, dtype in (("dout", dout, out, q.dtype), ("out", out, q, q.dtype),
                                 ("lse", lse, None, torch.float32), ("dlse", dlse, None, None)):
        if x is None and name == "dlse":
            continue
        want = tuple(q.shape) if like is not None else tuple(q.shape[:3])
        _need(isinstance(x, torch.Tensor), lambda name=name: f"{name} must be a torch.Tensor", TypeError)
        _need(tuple(x.shape) == want, lambda name=name, x=x, want=want:
              f"{name} must have shape {list(want)}, got {list(x.shape)}")
        _need(x.device == q.device, lambda name=name, x=x: f"{name} is on {x.device} but q is on {q.device}")
        _need(dtype is None or x.dtype == dtype, lambda name=name, x=x, dtype=dtype:
              f"{name} must have dtype {dtype}, got {x.dtype}", TypeError)
        _need(x.is_floating_point(), lambda name=name, x=x: f"{name} must be a float tensor, got {x.dtype}", TypeError)


# A tensor found in range is tagged with the version and bounds it was checked at (a Python attribute on the
# tensor: cheap to read, gone with the tensor). A model passes the same prefix_index / kv_lens to every layer:
# only the first layer pays the device-to-host sync. Writes that bypass the version counter (``.data``,
# ``.numpy()``) are not seen: the kernels still clamp every index, so such a write can select a wrong row,
# never read outside a tensor.
_TAG = "_ptv2_fast_checked"


def _needs_check(x, lo: int, hi: int) -> bool:
    if x is None or x.numel() == 0 or x.device.type == "meta":  # meta tensors (memory planning) hold no values
        return False
    if x.is_inference():  # inference tensors have no version counter: always check
        return True
    # data_ptr: a deep copy or a reloaded tensor restarts at version 1 and carries the tag along
    return getattr(x, _TAG, None) != (x._version, lo, hi, x.data_ptr())


def check_values(prefix_index, prefix_lens, kv_lens, T: int, P: int, S: int, kv_name: str = "kv_lens") -> None:
    """Range checks on index/length tensors: at most one host sync for all of them together, and none
    for a tensor already checked against the same bounds and not modified since."""
    a = _needs_check(prefix_index, 0, T - 1)
    b = _needs_check(prefix_lens, 0, P)
    c = _needs_check(kv_lens, 0, S)
    if not (a or b or c):
        return
    todo = [(x, lo, hi, msg) for need, x, lo, hi, msg in (
        (a, prefix_index, 0, T - 1, f"prefix_index has values outside [0, T) = [0, {T})"),
        (b, prefix_lens, 0, P, f"prefix_lens has values outside [0, P] = [0, {P}]"),
        (c, kv_lens, 0, S, f"{kv_name} has values outside [0, S] = [0, {S}]"),
    ) if need]
    bad = torch.stack([(x < lo).any() | (x > hi).any() for x, lo, hi, _ in todo]).cpu().tolist()
    for is_bad, (x, lo, hi, msg) in zip(bad, todo):
        if is_bad:
            raise ValueError(msg)
        if not x.is_inference():
            setattr(x, _TAG, (x._version, lo, hi, x.data_ptr()))
