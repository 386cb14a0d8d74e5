"""Builds the CPU emulations of the CUDA kernels (tests/cuda_emu/): copies csrc/kernels/cuda/ with the
CUDA-only syntax rewritten into host C++ that the emulation runtimes implement, then compiles with g++.

Rewrites (the kernel sources themselves are never edited):
  k<<<grid, block, smem, stream>>>(args)    ->  ::lora_emu::make_launch(k, grid, block, smem, stream)(args)
  extern __shared__ [__align__(n)] T name[];  ->  T* name = reinterpret_cast<T*>(::lora_emu::dynamic_smem());
  asm volatile("ptx" : outs : ins);          ->  ::lora_emu::ptx("ptx", {Out(o)..., In(i)...});
The inline-asm rewrite keeps the PTX text and the operand numbering (outputs first, as in GCC asm), so
the runtime dispatches on the instruction and reads operands by their %N positions: the kernels' own
inline PTX is what runs, interpreted by emu_fiber_runtime.h (the one emulation runtime; both checks,
emu_nf4_check.cpp and emu_qlora_fiber_check.cpp, run on it).

Usable as a script: python tests/cuda_emu/build_emu.py OUT_DIR [extra g++ flags...]  (builds
emu_qlora_fiber_check there; e.g. -fsanitize=address to catch out-of-bounds reads of the kernels).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EMU = ROOT / "tests" / "cuda_emu"
KERNELS = ROOT / "csrc" / "kernels"

# The .cu files of the fused QLoRA linear (each its own translation unit: they share helper names in
# anonymous namespaces).
QLORA_UNITS = ("qlora_decode.cu", "qlora_ffma.cu", "lora_small.cu", "qlora_mma.cu", "qlora_tc_decode.cu",
               "nf4_window.cu")


def cuda_include_dir() -> str | None:
    """The CUDA toolkit include directory (via scripts/nvcc_check.py), or None without nvcc."""
    if shutil.which("nvcc") is None:
        return None
    spec = importlib.util.spec_from_file_location("nvcc_check", ROOT / "scripts" / "nvcc_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("nvcc_check", mod)  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod.cuda_include_dir("nvcc")


def _literal_end(src: str, i: int) -> int:
    """Index of the quote closing the string or char literal that opens at src[i]."""
    j = i + 1
    while src[j] != src[i]:
        j += 2 if src[j] == "\\" else 1
    return j


def _matching_paren(src: str, open_idx: int) -> int:
    """Index of the ')' closing the '(' at open_idx, skipping string and char literals."""
    depth, i = 0, open_idx
    while i < len(src):
        ch = src[i]
        if ch in "\"'":
            i = _literal_end(src, i)
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise ValueError("unbalanced parentheses in asm statement")


def _split_top(text: str, sep: str) -> list[str]:
    """Splits at `sep` outside parentheses, brackets and string literals."""
    parts, depth, cur, i = [], 0, [], 0
    while i < len(text):
        ch = text[i]
        if ch in "\"'":
            j = _literal_end(text, i)
            cur.append(text[i:j + 1])
            i = j + 1
            continue
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def _rewrite_asm(src: str) -> str:
    out, pos = [], 0
    for m in re.finditer(r"\basm\s+(?:volatile\s*)?\(", src):
        if m.start() < pos:
            continue
        open_idx = m.end() - 1
        close = _matching_paren(src, open_idx)
        sections = _split_top(src[open_idx + 1:close], ":")
        template = sections[0].strip()
        operands = []
        for sec in sections[1:3]:
            for op in _split_top(sec, ","):
                op = op.strip()
                if not op:
                    continue
                cm = re.fullmatch(r'"([^"]*)"\s*\((.*)\)', op, re.S)
                if cm is None:
                    raise ValueError(f"cannot parse asm operand {op!r}")
                kind = "Out" if cm.group(1)[:1] in "=+" else "In"
                operands.append(f"::lora_emu::{kind}({cm.group(2)})")
        out.append(src[pos:m.start()])
        out.append(f"::lora_emu::ptx({template}, {{{', '.join(operands)}}})")
        pos = close + 1
    out.append(src[pos:])
    return "".join(out)


def _rewrite_launches(src: str) -> str:
    """k<<<cfg>>>(args) -> ::lora_emu::make_launch(k, cfg)(args); k may carry nested template arguments
    and whitespace (a line break) before the <<<."""
    while (start := src.find("<<<")) >= 0:
        end = src.index(">>>", start)
        i = start
        while src[i - 1].isspace():
            i -= 1
        if src[i - 1] == ">":  # template argument list: walk back to its matching '<'
            depth = 0
            while True:
                i -= 1
                depth += {">": 1, "<": -1}.get(src[i], 0)
                if depth == 0:
                    break
        while src[i - 1].isalnum() or src[i - 1] in "_:":
            i -= 1
        kernel = src[i:start].strip()
        src = src[:i] + f"::lora_emu::make_launch({kernel}, {src[start + 3:end]})" + src[end + 3:]
    return src


def rewrite_cuda_source(src: str) -> str:
    """CUDA-only syntax of one kernel source rewritten for the emulation (see the module docstring)."""
    src = _rewrite_launches(src)
    src = re.sub(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w ]+?)\s+(\w+)\s*\[\s*\]\s*;",
                 r"\1* \2 = reinterpret_cast<\1*>(::lora_emu::dynamic_smem());", src)
    return _rewrite_asm(src)


def _write_rewritten_kernels(out_dir: Path) -> Path:
    """out_dir/cuda/: every csrc/kernels/cuda/ file rewritten; unchanged files keep their mtime."""
    cuda_dir = out_dir / "cuda"
    cuda_dir.mkdir(parents=True, exist_ok=True)
    for f in (KERNELS / "cuda").iterdir():
        text = rewrite_cuda_source(f.read_text())
        dst = cuda_dir / f.name
        if not dst.exists() or dst.read_text() != text:
            dst.write_text(text)
    return cuda_dir


def _build(out_dir: Path, name: str, jobs: list[tuple[Path, list[str]]], cxx: str,
           extra_flags: tuple[str, ...]) -> Path:
    """Compiles each (source, flags) of `jobs` (skipping up-to-date objects) and links out_dir/name."""
    inc = cuda_include_dir()
    if inc is None:
        raise RuntimeError("nvcc (CUDA toolkit headers) not found")
    cuda_dir = _write_rewritten_kernels(out_dir)
    flags = ["-std=c++20", "-O2", "-w", "-ffp-contract=off", "-fopenmp", f"-I{out_dir}", f"-I{EMU}", f"-I{KERNELS}",
             "-isystem", inc, *extra_flags]
    # Every object depends on the emulation headers, the common and CPU headers, and the rewritten kernels (the
    # checks include .cu files, the QLoRA units include rewritten .cuh headers).
    deps = [*EMU.glob("*.h"), *(KERNELS / "common").iterdir(), *(KERNELS / "cpu").glob("*.h"),
            *cuda_dir.iterdir()]
    newest_dep = max(d.stat().st_mtime for d in deps)
    objs = []
    for src, extra in jobs:
        obj = out_dir / (src.name + ".o")
        if not obj.exists() or obj.stat().st_mtime < max(src.stat().st_mtime, newest_dep):
            r = subprocess.run([cxx, *flags, *extra, "-c", str(src), "-o", str(obj)], capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"compiling {src.name} failed:\n{r.stderr[-6000:]}")
        objs.append(str(obj))
    exe = out_dir / name
    r = subprocess.run([cxx, "-fopenmp", "-pthread", *extra_flags, *objs, "-o", str(exe)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"linking failed:\n{r.stderr[-6000:]}")
    return exe


def build_qlora_check(out_dir: Path, cxx: str = "g++", extra_flags: tuple[str, ...] = ()) -> Path:
    """Compiles tests/cuda_emu/emu_qlora_fiber_check.cpp with the rewritten QLoRA kernels; returns the binary."""
    runtime = ["-x", "c++", "-include", str(EMU / "emu_fiber_runtime.h")]
    jobs = [(out_dir / "cuda" / u, runtime) for u in QLORA_UNITS]
    # every torch-free CPU kernel file (the check compares against them; the set changes as files split)
    jobs += [(EMU / "emu_qlora_fiber_check.cpp", [])] + [(f, []) for f in sorted((KERNELS / "cpu").glob("*.cpp"))]
    return _build(out_dir, "emu_qlora_fiber_check", jobs, cxx, extra_flags)


def build_nf4_check(out_dir: Path, cxx: str = "g++", extra_flags: tuple[str, ...] = ()) -> Path:
    """Compiles tests/cuda_emu/emu_nf4_check.cpp (it includes the rewritten NF4 .cu files) and the CPU
    NF4 kernels; returns the binary."""
    jobs = [(EMU / "emu_nf4_check.cpp", []), (KERNELS / "cpu" / "nf4_cpu.cpp", []),
            (KERNELS / "cpu" / "nf4_dequant_avx512.cpp", [])]
    return _build(out_dir, "emu_nf4_check", jobs, cxx, extra_flags)


def build_multi_lora_check(out_dir: Path, cxx: str = "g++", extra_flags: tuple[str, ...] = ()) -> Path:
    """Compiles tests/cuda_emu/emu_multi_lora_check.cpp (it includes the rewritten multi_lora.cu); returns the
    binary."""
    return _build(out_dir, "emu_multi_lora_check", [(EMU / "emu_multi_lora_check.cpp", [])], cxx, extra_flags)

if __name__ == "__main__":
    print(build_qlora_check(Path(sys.argv[1]).resolve(), extra_flags=tuple(sys.argv[2:])))
