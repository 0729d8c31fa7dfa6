#!/usr/bin/env python3
"""Compile every kernels/*.cu without a GPU and without nvcc: the CI check.

Each file is compiled exactly as the CUDA backend compiles it at run time
(src/backend/cuda/ptx.rs): the text of kernels/common.cuh replaces the file's
`#include "common.cuh"` line, and NVRTC (libnvrtc.so.12 from the PyPI wheel
`nvidia-cuda-nvrtc-cu12`, loaded with ctypes) turns it into PTX for sm_80 and
sm_90 (files named *_sm90.cu, which use Hopper's wgmma: for sm_90a alone).
`ptxas -v` (from the wheel `nvidia-cuda-nvcc-cu12`, which has ptxas but no
nvcc driver) then assembles the PTX for the same architecture and reports
each kernel's registers, spills and shared memory. The kernels include no
CUDA headers, so no include path (and no `nvidia-cuda-runtime-cu12`) is
needed.

Fails (exit 1) on any NVRTC or ptxas error or warning, and on any
local-memory spill in a hot kernel (matmul, attention, norms,
cross-entropy). Writes the table docs/kernels-ptxas.md.

    python3 -m pip install nvidia-cuda-nvrtc-cu12 nvidia-cuda-nvcc-cu12
    python3 scripts/compile_kernels.py [--out-dir DIR] [--no-table]
"""

import argparse
import ctypes
import glob
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join(ROOT, "kernels")
ARCHS = ["sm_80", "sm_90"]
# Files named *_sm90.cu use Hopper-only instructions (wgmma): compiled for
# sm_90a alone (src/backend/cuda/ptx.rs loads them on compute capability 9.0).
ARCHS_SM90A = ["sm_90a"]


def archs_of(name):
    return ARCHS_SM90A if name.endswith("_sm90.cu") else ARCHS
# Kernels whose names start with these must not spill to local memory.
HOT = ("matmul_", "gemm_", "attention_", "layernorm_", "rmsnorm_", "cross_entropy_")
# Options shared with the run-time compiler (src/backend/cuda/ptx.rs).
NVRTC_OPTS = ["--std=c++17", "-default-device"]


def nvidia_dirs():
    """Directories of the installed `nvidia` namespace package (the wheels)."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    return list(spec.submodule_search_locations)


def find_file(subpaths, what, wheel):
    for d in nvidia_dirs():
        for sp in subpaths:
            p = os.path.join(d, sp)
            if os.path.exists(p):
                return p
    sys.exit(f"compile_kernels: {what} not found; install it with: python3 -m pip install {wheel}")


def load_nvrtc():
    path = find_file(["cuda_nvrtc/lib/libnvrtc.so.12"], "libnvrtc.so.12", "nvidia-cuda-nvrtc-cu12")
    lib = ctypes.CDLL(path)
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib, path


def check(lib, status, what):
    if status != 0:
        raise RuntimeError(f"{what}: {lib.nvrtcGetErrorString(status).decode()}")


def source_of(path):
    """The file with common.cuh pasted in place of its include line."""
    with open(os.path.join(KERNELS, "common.cuh")) as f:
        common = f.read()
    with open(path) as f:
        src = f.read()
    line = '#include "common.cuh"'
    if line not in src:
        raise RuntimeError(f"{path}: missing {line}")
    return src.replace(line, common, 1)


def nvrtc_version(lib):
    major, minor = ctypes.c_int(), ctypes.c_int()
    check(lib, lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return major.value, minor.value


def compile_ptx(lib, name, src, arch):
    prog = ctypes.c_void_p()
    check(
        lib,
        lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), name.encode(), 0, None, None),
        f"{name}: nvrtcCreateProgram",
    )
    try:
        opts = NVRTC_OPTS + [f"--gpu-architecture=compute_{arch[3:]}"]
        arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        status = lib.nvrtcCompileProgram(prog, len(opts), arr)
        size = ctypes.c_size_t()
        check(lib, lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "log size")
        buf = ctypes.create_string_buffer(size.value)
        check(lib, lib.nvrtcGetProgramLog(prog, buf), "log")
        log = buf.value.decode(errors="replace").strip()
        if status != 0:
            raise RuntimeError(f"{name} ({arch}): NVRTC failed:\n{log}")
        if log:
            raise RuntimeError(f"{name} ({arch}): NVRTC warnings (treated as errors):\n{log}")
        check(lib, lib.nvrtcGetPTXSize(prog, ctypes.byref(size)), "PTX size")
        buf = ctypes.create_string_buffer(size.value)
        check(lib, lib.nvrtcGetPTX(prog, buf), "PTX")
        return buf.value.decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


INFO_FN = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
INFO_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
INFO_REGS = re.compile(r"Used (\d+) registers")
INFO_SMEM = re.compile(r"(\d+) bytes smem")


def ptxas(ptxas_bin, ptx_path, arch):
    out = subprocess.run(
        [ptxas_bin, "-v", f"-arch={arch}", ptx_path, "-o", os.devnull],
        capture_output=True,
        text=True,
    )
    text = out.stdout + out.stderr
    if out.returncode != 0:
        raise RuntimeError(f"ptxas failed on {ptx_path} ({arch}):\n{text}")
    # "Potential Performance Loss" (an info line): ptxas serialized wgmma.
    warnings = [l for l in text.splitlines() if "warning" in l.lower() or "performance loss" in l.lower()]
    if warnings:
        raise RuntimeError(f"ptxas warnings on {ptx_path} ({arch}):\n" + "\n".join(warnings))
    rows, cur = [], None
    for line in text.splitlines():
        m = INFO_FN.search(line)
        if m:
            cur = {"kernel": m.group(1), "arch": m.group(2), "regs": 0, "stack": 0, "spill_st": 0, "spill_ld": 0,
                   "smem": 0}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = INFO_STACK.search(line)
        if m:
            cur["stack"], cur["spill_st"], cur["spill_ld"] = map(int, m.groups())
        m = INFO_REGS.search(line)
        if m:
            cur["regs"] = int(m.group(1))
        m = INFO_SMEM.search(line)
        if m:
            cur["smem"] = int(m.group(1))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", help="keep the PTX files here (default: a temporary directory)")
    ap.add_argument("--no-table", action="store_true", help="do not rewrite docs/kernels-ptxas.md")
    args = ap.parse_args()

    lib, nvrtc_path = load_nvrtc()
    ptxas_bin = find_file(["cuda_nvcc/bin/ptxas"], "ptxas", "nvidia-cuda-nvcc-cu12")
    ver = nvrtc_version(lib)
    pv = subprocess.run([ptxas_bin, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    print(f"NVRTC {ver[0]}.{ver[1]} ({nvrtc_path})\nptxas: {pv}")

    files = sorted(glob.glob(os.path.join(KERNELS, "*.cu")))
    if not files:
        sys.exit("compile_kernels: no kernels/*.cu")
    out_dir = args.out_dir or tempfile.mkdtemp(prefix="beft-ptx-")
    os.makedirs(out_dir, exist_ok=True)
    rows, errors = [], []
    for path in files:
        name = os.path.basename(path)
        for arch in archs_of(name):
            try:
                ptx = compile_ptx(lib, name, source_of(path), arch)
                ptx_path = os.path.join(out_dir, f"{name[:-3]}.{arch}.ptx")
                with open(ptx_path, "w") as f:
                    f.write(ptx)
                got = ptxas(ptxas_bin, ptx_path, arch)
                if not got:
                    raise RuntimeError(f"{name} ({arch}): no kernels in the PTX")
                for r in got:
                    r["file"] = name
                rows.extend(got)
            except RuntimeError as e:
                errors.append(str(e))
    spills = [
        r for r in rows
        if r["kernel"].startswith(HOT) and (r["spill_st"] or r["spill_ld"] or r["stack"])
    ]
    for r in spills:
        errors.append(
            f"{r['kernel']} ({r['arch']}): local memory in a hot kernel: {r['stack']} bytes stack, "
            f"{r['spill_st']} bytes spill stores, {r['spill_ld']} bytes spill loads"
        )

    rows.sort(key=lambda r: (r["file"], r["kernel"], r["arch"]))
    print(f"{'kernel':32} {'arch':6} {'regs':>5} {'stack':>6} {'spill st':>9} {'spill ld':>9} {'smem':>6}")
    for r in rows:
        print(f"{r['kernel']:32} {r['arch']:6} {r['regs']:5} {r['stack']:6} {r['spill_st']:9} {r['spill_ld']:9} "
              f"{r['smem']:6}")
    if not args.no_table and not errors:
        lines = [
            "# ptxas resource report of the CUDA kernels",
            "",
            "Generated by `python3 scripts/compile_kernels.py` (do not edit by hand): every",
            "`kernels/*.cu` compiled by NVRTC to PTX and assembled by `ptxas -v` for each",
            f"architecture. NVRTC {ver[0]}.{ver[1]}; {pv}.",
            "Registers per thread; stack frame, spill stores and spill loads in bytes of local",
            "memory per thread (must be 0 for the hot kernels: matmul, attention, norms,",
            "cross-entropy); static shared memory in bytes per block (the attention kernels",
            "also take dynamic shared memory, sized at launch by the head dimension).",
            "",
            "| file | kernel | arch | registers | stack | spill stores | spill loads | shared memory |",
            "|---|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            lines.append(
                f"| {r['file']} | `{r['kernel']}` | {r['arch']} | {r['regs']} | {r['stack']} | {r['spill_st']} | "
                f"{r['spill_ld']} | {r['smem']} |"
            )
        with open(os.path.join(ROOT, "docs", "kernels-ptxas.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
    if errors:
        print("\n".join(["", "FAILED:"] + errors), file=sys.stderr)
        sys.exit(1)
    n_k = len({r["kernel"] for r in rows})
    n_a = len({r["arch"] for r in rows})
    print(f"ok: {len(files)} files, {n_k} kernels, {n_a} architectures, no spills in hot kernels")


if __name__ == "__main__":
    main()
