"""What every JSON of the GPU check carries, and how it is written (scripts/gpu_check.sh, gpu_smoke.py,
gpu_microbench.py): the machine, the software and the commit asked for (LORA_OPS_COMMIT; the device copy
has no .git), written atomically so a run killed mid-write leaves the previous complete file."""

from __future__ import annotations

import json
import os
import subprocess

import torch


def run_info(device: torch.device) -> dict:
    info = {"commit": os.environ.get("LORA_OPS_COMMIT") or None, "torch": torch.__version__,
            "cuda": torch.version.cuda, "device": "cpu"}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(device=torch.cuda.get_device_name(device), sms=p.multi_processor_count,
                    l2_bytes=getattr(p, "L2_cache_size", None), memory_bytes=p.total_memory)
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,clocks.mem",
                                "--format=csv,noheader", "-i", str(device.index or 0)],
                               capture_output=True, text=True, timeout=20)
            info["driver_and_clocks"] = q.stdout.strip() or q.stderr.strip()
        except (OSError, subprocess.SubprocessError) as e:
            info["driver_and_clocks"] = f"nvidia-smi: {e}"
    return info


def write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
