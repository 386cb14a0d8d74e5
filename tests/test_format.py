"""lora_ops/format.py (the library's statement of the format facts) against the C++ statement of the same
facts (csrc/kernels/common/nf4_format.h, qlora_params.h), and the rule that the library never imports
its test oracle (lora_ops/reference.py imports format, not the other way round)."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lora_ops import format as fmt

ROOT = Path(__file__).resolve().parent.parent
COMMON = ROOT / "csrc" / "kernels" / "common"


def _cpp_int(header: str, name: str) -> int:
    m = re.search(rf"constexpr\s+\w+\s+{name}\s*=\s*(\d+)\s*;", (COMMON / header).read_text())
    assert m is not None, f"{name} not found in {header}"
    return int(m.group(1))


def test_cpp_states_the_same_facts():
    assert _cpp_int("nf4_format.h", "kNestedBlocksize") == fmt.NESTED_BLOCKSIZE
    assert _cpp_int("nf4_format.h", "kNf4ZeroCode") == fmt.NF4_ZERO_CODE
    assert _cpp_int("nf4_format.h", "kDynamicMapZeroCode") == fmt.DYNAMIC_MAP_ZERO_CODE
    assert _cpp_int("nf4_format.h", "kDynamicMapSize") == fmt.dynamic_map().numel()
    assert _cpp_int("qlora_params.h", "kMaxLoraRank") == fmt.MAX_LORA_RANK
    text = (COMMON / "nf4_format.h").read_text()
    literals = dict(re.findall(r"#define LORA_OPS_NF4_C(\d+) \(([-+0-9a-fx.p]+)f\)", text))
    cpp_codebook = [float.fromhex(literals[str(i)]) if "x" in literals[str(i)] else float(literals[str(i)])
                    for i in range(16)]
    assert cpp_codebook == fmt.NF4_CODEBOOK.tolist()
    body = re.search(r"nf4_valid_blocksize\(int64_t b\) \{\s*return ([^;]+);", text).group(1)
    assert tuple(int(v) for v in re.findall(r"b == (\d+)", body)) == fmt.BLOCKSIZES


def test_dynamic_map_is_the_zero_and_one_of_the_format_and_fresh_per_call():
    d = fmt.dynamic_map()
    assert d[fmt.DYNAMIC_MAP_ZERO_CODE].item() == 0.0 and d[-1].item() == 1.0
    d[0] = 5.0  # a caller may modify its copy ...
    assert fmt.dynamic_map()[0].item() < 0  # ... without changing the next one


def test_cpp_dynamic_map_matches_the_library_map(tmp_path):
    """nf4_fill_dynamic_map (host-side checks) builds the same map up to the last bits of some entries:
    it uses torch's scalar linspace formula, torch.linspace its vectorized one (base + lane * step), so
    each of the two points a midpoint averages may differ by one ulp."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("needs g++")
    src = tmp_path / "dyn.cpp"
    src.write_text('#include <cstdio>\n#include "common/nf4_format.h"\n'
                   "int main() { float v[lora_ops::kDynamicMapSize]; lora_ops::nf4_fill_dynamic_map(v);\n"
                   '  for (float x : v) std::printf("%a\\n", x); }\n')
    exe = tmp_path / "dyn"
    build = subprocess.run([cxx, "-std=c++17", "-O1", "-ffp-contract=off", f"-I{ROOT / 'csrc' / 'kernels'}", str(src),
                            "-o", str(exe)], capture_output=True, text=True, check=False)
    assert build.returncode == 0, build.stderr[-3000:]
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()
    cpp = torch.tensor([float.fromhex(v) for v in out], dtype=torch.float32)
    lib = fmt.dynamic_map()
    assert cpp.shape == lib.shape
    assert (cpp[1:] > cpp[:-1]).all()
    assert cpp[fmt.DYNAMIC_MAP_ZERO_CODE].item() == 0.0 and cpp[-1].item() == 1.0
    # at most two float32 ulps apart, entry by entry
    ulp = torch.nextafter(lib.abs(), torch.tensor(float("inf"))) - lib.abs()
    assert ((cpp - lib).abs() <= 2 * ulp).all(), ((cpp - lib).abs() / ulp).max()


def test_no_library_module_imports_the_oracle():
    offenders = []
    for path in sorted((ROOT / "lora_ops").rglob("*.py")):
        if path.name == "reference.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{a.name}" for a in node.names] + [node.module or ""]
            if any(n == "lora_ops.reference" or n.endswith(".reference") or n == "reference" for n in names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == [], offenders
