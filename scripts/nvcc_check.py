#!/usr/bin/env python3
"""CUDA compile check that needs no GPU and no CUDA torch (CI runs it on a CPU-only machine).

1. Compiles every csrc/kernels/cuda/*.cu ALONE with plain nvcc (torch-free: -Icsrc/kernels only)
   for sm_80 and sm_90a, warnings as errors, and parses ptxas' resource report per kernel per arch.
   A kernel that spills registers fails the check unless its .cu file carries a line comment
       // lora_ops: allow-spill <kernel-substring> <reason>
   (the substring is matched against the demangled kernel name; quote it when it has spaces:
   "qlora_x_kernel<__half, 2, false>").
2. Syntax-checks every csrc/bindings/*_cuda.cpp with the host compiler against torch's headers plus
   the CUDA toolkit's include dir, with -DLORA_OPS_WITH_CUDA, so binding code that no CUDA build has
   compiled yet is at least type-checked here. A CPU-only torch wheel still ships c10/cuda/*.h; only
   the generated c10/cuda/impl/cuda_cmake_macros.h is missing, which
   -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE skips (it only defines a Windows export macro).

Usage: python scripts/nvcc_check.py [--out report.json] [--jobs 2] [--nvcc nvcc]
Exit status: 0 when everything compiles and nothing spills, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The -gencode form is required for sm_90a: `-arch=sm_90a` alone would not embed 90a SASS the same way.
GENCODE = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a"]
NVCC_FLAGS = ["-std=c++17", "-O3", "-Werror", "all-warnings", "-Xptxas", "-v",
              # A CUDA torch's CMake config adds these to every CUDA compile of an extension; code that
              # relies on implicit half/bf16 operators would pass here and break the real build.
              "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
              "-D__CUDA_NO_BFLOAT16_CONVERSIONS__"]
# With -Werror all-warnings this makes ptxas itself fail on a spill; dropped for a file that carries an
# allow-spill comment (the parsed report then still fails every kernel the comment does not name).
WARN_SPILLS = ["-Xptxas", "-warn-spills"]
ALLOW_SPILL = re.compile(r'//\s*lora_ops:\s*allow-spill\s+(?:"([^"]+)"|(\S+))\s+(.+)$')

RE_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
RE_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
RE_USED = re.compile(r"Used (\d+) registers")
RE_SMEM = re.compile(r"(\d+) bytes smem")


@dataclass
class KernelReport:
    file: str
    kernel: str  # demangled
    arch: str
    registers: int = 0
    smem: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    spill_allowed: str | None = None  # the reason from the source comment, when allowed


@dataclass
class FileResult:
    file: str
    kind: str  # "cu" or "binding"
    ok: bool
    log: str = ""
    kernels: list[KernelReport] = field(default_factory=list)


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> readable names via c++filt (binutils); identity if it is not installed."""
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def parse_ptxas(log: str, file: str) -> list[KernelReport]:
    """One KernelReport per (entry function, arch) in nvcc's -Xptxas -v output (device functions
    compiled separately also report 'Function properties', but only entries are listed)."""
    reports: list[KernelReport] = []
    current: KernelReport | None = None
    for line in log.splitlines():
        if m := RE_ENTRY.search(line):
            current = KernelReport(file=file, kernel=m.group(1), arch=m.group(2))
            reports.append(current)
        elif current is not None and (m := RE_PROPS.search(line)):
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
        elif current is not None and (m := RE_USED.search(line)):
            current.registers = int(m.group(1))
            if s := RE_SMEM.search(line):
                current.smem = int(s.group(1))
            current = None  # "Used ..." closes the entry's report
    names = demangle(sorted({r.kernel for r in reports}))
    for r in reports:
        r.kernel = short_name(names[r.kernel])
    return reports


def short_name(demangled: str) -> str:
    """'void ns::(anonymous namespace)::k<float, 64>(const float*, ...)' -> 'k<float, 64>'."""
    name = re.sub(r"^void ", "", demangled)
    if name.endswith(")"):  # drop the parameter list: the '(' matching the final ')'
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    for prefix in ("(anonymous namespace)::", "lora_ops::cuda::", "lora_ops::"):
        name = name.replace(prefix, "")
    return name


def allowed_spills(src: Path) -> list[tuple[str, str]]:
    out = []
    for line in src.read_text().splitlines():
        if m := ALLOW_SPILL.search(line):
            out.append((m.group(1) or m.group(2), m.group(3).strip()))
    return out


def compile_cu(nvcc: str, src: Path, tmp: Path) -> FileResult:
    rel = str(src.relative_to(ROOT))
    allow = allowed_spills(src)
    cmd = [nvcc, *NVCC_FLAGS, *([] if allow else WARN_SPILLS), f"-I{ROOT / 'csrc' / 'kernels'}", *GENCODE, "-c", str(src),
           "-o", str(tmp / (src.stem + ".o"))]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    log = p.stdout + p.stderr
    res = FileResult(file=rel, kind="cu", ok=p.returncode == 0, log=log if p.returncode else "")
    res.kernels = parse_ptxas(log, rel)
    if res.ok and not res.kernels:
        res.log = "no kernel entries found in the ptxas report (is -Xptxas -v working?)\n" + log
    for k in res.kernels:
        for sub, reason in allow:
            if sub in k.kernel:
                k.spill_allowed = reason
    return res


def cuda_include_dir(nvcc: str) -> Path | None:
    """The toolkit's include dir: nvcc may be a wrapper script, so ask it rather than follow links."""
    p = subprocess.run([nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                       capture_output=True, text=True)
    for m in re.finditer(r'-I"?([^"\s]+/include)"?', p.stdout + p.stderr):
        d = Path(m.group(1))
        if (d / "cuda_runtime_api.h").exists():
            return d
    for cand in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if cand and (Path(cand) / "include" / "cuda_runtime_api.h").exists():
            return Path(cand) / "include"
    return None


def torch_include_dirs() -> list[str]:
    """torch.utils.cpp_extension.include_paths() in a child process (importing torch is slow and
    this script must not need torch for the .cu part)."""
    code = "import torch.utils.cpp_extension as c; print('\\n'.join(c.include_paths()))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError("cannot import torch for the binding syntax check:\n" + p.stderr)
    return [line for line in p.stdout.splitlines() if line]


def python_include_dir() -> str:
    import sysconfig

    return sysconfig.get_paths()["include"]


def check_binding(cxx: str, src: Path, incs: list[str]) -> FileResult:
    rel = str(src.relative_to(ROOT))
    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror",
           "-DLORA_OPS_WITH_CUDA=1", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-DTORCH_EXTENSION_NAME=_C",
           f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'csrc' / 'kernels'}", *(f"-isystem{d}" for d in incs), str(src)]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    return FileResult(file=rel, kind="binding", ok=p.returncode == 0, log=p.stdout + p.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="write the report as JSON here")
    ap.add_argument("--jobs", type=int, default=2, help="parallel compiles (at most 2)")
    ap.add_argument("--nvcc", default=os.environ.get("NVCC", "nvcc"))
    ap.add_argument("--cxx", default=os.environ.get("CXX", "g++"))
    ap.add_argument("--skip-bindings", action="store_true", help="only the torch-free .cu check")
    args = ap.parse_args()
    jobs = max(1, min(args.jobs, 2))

    if not shutil.which(args.nvcc):
        print(f"nvcc_check: '{args.nvcc}' not found", file=sys.stderr)
        return 1
    cu_files = sorted((ROOT / "csrc" / "kernels" / "cuda").glob("*.cu"))
    bindings = [] if args.skip_bindings else sorted((ROOT / "csrc" / "bindings").glob("*_cuda.cpp"))

    results: list[FileResult] = []
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(jobs) as pool:
        futs = [pool.submit(compile_cu, args.nvcc, f, Path(tmp)) for f in cu_files]
        if bindings:
            cuda_inc = cuda_include_dir(args.nvcc)
            try:
                incs = torch_include_dirs() + [python_include_dir()] + ([str(cuda_inc)] if cuda_inc else [])
                futs += [pool.submit(check_binding, args.cxx, f, incs) for f in bindings]
            except RuntimeError as e:
                results += [FileResult(file=str(f.relative_to(ROOT)), kind="binding", ok=False, log=str(e))
                            for f in bindings]
        results += [f.result() for f in futs]

    kernels = [k for r in results for k in r.kernels]
    header = f"{'kernel':<70} {'arch':<7} {'regs':>4} {'smem':>6} {'stack':>5} {'spill st/ld':>11}"
    print(header)
    print("-" * len(header))
    for k in sorted(kernels, key=lambda k: (k.file, k.kernel, k.arch)):
        name = k.kernel if len(k.kernel) <= 70 else k.kernel[:67] + "..."
        flag = ""
        if k.spill_stores or k.spill_loads:
            flag = f"  (spill allowed: {k.spill_allowed})" if k.spill_allowed else "  <-- SPILLS"
        print(f"{name:<70} {k.arch:<7} {k.registers:>4} {k.smem:>6} {k.stack:>5} "
              f"{k.spill_stores:>5}/{k.spill_loads:<5}{flag}")

    failed_files = [r for r in results if not r.ok]
    spilling = [k for k in kernels if (k.spill_stores or k.spill_loads) and not k.spill_allowed]
    empty = [r for r in results if r.kind == "cu" and r.ok and not r.kernels]
    for r in failed_files + empty:
        print(f"\n==== {r.file} ({r.kind}) FAILED ====\n{r.log.strip()}", file=sys.stderr)
    for k in spilling:
        print(f"nvcc_check: {k.kernel} spills on {k.arch} ({k.spill_stores} B stores, {k.spill_loads} B loads); "
              f"fix it or add '// lora_ops: allow-spill <kernel-substring> <reason>' to {k.file}", file=sys.stderr)

    ok = not failed_files and not spilling and not empty
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "ok": ok,
            "nvcc_flags": NVCC_FLAGS + GENCODE,
            "files": [{"file": r.file, "kind": r.kind, "ok": r.ok} for r in results],
            "kernels": [asdict(k) for k in kernels],
        }, indent=1))
    n_cu = sum(r.kind == "cu" for r in results)
    n_b = sum(r.kind == "binding" for r in results)
    print(f"\nnvcc_check: {'OK' if ok else 'FAILED'}: {n_cu} .cu file(s), {len(kernels)} kernel/arch entries, "
          f"{len(spilling)} spilling, {n_b} CUDA binding file(s) syntax-checked, {len(failed_files)} failed to compile")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
