"""``python -m lora_ops serve-demo``: one NF4 base, several LoRA adapters, one mixed batch.

Builds the training demo's random tiny Llama (lora_ops.demo), quantizes it with lora_ops, builds several
PEFT adapters that differ in rank, alpha and target modules (random factors; saved with ``save_pretrained``
and loaded back with ``load_adapter``, as a server would), then generates greedily for a batch whose rows
name different adapters (and the base), and:
  - checks every row against generating that row alone with its adapter (PEFT's single-adapter path);
  - counts the ops of one mixed forward (every LoRA layer one ``lora_ops::multi_lora_linear``);
  - prints tokens/s of: the fused per-row path (PEFT's ``adapter_names=`` over lora_ops), PEFT's own mixed
    batch over the same lora_ops base, PEFT's mixed batch over bitsandbytes (when installed), and one batch
    per adapter; and the memory each added adapter takes.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import torch

ADAPTERS = {  # name: LoraConfig arguments (differing ranks, alphas and target modules)
    "sql": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "chat": dict(r=16, lora_alpha=16, target_modules="all-linear"),
    "code": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "math": dict(r=32, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"]),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lora_ops serve-demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="small", choices=("ci", "small", "medium"),
                   help="the demo model's size (lora_ops.demo.SIZES)")
    p.add_argument("--batch", type=int, default=10, help="prompts in the mixed batch")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=12)
    p.add_argument("--repeats", type=int, default=3, help="timed generations per method (median)")
    p.add_argument("--seed", type=int, default=0)
    return p


def _quantized(dense_dir: Path):
    from transformers import LlamaForCausalLM

    import lora_ops

    model = LlamaForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    return lora_ops.quantize_model(model, progress=False).eval()


def _build_adapters(dense_dir: Path, root: Path, seed: int) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model

    dirs = {}
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        pm = get_peft_model(_quantized(dense_dir), LoraConfig(lora_dropout=0.0, **kw))
        g = torch.Generator().manual_seed(seed * 100 + i)
        with torch.no_grad():
            for pname, p in pm.named_parameters():
                if "lora_" in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * (0.05 if "lora_B" in pname else 0.2))
        pm.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


def _peft_with_adapters(base, dirs: dict[str, Path]):
    from peft import PeftModel

    names = list(dirs)
    model = PeftModel.from_pretrained(base, dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(dirs[name], adapter_name=name)
    return model.eval()


@contextlib.contextmanager
def _peft_own_mixed_batch():
    """LoraOpsLinear runs PEFT's own ``_mixed_batch_forward`` (gather / two GEMMs / scatter per adapter)."""
    from peft.tuners.lora.layer import Linear as PeftLoraLinear

    from lora_ops.integrations.peft_native import LoraOpsLinear

    LoraOpsLinear._mixed_batch_forward = PeftLoraLinear._mixed_batch_forward
    try:
        yield
    finally:
        del LoraOpsLinear._mixed_batch_forward


def _timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], out


def run(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    from lora_ops.demo import build_dense_model, make_config

    torch.manual_seed(args.seed)
    cfg = make_config(args.size, "cpu", seed=args.seed)
    names = [*ADAPTERS, "__base__"]
    rows = [names[i % len(names)] for i in range(args.batch)]
    gen = torch.Generator().manual_seed(args.seed + 7)
    prompts = torch.randint(0, cfg.vocab, (args.batch, args.prompt_len), generator=gen)
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
              pad_token_id=cfg.vocab + 1)  # the demo BOS id: never in a prompt, so no padding is inferred
    n_tokens = args.batch * args.new_tokens
    result: dict = {"size": args.size, "batch": args.batch, "rows": rows, "new_tokens": args.new_tokens}

    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        root = Path(tmp)
        dense = build_dense_model(cfg)
        dense.config.use_cache = True
        dense.save_pretrained(root / "dense")
        del dense
        t0 = time.perf_counter()
        dirs = _build_adapters(root / "dense", root, args.seed)
        ranks = ", ".join(f"{n}: r={a['r']}" for n, a in ADAPTERS.items())
        print(f"built {len(dirs)} PEFT adapters ({ranks}) in {time.perf_counter() - t0:.1f} s")

        model = _peft_with_adapters(_quantized(root / "dense"), dirs)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(input_ids=prompts, adapter_names=rows)
        ev = [e.name for e in prof.events()]
        n_layers = sum(1 for m in model.modules() if type(m).__name__ == "LoraOpsLinear")
        counts = {"lora_ops::multi_lora_linear": ev.count("lora_ops::multi_lora_linear"),
                  "lora_ops::qlora_linear": ev.count("lora_ops::qlora_linear"), "LoRA layers": n_layers}
        print(f"ops in one mixed forward: {counts}")
        result["op_counts"] = counts

        t_fused, out = _timed(lambda: model.generate(input_ids=prompts, adapter_names=rows, **kw),
                              args.repeats)
        mismatches = []
        for b, name in enumerate(rows):
            if name == "__base__":
                with model.disable_adapter():
                    single = model.generate(input_ids=prompts[b : b + 1], **kw)
            else:
                model.set_adapter(name)
                single = model.generate(input_ids=prompts[b : b + 1], **kw)
            if not torch.equal(out[b], single[0]):
                mismatches.append((b, name))
        print(f"rows equal to single-adapter generation: {args.batch - len(mismatches)}/{args.batch}"
              + (f" (differ: {mismatches})" if mismatches else ""))
        result["rows_equal"] = args.batch - len(mismatches)

        with _peft_own_mixed_batch():
            t_peft, out_peft = _timed(lambda: model.generate(input_ids=prompts, adapter_names=rows, **kw),
                                      args.repeats)
        result["peft_mixed_rows_equal"] = int(sum(torch.equal(a, b) for a, b in zip(out, out_peft)))

        def per_adapter():
            for name in dict.fromkeys(rows):
                idx = [i for i, n in enumerate(rows) if n == name]
                if name == "__base__":
                    with model.disable_adapter():
                        model.generate(input_ids=prompts[idx], **kw)
                else:
                    model.set_adapter(name)
                    model.generate(input_ids=prompts[idx], **kw)

        t_each, _ = _timed(per_adapter, args.repeats)

        per_adapter_bytes = {n: sum(p.numel() * p.element_size() for pn, p in model.named_parameters()
                                    if f".{n}." in pn) for n in ADAPTERS}
        t_bnb = None
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig, LlamaForCausalLM

            bnb_cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                         bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
            bnb_base = LlamaForCausalLM.from_pretrained(root / "dense", quantization_config=bnb_cfg,
                                                        device_map="cpu", dtype=torch.float32)
            bnb_model = _peft_with_adapters(bnb_base, dirs)
            t_bnb, _ = _timed(lambda: bnb_model.generate(input_ids=prompts, adapter_names=rows, **kw),
                              args.repeats)
        except Exception as e:  # not installed, or its CPU path rejects these shapes: the others still count
            print(f"(PEFT on bitsandbytes skipped: {type(e).__name__}: {e})")

    table = [("fused per-row (lora_ops multi_lora_linear, PEFT adapter_names)", t_fused),
             ("PEFT's own mixed batch, lora_ops base", t_peft),
             ("PEFT's mixed batch, bitsandbytes base", t_bnb),
             ("one batch per adapter, lora_ops base", t_each)]
    print(f"\n{args.batch} prompts x {args.new_tokens} new tokens, adapters per row: {rows}")
    for label, t in table:
        print(f"  {label:64s} " + (f"{n_tokens / t:8.1f} tokens/s ({t * 1e3:.0f} ms)" if t else "n/a"))
    print("memory per added adapter (PEFT parameters): "
          + ", ".join(f"{n} {b / 1024:.0f} KiB" for n, b in per_adapter_bytes.items()))
    result.update(tokens_per_s={label: (n_tokens / t if t else None) for label, t in table},
                  adapter_bytes=per_adapter_bytes)
    ok = result["rows_equal"] == args.batch and counts["lora_ops::multi_lora_linear"] == n_layers
    print("serve-demo: " + ("OK" if ok else "FAILED"))
    if not ok:
        raise SystemExit(1)
    return result
