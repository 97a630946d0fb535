"""Pinned CPU numerics: the demo and the ablation give the same numbers on every x86-64 machine.

A CPU run of the same commit, data and seeds is bitwise deterministic on one machine, but not
across machines: three things change the last bits of a float result, and 1,000 training steps
turn a last-bit difference into a different model (on the ablation's 20 needle cells, 10-20
points for one strategy between two 2-core machines):

- **intra-op threads.** ATen splits reductions (sums, norms, the loss mean) into one partial per
  thread; with 1 thread instead of 2, `sum` of 10M floats differs by 1e-4 here, and a 60-step
  demo's per-domain stage-1 losses differ from the first logged step (measured 2026-12-07:
  `OMP_NUM_THREADS=1 ATEN_CPU_CAPABILITY=avx2` against the defaults on a 2-core AMD EPYC).
- **vector width.** ATen picks AVX512 kernels where the CPU has them and AVX2 otherwise; the
  lanes change the order of partial sums (`ATEN_CPU_CAPABILITY`).
- **BLAS/oneDNN code paths.** MKL and oneDNN dispatch on the CPU model (Intel vs AMD, AVX2 vs
  AVX512); MKL's conditional numerical reproducibility (`MKL_CBWR`) and oneDNN's ISA cap
  (`ONEDNN_MAX_CPU_ISA`) fix the path.

`PINNED_ENV` fixes all of them at values every x86-64 machine with AVX2 supports. They must be
in the environment before torch (and MKL) initialise, so the entry points call `reexec_pinned`
first: when the environment differs it re-executes the same command with the pinned one (children
inherit it). Cost: 2 threads where a bigger machine has more cores, AVX2 where it has AVX512;
on the 2-core demo machine the pinned run took the same time as the default one (see
docs/demo.md). What remains machine-dependent: a non-x86 CPU (ARM has neither AVX2 nor MKL) and
another torch/MKL build (`make install` pins torch; other packages follow pip's resolution).
`MEGATRON_LONGCTX_UNPINNED=1` opts out (every other setting then comes from the caller's
environment, as for the other tools).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

#: Environment that fixes thread count, vector width and BLAS code path (see the module doc).
PINNED_ENV: dict[str, str] = {
    "OMP_NUM_THREADS": "2",
    "MKL_NUM_THREADS": "2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}
#: Set to 1 to run with the caller's environment instead.
OPT_OUT = "MEGATRON_LONGCTX_UNPINNED"
#: Marks a process that was re-executed already (a guard against an exec loop).
_MARK = "MEGATRON_LONGCTX_PINNED"


def pinned_env(base: Mapping[str, str]) -> dict[str, str]:
    """`base` with `PINNED_ENV` applied (and the re-exec mark set)."""
    return {**base, **PINNED_ENV, _MARK: "1"}


def needs_reexec(env: Mapping[str, str]) -> bool:
    """True when `env` is not pinned, the caller did not opt out, and this is not already the
    re-executed process."""
    if env.get(OPT_OUT) == "1" or env.get(_MARK) == "1":
        return False
    return any(env.get(k) != v for k, v in PINNED_ENV.items())


def reexec_pinned(argv: Sequence[str] | None = None) -> None:
    """Re-execute this Python command with `PINNED_ENV` unless it is already pinned. Call it
    before anything imports torch. Does not return when it re-executes."""
    if not needs_reexec(os.environ):
        return
    if "torch" in sys.modules:
        raise RuntimeError("reexec_pinned must run before torch is imported")
    args = list(sys.argv if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *args], pinned_env(os.environ))
