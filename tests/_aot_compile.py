"""Compile every Triton kernel for a GPU target without a GPU, through the real launchers.

Run as a script (never with TRITON_INTERPRET=1): the launchers are called on CPU tensors with their kernels
swapped for recorders, so each recorded launch carries exactly the arguments, constexprs, block sizes,
num_warps and num_stages that a GPU run would use; each is then compiled with ``triton.compile`` for the
target (default sm_90). Prints one line per kernel and exits non-zero on the first failure.

    python tests/_aot_compile.py DTYPE D DROPOUT [ARCH]      e.g.  bf16 128 1 90
"""

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import ptv2_fast.kernels.prefix_attention as launch  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
TYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
              torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8", torch.int8: "i8"}
KERNELS = [n for n in dir(launch) if n.endswith("_kernel")]
RECORDED = []


class Recorder:
    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        def launch_(*args, **kwargs):
            RECORDED.append((self.fn, args, kwargs))
        return launch_


def signature(fn, args, kwargs):
    sig, consts = {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        if param.is_constexpr:
            sig[name], consts[name] = "constexpr", kwargs[name]
            continue
        value = args[i]
        if isinstance(value, torch.Tensor):
            sig[name] = "*" + TYPE_NAMES[value.dtype]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            if value == 1:  # Triton specialises integer arguments equal to 1 into constants
                sig[name], consts[name] = "constexpr", 1
            else:
                sig[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: unexpected argument {name}={value!r}")
    return sig, consts


def record(dtype, D, dropout):
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, L, S, P, T = 3, 8, 2, 300, 700, 128, 3
    q = torch.randn(B, Hq, L, D, generator=g).to(dtype)
    k, v = torch.randn(B, Hkv, S, D, generator=g).to(dtype), torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    pk, pv = torch.randn(T, Hkv, P, D, generator=g).to(dtype), torch.randn(T, Hkv, P, D, generator=g).to(dtype)
    idx, plens = torch.tensor([2, 0, 2]), torch.tensor([P, 5, 7])
    kvl, kpm = torch.tensor([S, 9, 0]), torch.rand(B, S, generator=g) > 0.5
    p = 0.1 if dropout else 0.0
    for kv_lens, mask, causal, splits in ((kvl, None, True, "1"), (None, kpm, False, "2")):
        os.environ["PTV2_FAST_PREFIX_SPLITS"] = splits  # the second pass takes the split path (+ reduce kernel)
        out, lse = launch.prefix_attention_fwd(q, k, v, pk, pv, idx, plens, kv_lens, mask, causal, D ** -0.5, p, 7, 3)
        launch.prefix_attention_bwd(torch.randn_like(q), torch.randn_like(lse), q, k, v, pk, pv, idx, plens, kv_lens,
                                    mask, out, lse, causal, D ** -0.5, p, 7, 3)
        # the sdpa backend's merge variants (MERGE forward, DQ_ACCUM dq, prefix-only dk/dv)
        lse2 = launch.prefix_attention_merge_fwd(q, k, v, pk, pv, idx, plens, kv_lens, mask, causal, D ** -0.5, p,
                                                 7, 3, out.clone(), lse)
        launch.prefix_attention_merge_bwd(torch.randn_like(q), q, k, v, pk, pv, idx, plens, out, lse2, D ** -0.5, p,
                                          7, 3, torch.zeros_like(q))
    if dropout:
        launch.prefix_attention_dropout_mask(B, Hq, L, S, P, p, 7, 3, "cpu")


def main():
    dtype, D, dropout = DTYPES[sys.argv[1]], int(sys.argv[2]), sys.argv[3] == "1"
    arch = int(sys.argv[4]) if len(sys.argv) > 4 else 90
    for name in KERNELS:
        setattr(launch, name, Recorder(getattr(launch, name)))
    record(dtype, D, dropout)
    seen = set()
    target = GPUTarget("cuda", arch, 32)
    for fn, args, kwargs in RECORDED:
        sig, consts = signature(fn, args, kwargs)
        opts = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        key = (fn.__name__, tuple(sorted(sig.items())), tuple(sorted(map(str, consts.items()))), tuple(opts.items()))
        if key in seen:
            continue
        seen.add(key)
        compiled = triton.compile(ASTSource(fn, sig, consts), target=target, options=opts)
        shared = compiled.metadata.shared
        print(f"ok sm_{arch} {fn.__name__} {sys.argv[1]} D={D} dropout={dropout} {opts} shared={shared}")
        assert shared <= 227 * 1024, f"{fn.__name__} needs {shared} bytes of shared memory"


if __name__ == "__main__":
    main()
