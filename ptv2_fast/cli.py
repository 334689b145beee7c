"""``ptv2-fast`` command line. ``ptv2-fast bench``: the op against the naive concatenation paths on this machine."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import torch


def _bench(args) -> int:
    from ptv2_fast.benchmarks import op_bench

    shape = dataclasses.replace(op_bench.PRESETS["quick" if args.quick else args.preset])
    for field in ("B", "Hq", "Hkv", "L", "S", "P", "T", "D"):
        value = getattr(args, field)
        if value is not None:
            setattr(shape, field, value)
    if args.Hq is not None and args.Hkv is None:
        shape.Hkv = shape.Hq  # --heads alone means multi-head attention, not GQA
    if args.causal:
        shape.causal = True
    if args.no_padding:
        shape.padded = False
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    result = op_bench.run(shape, dtype=dtype, device=device, modes=args.modes.split(","),
                          warmup=args.warmup, reps=args.reps, progress=sys.stderr.isatty())
    print(op_bench.format_table(result))
    if device == "cpu":
        print("\nOn the CPU the op runs its concatenating reference backend; the fused Triton kernels run on a "
              "CUDA GPU (and are tested on the CPU through Triton's interpreter).")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ptv2-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="time prefix attention vs naive_eager / sdpa_concat / sdpa_precat")
    b.add_argument("--quick", action="store_true", help="a small shape that runs in well under a minute on a CPU")
    b.add_argument("--preset", default="nlu", choices=["nlu", "quick"], help="named shape (default: nlu)")
    b.add_argument("--batch", dest="B", type=int)
    b.add_argument("--heads", dest="Hq", type=int)
    b.add_argument("--kv-heads", dest="Hkv", type=int)
    b.add_argument("--query-len", dest="L", type=int)
    b.add_argument("--seq-len", dest="S", type=int)
    b.add_argument("--prefix-len", dest="P", type=int)
    b.add_argument("--tasks", dest="T", type=int)
    b.add_argument("--head-dim", dest="D", type=int)
    b.add_argument("--causal", action="store_true")
    b.add_argument("--no-padding", action="store_true", help="every row uses all S keys")
    b.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when present")
    b.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default: bf16 on cuda, fp32 on cpu")
    b.add_argument("--modes", default="fwd,fwd+bwd")
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--reps", type=int, default=10)
    b.add_argument("--json", help="also write the result (environment, shape, every figure) to this file")
    b.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
