"""The CUDA kernels (csrc/cuda/kd_loss_kernels.cuh) compile with plain nvcc for sm_90a, for every
divergence and every 16-bit and 32-bit dtype, and ptxas spills no registers. Needs no GPU and no
CUDA build of torch; skipped without nvcc."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kdkernels.ops.kd_loss import DIVERGENCES

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SCALAR_TYPES = ["float", "__nv_bfloat16", "__half"]

# Taking a kernel's address instantiates it; dispatch_divergence visits every divergence.
TRANSLATION_UNIT = """
#include "cuda/kd_loss_kernels.cuh"

namespace kc = kdkernels::cuda_kernels;

template <typename scalar_t>
void instantiate(kdkernels::Divergence divergence) {
  kdkernels::dispatch_divergence(divergence, [](auto div) {
    using Div = decltype(div);
    static_cast<void>(&kc::kd_loss_rows_kernel<Div, kc::kVectorWidth<scalar_t>, scalar_t, float>);
    static_cast<void>(&kc::kd_loss_rows_kernel<Div, 1, scalar_t, float>);
  });
}
"""

# The defines torch.utils.cpp_extension passes to nvcc: no implicit half / bfloat16 conversions.
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]

ENTRY = re.compile(r"Compiling entry function '(\w+)' for 'sm_90a'")
SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
REGISTERS = re.compile(r"Used (\d+) registers")


def _demangle(names: list[str]) -> list[str]:
    if shutil.which("c++filt") is None:
        return names
    done = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    return done.stdout.splitlines()


def _resource_usage(ptxas_log: str) -> dict[str, tuple[int, int, int]]:
    """Kernel name -> (registers, spill store bytes, spill load bytes) from `-Xptxas -v` output."""
    usage, name, spills = {}, None, None
    for line in ptxas_log.splitlines():
        if m := ENTRY.search(line):
            name = m.group(1)
        elif (m := SPILLS.search(line)) and name:
            spills = (int(m.group(1)), int(m.group(2)))
        elif (m := REGISTERS.search(line)) and name and spills:
            usage[name] = (int(m.group(1)), *spills)
            name, spills = None, None
    return usage


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_kernels_compile_for_sm90a_without_spills(tmp_path):
    source = tmp_path / "kd_loss_kernels_sm90a.cu"
    source.write_text(TRANSLATION_UNIT + "".join(
        f"template void instantiate<{t}>(kdkernels::Divergence);\n" for t in SCALAR_TYPES))
    command = ["nvcc", "-gencode=arch=compute_90a,code=sm_90a", "-std=c++17", "-O3", *TORCH_NVCC_DEFINES,
               f"-I{CSRC}", "-Xptxas", "-v", "-c", str(source), "-o", str(tmp_path / "kernels.o")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    usage = _resource_usage(done.stderr)
    for name, (registers, stores, loads) in zip(_demangle(list(usage)), usage.values()):
        print(f"{registers:4d} registers, {stores} / {loads} bytes spilled: {name}")
    # Two widths (16-byte packs, and the scalar fallback) per divergence and dtype; adaptive KL
    # has no CUDA kernel (its head search runs in Triton).
    cuda_divergences = [name for name in DIVERGENCES if name != "akl"]
    assert len(usage) == 2 * len(SCALAR_TYPES) * len(cuda_divergences)
    assert all(stores == 0 and loads == 0 for _, stores, loads in usage.values()), "ptxas spilled registers"
