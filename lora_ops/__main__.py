"""``python -m lora_ops <command>``:

    demo     the end-to-end QLoRA fine-tune (lora_ops.demo); ``demo --ci`` is the reduced CI run
    env      this machine: CPU model and SIMD, the kernel paths chosen, bitsandbytes' CPU paths
    report   the benchmark report: storage, fused linear, optimizer (bench/report.py)
"""

from __future__ import annotations

import sys

_COMMANDS = ("demo", "env", "report")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in _COMMANDS:
        print(__doc__.strip())
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        from lora_ops import demo

        demo.run(rest)
    elif cmd == "env":
        from lora_ops import env

        env.run(rest)
    else:
        from lora_ops import report

        report.run(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
