#!/usr/bin/env python3
"""Checks a CUDA build of lora_ops/_C without a GPU and writes its manifest (called by
scripts/build_cuda_prebuilt.sh, which passes every path; stdlib only, never imports torch).

1. gencode: every nvcc command of the build (`ninja -t commands`) targets exactly the requested archs,
   one `-gencode arch=compute_XX,code=sm_XX` each, and nothing else (no -arch, no PTX, no extra sm):
   torch's CMake config must not have added its own.
2. elf: `cuobjdump --list-elf` shows exactly those archs, and `--dump-resource-usage` shows every
   function of every .cu compiled for each of them; `--list-ptx` shows no PTX.
3. symbols: every undefined dynamic symbol (`nm -D --undefined-only`, with its version) is exported by
   the unpacked torch's libraries (torch/lib, its own libgomp included), the pinned wheel's
   libcudart, this machine's libc/libm/libstdc++/libgcc_s/ld-linux, or Python (only the limited API is
   declared under Py_LIMITED_API, so these are stable-ABI functions). Weak references may stay open.
   The highest GLIBC/GLIBCXX/CXXABI/GCC versions the module needs are recorded next to torch's own:
   a GPU machine whose system libraries are older than the module's needs cannot load it (then
   scripts/gpu_check.sh builds there instead).
Exit status 1 when a check fails; the manifest is written either way.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import platform
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VERSIONED_NAMESPACES = ("GLIBC", "GLIBCXX", "CXXABI", "GCC")


def run(*cmd: str, cwd: Path | None = None) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return p.stdout


def expected_gencodes(archs: list[str]) -> set[tuple[str, str]]:
    return {(f"compute_{a}", f"sm_{a}") for a in archs}


# ---- 1. nvcc command lines -------------------------------------------------------------------------
RE_GENCODE = re.compile(r"(?:-gencode|--generate-code)[= ]+\"?arch=(\w+),code=\[?([\w,]+)\]?\"?")
RE_OTHER_ARCH = re.compile(r"\s(?:-arch|--gpu-architecture|-code|--gpu-code)[= ]")


def check_gencode(build_dir: Path, archs: list[str]) -> dict:
    want = expected_gencodes(archs)
    lines = [ln for ln in run("ninja", "-C", str(build_dir), "-t", "commands").splitlines()
             if "nvcc" in ln and " -c " in ln and ".cu" in ln]
    problems = []
    for ln in lines:
        src = re.search(r"-c (\S+\.cu)\b", ln)
        name = src.group(1) if src else ln[:80]
        got = [(a, c) for a, codes in RE_GENCODE.findall(ln) for c in codes.split(",")]
        if sorted(got) != sorted(want) or len(got) != len(set(got)):
            problems.append(f"{name}: gencode {sorted(got)} != {sorted(want)}")
        if RE_OTHER_ARCH.search(ln):
            problems.append(f"{name}: extra architecture flag: {RE_OTHER_ARCH.search(ln).group(0).strip()}")
    if not lines:
        problems.append("no nvcc compile commands in the build (was CUDA enabled?)")
    return {"ok": not problems, "nvcc_commands": len(lines), "problems": problems}


# ---- 2. device code in the module ------------------------------------------------------------------
def parse_resource_usage(text: str) -> dict[str, dict[str, dict[str, dict[str, int]]]]:
    """cuobjdump --dump-resource-usage -> {arch: {source file: {mangled function: {REG:.., ...}}}}."""
    out: dict = {}
    arch = ident = fn = None
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("arch = "):
            arch, ident = s.split("=", 1)[1].strip(), None
        elif s.startswith("identifier = "):
            ident = s.split("=", 1)[1].strip()
            out.setdefault(arch, {}).setdefault(ident, {})
        elif s.startswith("Function ") and s.endswith(":"):
            fn = s[len("Function "):-1]
        elif fn and arch and ident and s.startswith("REG:"):
            out[arch][ident][fn] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", s)}
            fn = None
    return out


def check_elf(so: Path, cuobjdump: str, archs: list[str]) -> tuple[dict, dict]:
    want = {f"sm_{a}" for a in archs}
    problems = []
    elfs = re.findall(r"ELF file\s+\d+:\s+(\S+)", run(cuobjdump, "--list-elf", str(so)))
    elf_archs = {m.group(1) for e in elfs if (m := re.search(r"\.(sm_\w+)\.cubin$", e))}
    if elf_archs != want:
        problems.append(f"cubin archs {sorted(elf_archs)} != {sorted(want)}")
    ptx = subprocess.run([cuobjdump, "--list-ptx", str(so)], capture_output=True, text=True)
    if re.search(r"PTX file\s+\d+:", ptx.stdout):
        problems.append("the module embeds PTX (expected SASS only)")
    usage = parse_resource_usage(run(cuobjdump, "--dump-resource-usage", str(so)))
    files = sorted({f for a in usage.values() for f in a})
    for f in files:
        fns = {a: set(usage.get(a, {}).get(f, {})) for a in want}
        every = set().union(*fns.values())
        for a in sorted(want):
            missing = every - fns[a]
            if missing:
                problems.append(f"{Path(f).name}: {len(missing)} function(s) without {a} code, e.g. {sorted(missing)[0]}")
    kernels = {a: sum(len(v) for v in usage.get(a, {}).values()) for a in sorted(want)}
    if not files:
        problems.append("no device functions found (cuobjdump --dump-resource-usage)")
    return ({"ok": not problems, "cubins": sorted(elfs), "functions_per_arch": kernels, "sources": len(files),
             "problems": problems}, usage)


# ---- 3. undefined symbols --------------------------------------------------------------------------
def dynamic_symbols(lib: Path, undefined: bool) -> list[str]:
    flag = "--undefined-only" if undefined else "--defined-only"
    out = []
    for line in run("nm", "-D", flag, "--with-symbol-versions", str(lib)).splitlines():
        parts = line.split()
        if not parts:
            continue
        kind, name = (parts[-2], parts[-1]) if len(parts) >= 2 else ("U", parts[0])
        if undefined and kind in ("w", "v"):
            continue  # weak: may stay unresolved
        out.append(name)
    return out


def split_version(sym: str) -> tuple[str, str | None]:
    if "@" not in sym:
        return sym, None
    name, ver = sym.split("@", 1)
    return name, ver.lstrip("@")


def system_lib(name: str) -> Path | None:
    p = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return Path(p).resolve() if p and Path(p).is_file() else None


def python_exports() -> tuple[set[str], str]:
    """The Python C API this interpreter exports (libpython if shared, else the executable)."""
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    cand = Path(libdir or "", soname or "")
    target = cand if soname and cand.is_file() and ".so" in cand.name else Path(sys.executable).resolve()
    return {split_version(s)[0] for s in dynamic_symbols(target, undefined=False)}, str(target)


def max_versions(symbols: list[str]) -> dict[str, str]:
    best: dict[str, tuple[int, ...]] = {}
    for s in symbols:
        ver = split_version(s)[1]
        m = re.match(r"([A-Z]+)_([0-9.]+)$", ver or "")
        if m and m.group(1) in VERSIONED_NAMESPACES:
            v = tuple(int(x) for x in m.group(2).split(".") if x)
            if v > best.get(m.group(1), ()):
                best[m.group(1)] = v
    return {k: ".".join(map(str, v)) for k, v in sorted(best.items())}


def check_symbols(so: Path, torch_lib: Path, cudart: Path) -> dict:
    providers: dict[str, set[str]] = {}  # exported name and name@version -> provider files
    sources = sorted(p for p in torch_lib.iterdir() if ".so" in p.name and p.is_file()) + [cudart]
    # ld-linux exports __tls_get_addr, which any module reading a C++ thread_local of torch's headers needs
    system = ("libc.so.6", "libm.so.6", "libstdc++.so.6", "libgcc_s.so.1", "ld-linux-x86-64.so.2")
    sources += [p for n in system if (p := system_lib(n))]
    for lib in sources:
        for s in dynamic_symbols(lib, undefined=False):
            name, ver = split_version(s)
            providers.setdefault(name, set()).add(lib.name)
            if ver:
                providers.setdefault(f"{name}@{ver}", set()).add(lib.name)
    py_names, py_from = python_exports()
    undefined = dynamic_symbols(so, undefined=True)
    missing, python_api = [], []
    for s in undefined:
        name, ver = split_version(s)
        if name.startswith(("Py", "_Py")):
            python_api.append(name)
            if name not in py_names:
                missing.append(f"{s} (not exported by {py_from})")
        elif (f"{name}@{ver}" if ver else name) not in providers:
            missing.append(s)
    torch_needs: list[str] = []
    for lib in torch_lib.iterdir():
        if ".so" in lib.name and lib.is_file() and lib.name.startswith(("libtorch", "libc10")):
            torch_needs += dynamic_symbols(lib, undefined=True)
    needs, torch_max = max_versions(undefined), max_versions(torch_needs)
    newer = {k: v for k, v in needs.items()
             if tuple(map(int, v.split("."))) > tuple(map(int, torch_max.get(k, "0").split(".")))}
    return {"ok": not missing, "undefined": len(undefined), "missing": missing, "python_api": sorted(python_api),
            "checked_against": [p.name for p in sources] + [Path(py_from).name],
            "needs_versions": needs, "torch_needs_versions": torch_max, "needs_newer_than_torch": newer}


# ---- manifest --------------------------------------------------------------------------------------
def torch_version(torch_dir: Path) -> dict:
    text = (torch_dir / "version.py").read_text()
    get = lambda k: (re.search(rf"^{k}\b[^=]*=\s*'([^']*)'", text, re.M) or [None, None])[1]  # noqa: E731
    return {"version": get("__version__"), "cuda": get("cuda"), "git_version": get("git_version")}


def git(*args: str) -> str:
    p = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT)
    return p.stdout.strip() if p.returncode == 0 else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--so", type=Path, required=True)
    ap.add_argument("--build-dir", type=Path, required=True)
    ap.add_argument("--torch-dir", type=Path, required=True, help="the unpacked wheel's torch/ directory")
    ap.add_argument("--cudart", type=Path, required=True, help="libcudart.so.* torch's wheels ship")
    ap.add_argument("--cuobjdump", required=True)
    ap.add_argument("--archs", required=True, help='e.g. "80;90a"')
    ap.add_argument("--nvcc-release", default="")
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--wheels", nargs="*", default=[], type=Path)
    args = ap.parse_args()
    archs = [a for a in re.split(r"[;, ]+", args.archs) if a]

    checks = {"gencode": check_gencode(args.build_dir, archs)}
    checks["elf"], _ = check_elf(args.so, args.cuobjdump, archs)
    checks["symbols"] = check_symbols(args.so, args.torch_dir / "lib", args.cudart)
    tv = torch_version(args.torch_dir)
    data = args.so.read_bytes()
    manifest = {
        "module": args.so.name,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "torch": tv["version"],
        "torch_git": tv["git_version"],
        "cuda": tv["cuda"],
        "nvcc": args.nvcc_release,
        "archs": [f"sm_{a}" for a in archs],
        "python_abi": "abi3 (Py_LIMITED_API 3.10): loads on CPython >= 3.10",
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "built_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "build_host": f"{platform.system()} {platform.machine()}, {platform.libc_ver()[0]} {platform.libc_ver()[1]}",
        "wheels": [{"file": w.name, "bytes": w.stat().st_size} for w in args.wheels],
        "checks": checks,
    }
    args.manifest.write_text(json.dumps(manifest, indent=1) + "\n")

    ok = all(c["ok"] for c in checks.values())
    s = checks["symbols"]
    print(f"gencode : {'ok' if checks['gencode']['ok'] else 'FAILED'} ({checks['gencode']['nvcc_commands']} nvcc "
          f"commands, each exactly {', '.join(f'compute_{a}->sm_{a}' for a in archs)})")
    print(f"elf     : {'ok' if checks['elf']['ok'] else 'FAILED'} ({len(checks['elf']['cubins'])} cubins; functions "
          f"per arch {checks['elf']['functions_per_arch']}; no PTX)")
    print(f"symbols : {'ok' if s['ok'] else 'FAILED'} ({s['undefined']} undefined, {len(s['missing'])} not exported by "
          f"torch {tv['version']} / cudart / libc / libstdc++ / Python; needs {s['needs_versions']})")
    if s["needs_newer_than_torch"]:
        print(f"WARNING : the module needs newer system libraries than torch itself: {s['needs_newer_than_torch']} "
              f"(torch needs {s['torch_needs_versions']}); a GPU machine older than that cannot load it")
    for name, c in checks.items():
        for p in c.get("problems", []) + c.get("missing", []):
            print(f"  {name}: {p}", file=sys.stderr)
    print(f"manifest: {args.manifest} ({len(data) / 2**20:.1f} MiB module, sha256 {manifest['sha256'][:16]}…)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
