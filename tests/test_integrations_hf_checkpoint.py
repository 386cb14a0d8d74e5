"""Hugging Face 4-bit checkpoints: a state dict written by transformers + bitsandbytes (CPU) is read
into NF4Weights without bitsandbytes and written back byte-identically."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from hf_tiny import load_bnb_4bit, reference_weight, save_random_llama

from lora_ops.integrations.hf_checkpoint import (
    QUANT_STATE_SUFFIX,
    join_nf4_state_dict,
    load_nf4_checkpoint,
    save_nf4_checkpoint,
    split_nf4_state_dict,
)

pytest.importorskip("bitsandbytes", reason="CI installs bitsandbytes; these tests compare against it")


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().view(torch.uint8).numpy().tobytes()


@pytest.fixture(scope="module", params=[(True, torch.float32), (False, torch.bfloat16)],
                ids=["double_quant-fp32", "plain-bf16"])
def bnb_checkpoint(request, tmp_path_factory):
    """(directory of a 4-bit checkpoint saved by transformers, the bnb model it came from)."""
    double_quant, dtype = request.param
    root = tmp_path_factory.mktemp("ckpt")
    dense = save_random_llama(root / "dense", seed=int(torch.randint(0, 10_000, ())), dtype=dtype)
    model = load_bnb_4bit(dense, double_quant=double_quant, compute_dtype=dtype, dtype=dtype)
    model.save_pretrained(root / "nf4")
    return root / "nf4", model, double_quant


def test_split_join_is_byte_identical(bnb_checkpoint):
    _, model, double_quant = bnb_checkpoint
    sd = model.state_dict()
    weights, other = split_nf4_state_dict(sd)
    assert len(weights) == 2 * 7  # every projection of both layers
    assert all(w.nested == double_quant for w in weights.values())
    assert not any(k.endswith(QUANT_STATE_SUFFIX) for k in other)
    back = join_nf4_state_dict(weights, other)
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert _bytes(back[k]) == _bytes(v), k


def test_loaded_weights_dequantize_like_bitsandbytes(bnb_checkpoint):
    import bitsandbytes.functional as bnbf

    path, model, _ = bnb_checkpoint
    weights, _ = load_nf4_checkpoint(path)
    for name, mod in model.named_modules():
        if type(mod).__name__ != "Linear4bit":
            continue
        w = weights[name + ".weight"]
        assert torch.equal(w.dequantize(torch.float32).double(), reference_weight(mod)), name  # the spec oracle
        ref = bnbf.dequantize_4bit(mod.weight.data, mod.weight.quant_state)  # the witness (K % 64 == 0)
        assert w.shape == ref.shape and w.dtype == ref.dtype
        assert torch.equal(w.dequantize(), ref), name


def test_file_resave_is_byte_identical(bnb_checkpoint, tmp_path):
    path, _, _ = bnb_checkpoint
    weights, other = load_nf4_checkpoint(path)
    save_nf4_checkpoint(tmp_path / "resaved.safetensors", weights, other)
    assert (tmp_path / "resaved.safetensors").read_bytes() == (path / "model.safetensors").read_bytes()


def test_loads_without_bitsandbytes(bnb_checkpoint):
    """A fresh interpreter in which `import bitsandbytes` fails reads and dequantizes the checkpoint."""
    path, model, _ = bnb_checkpoint
    expected = model.model.layers[1].mlp.down_proj
    import bitsandbytes.functional as bnbf

    ref = bnbf.dequantize_4bit(expected.weight.data, expected.weight.quant_state).float()
    torch.save(ref, path.parent / "ref.pt")
    code = textwrap.dedent(f"""
        import sys
        sys.modules["bitsandbytes"] = None  # any import of it now raises ImportError
        import torch
        from lora_ops.integrations.hf_checkpoint import load_nf4_checkpoint
        weights, other = load_nf4_checkpoint({str(path)!r})
        w = weights["model.layers.1.mlp.down_proj.weight"].dequantize().float()
        ref = torch.load({str(path.parent / "ref.pt")!r})
        assert torch.equal(w, ref), (w - ref).abs().max()
        assert "bitsandbytes" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
        print("ok", len(weights), len(other))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("ok 14")


def test_rejects_fp4_and_incomplete_layers(bnb_checkpoint):
    _, model, _ = bnb_checkpoint
    sd = dict(model.state_dict())
    key = "model.layers.0.self_attn.q_proj.weight"
    broken = {k: v for k, v in sd.items() if k != key + ".absmax"}
    with pytest.raises(KeyError):
        split_nf4_state_dict(broken)
    fp4 = dict(sd)
    fp4[key + QUANT_STATE_SUFFIX] = torch.tensor(list(
        _bytes(sd[key + QUANT_STATE_SUFFIX]).decode().replace('"nf4"', '"fp4"').encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match="nf4"):
        split_nf4_state_dict(fp4)
    with pytest.raises(ValueError, match="both"):
        join_nf4_state_dict(split_nf4_state_dict(sd)[0], {key: sd[key]})


def test_checkpoint_into_qlora_layers_and_back(bnb_checkpoint, tmp_path):
    """The directory loads as a transformers model of QLoRALinear layers (no bitsandbytes code
    involved) that computes what the bitsandbytes model computes, and saves back byte-identically."""
    from lora_ops.integrations.hf_checkpoint import load_quantized_model, nf4_model_state_dict
    from lora_ops.nn import QLoRALinear

    path, bnb_model, _ = bnb_checkpoint
    model = load_quantized_model(path, r=4, lora_alpha=8)
    assert sum(isinstance(m, QLoRALinear) for m in model.modules()) == 14
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():  # B = 0: the adapters add nothing yet
        ours = model(input_ids=ids).logits.double()
        ref = _float64_model(bnb_model)(input_ids=ids).logits
        theirs = bnb_model(input_ids=ids).logits.double()  # the witness (kept off bnb's CPU repack)
    err, err_bnb = (ours - ref).abs().max(), (theirs - ref).abs().max()
    tol = 1e-4 if bnb_model.dtype == torch.float32 else 3e-2
    assert err <= tol * ref.abs().max(), err
    assert err <= 2 * err_bnb + 1e-5 * ref.abs().max(), (err, err_bnb)
    sd = nf4_model_state_dict(model)
    ref_sd = bnb_model.state_dict()
    assert sorted(sd) == sorted(ref_sd)
    for k in sd:
        assert _bytes(sd[k]) == _bytes(ref_sd[k]), k
    save_nf4_checkpoint(tmp_path / "m.safetensors", *split_nf4_state_dict(sd))
    assert (tmp_path / "m.safetensors").read_bytes() == (path / "model.safetensors").read_bytes()


def _float64_model(bnb_model):
    """The dense float64 model that the 4-bit one stands for: each Linear4bit replaced by its weight
    decoded by the spec oracle (reference.py), everything else cast to float64."""
    from transformers import LlamaForCausalLM

    twin = LlamaForCausalLM(bnb_model.config).to(torch.float64).eval()
    sd = {k: v.double() for k, v in bnb_model.state_dict().items() if v.is_floating_point() and k in twin.state_dict()}
    for name, mod in bnb_model.named_modules():
        if type(mod).__name__ == "Linear4bit":
            sd[name + ".weight"] = reference_weight(mod)
    twin.load_state_dict(sd, strict=True)
    return twin
