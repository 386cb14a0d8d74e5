"""``python -m lora_ops <command> [options]``; ``python -m lora_ops <command> --help`` for a command's options."""

from __future__ import annotations

import argparse
import importlib
import sys

# command: (module with run(argv), one-line help)
_COMMANDS = {
    "demo": ("lora_ops.demo", ("the end-to-end QLoRA fine-tune (random tiny Llama, copy task) next to "
                               "bitsandbytes + PEFT; --ci is the reduced CI run")),
    "serve-demo": ("lora_ops.serve_demo", ("several LoRA adapters on one NF4 base in one mixed batch: rows "
                                           "checked against single-adapter runs, tokens/s next to PEFT")),
    "env": ("lora_ops.env", "this machine: CPU model and SIMD, the kernel paths chosen, bitsandbytes' CPU paths"),
    "report": ("lora_ops.report", "the benchmark report (storage, fused linear, optimizer) from a source checkout"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lora_ops", description="lora_ops command-line tools.",
                                epilog="Run `python -m lora_ops COMMAND --help` for a command's options.")
    sub = p.add_subparsers(dest="command", metavar="command", required=True)
    for name, (_, help_text) in _COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)  # the command's own parser prints its help
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, rest = _parser().parse_known_args(argv[:1])  # unknown command: argparse's error, exit 2
    module = importlib.import_module(_COMMANDS[args.command][0])
    module.run(argv[1:] + rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
