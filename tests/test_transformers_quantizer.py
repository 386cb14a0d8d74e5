"""from_pretrained(..., quantization_config=lora_ops.NF4Config()): a sharded dense checkpoint quantized while
loading into NF4Linear layers; save_pretrained -> from_pretrained byte-exact; bitsandbytes checkpoints
loaded without bitsandbytes; bad inputs refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from hf_tiny import float64_twin, reference_weight, tiny_llama_config
from no_bnb import run_without_bnb
from safetensors.torch import load_file
from torch import nn

import lora_ops
from lora_ops import NF4Linear, quantize_nf4
from lora_ops.integrations.transformers_quantizer import SERIALIZED_NAMES, NF4Config, bnb_checkpoint_config
from lora_ops.nf4_tensor import NF4Tensor

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaForCausalLM

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


def _checkpoint(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    """A random tiny Llama saved in bf16 as at least 3 safetensors shards."""
    path = tmp_path_factory.mktemp("dense")
    torch.manual_seed(int(torch.randint(0, 10_000, ())))
    model = LlamaForCausalLM(tiny_llama_config()).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path, max_shard_size="50KB")
    assert len(list(path.glob("model-*.safetensors"))) >= 3
    return path


def _load(path, **config):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=NF4Config(**config), dtype=torch.bfloat16,
                                                device_map="cpu")


@pytest.mark.parametrize("double_quant,blocksize", [(True, 64), (False, 128)])
def test_quantized_while_loading_is_quantize_nf4_of_the_checkpoint(dense_ckpt, double_quant, blocksize):
    model = _load(dense_ckpt, double_quant=double_quant, blocksize=blocksize)
    ckpt = _checkpoint(dense_ckpt)
    nf4 = {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    assert sorted(nf4) == sorted(f"model.layers.{i}.{'self_attn' if p.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{p}"
                                 for i in range(2) for p in LINEARS)
    assert type(model.lm_head) is nn.Linear and torch.equal(model.lm_head.weight, ckpt["lm_head.weight"])
    for name, m in nf4.items():
        assert isinstance(m.weight, NF4Tensor) and not m.weight.requires_grad and m.base_loaded
        want = quantize_nf4(ckpt[name + ".weight"], blocksize, double_quant)
        for k, v in want.tensors().items():
            got = m.weight.tensors()[k]
            assert (got is None) == (v is None) and (v is None or _bytes(got) == _bytes(v)), (name, k)
    for key in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.1.input_layernorm.weight"):
        assert torch.equal(model.get_parameter(key), ckpt[key]), key
    # Every parameter is visible (NF4 bases frozen), counted as the dense elements, without bitsandbytes.
    assert model.is_loaded_in_4bit and model.num_parameters() == sum(v.numel() for v in ckpt.values())
    assert {n for n, p in model.named_parameters() if isinstance(p, NF4Tensor)} == {n + ".weight" for n in nf4}


def test_logits_match_a_float64_model_of_the_dequantized_weights(dense_ckpt):
    model = _load(dense_ckpt).eval()
    twin = float64_twin(model)
    plain = LlamaForCausalLM(model.config).to(torch.bfloat16).eval()  # plain PyTorch in the same dtype
    plain.load_state_dict({k: v.to(torch.bfloat16) for k, v in twin.state_dict().items()})
    ids = torch.randint(0, model.config.vocab_size, (3, 11))
    with torch.no_grad():
        ours, ref, theirs = (m(input_ids=ids).logits.double() for m in (model, twin, plain))
    err, err_plain = (ours - ref).abs().max(), (theirs - ref).abs().max()
    assert err <= 2 * err_plain + 2**-8 * ref.abs().max(), (err, err_plain)


def test_save_pretrained_round_trip_is_byte_exact(dense_ckpt, tmp_path):
    model = _load(dense_ckpt, compute_dtype=torch.float32).eval()
    model.save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "lora_ops" and cfg["compute_dtype"] == "float32" and not cfg.get("load_in_4bit")
    saved = _checkpoint(tmp_path / "a")
    for i in range(2):
        for p in LINEARS:
            name = next(n for n in saved if n.endswith(f"layers.{i}.{'self_attn' if 'proj' in p and p[0] in 'qkvo' else 'mlp'}.{p}.weight"))
            have = {k.removeprefix(name) for k in saved if k.startswith(name)}
            assert have == {n.removeprefix("weight") for n in SERIALIZED_NAMES if "fp4" not in n}, name
            # the bitsandbytes entries, byte for byte what NF4Weight writes for the layer
            want = model.get_submodule(name.removesuffix(".weight")).weight.hf_state_dict(name)
            assert all(_bytes(saved[k]) == _bytes(v) for k, v in want.items()), name
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "a", device_map="cpu").eval()  # no config argument
    assert isinstance(again.model.layers[0].mlp.up_proj, NF4Linear)
    assert again.model.layers[0].mlp.up_proj.compute_dtype == torch.float32
    a, b = model.state_dict(), again.state_dict()
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and _bytes(a[k]) == _bytes(b[k]), k
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)
    again.save_pretrained(tmp_path / "b")  # a reloaded model saves again (no reverse op is missing)
    resaved = _checkpoint(tmp_path / "b")
    assert sorted(resaved) == sorted(saved) and all(_bytes(resaved[k]) == _bytes(saved[k]) for k in saved)


def test_modules_to_not_convert_and_registration(dense_ckpt):
    model = _load(dense_ckpt, modules_to_not_convert=["mlp", "layers.1.self_attn.q_proj"])
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert kinds["model.layers.0.mlp.up_proj"] == "Linear" and kinds["model.layers.1.self_attn.q_proj"] == "Linear"
    assert kinds["model.layers.0.self_attn.q_proj"] == "NF4Linear" and kinds["model.layers.1.self_attn.k_proj"] == "NF4Linear"
    from transformers.quantizers import auto

    from lora_ops.integrations import transformers_quantizer

    transformers_quantizer.register()  # idempotent
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["lora_ops"] is NF4Config and lora_ops.NF4Config is NF4Config


def test_bad_configs_and_disk_offload_are_refused(dense_ckpt):
    with pytest.raises(ValueError, match="blocksize"):
        NF4Config(blocksize=48)
    with pytest.raises(ValueError, match="compute_dtype"):
        NF4Config(compute_dtype="int8")
    with pytest.raises(TypeError, match="unknown arguments"):
        NF4Config(load_in_4bit=True)
    with pytest.raises(ValueError, match="'fp4'"):
        NF4Config(quant_type="fp4")
    with pytest.raises(TypeError, match="modules_to_not_convert"):
        NF4Config(modules_to_not_convert="lm_head")
    device_map = {"model.embed_tokens": "cpu", "model.layers": "cpu", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "disk"}
    with pytest.raises(ValueError, match="disk offload is not supported"):
        AutoModelForCausalLM.from_pretrained(dense_ckpt, quantization_config=NF4Config(), device_map=device_map,
                                             offload_folder=str(dense_ckpt.parent / "off"))


def test_gpt2_conv1d_layers_are_quantized_transposed(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(int(torch.randint(0, 10_000, ())))
    dense = GPT2LMHeadModel(GPT2Config(vocab_size=80, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                                                 bos_token_id=0, eos_token_id=0)).eval()
    dense.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=NF4Config(), dtype=torch.float32,
                                                 device_map="cpu").eval()
    convs = {n: m for n, m in dense.named_modules() if isinstance(m, Conv1D)}
    assert convs and all(isinstance(model.get_submodule(n), NF4Linear) for n in convs)
    for n, conv in convs.items():
        want = quantize_nf4(conv.weight.detach().t().contiguous())
        assert _bytes(model.get_submodule(n).weight.packed) == _bytes(want.packed.reshape(-1)), n
    # The model computes with W = dequant(NF4(Conv1D weight^T)): compare with the dense model given those.
    ref = GPT2LMHeadModel(dense.config).double().eval()
    sd = {k: v.double() for k, v in dense.state_dict().items() if v.is_floating_point()}
    for n in convs:
        sd[n + ".weight"] = reference_weight(model.get_submodule(n)).t()  # the spec oracle's decode
    ref.load_state_dict(sd, strict=False)
    plain = GPT2LMHeadModel(dense.config).eval()
    plain.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    ids = torch.randint(0, 80, (2, 10))
    with torch.no_grad():
        ours, want, theirs = (m(input_ids=ids).logits.double() for m in (model, ref, plain))
    assert (ours - want).abs().max() <= 2 * (theirs - want).abs().max() + 1e-5 * want.abs().max()


@pytest.fixture(scope="module")
def bnb_ckpt(tmp_path_factory, dense_ckpt):
    """The dense checkpoint loaded by transformers + bitsandbytes NF4 on the CPU and saved."""
    pytest.importorskip("bitsandbytes", reason="CI installs bitsandbytes; it writes the checkpoint read here")
    from hf_tiny import load_bnb_4bit

    path = tmp_path_factory.mktemp("bnb")
    model = load_bnb_4bit(dense_ckpt, double_quant=True, compute_dtype=torch.bfloat16, dtype=torch.bfloat16)
    model.save_pretrained(path)
    return path


def test_bitsandbytes_checkpoint_loads_without_bitsandbytes(bnb_ckpt, tmp_path):
    """One call: from_pretrained(path, config=bnb_checkpoint_config(path)); the bases are bitsandbytes'
    bytes, saving writes the same entries back, and fp4 / 8-bit are refused by name."""
    out = run_without_bnb(f"""
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        import lora_ops
        path = {str(bnb_ckpt)!r}
        model = AutoModelForCausalLM.from_pretrained(path, config=lora_ops.bnb_checkpoint_config(path),
                                                     device_map="cpu")
        ckpt = load_file(path + "/model.safetensors")
        sd = model.hf_quantizer.get_state_dict_and_metadata(model)[0]
        assert sorted(sd) == sorted(ckpt), sorted(set(sd) ^ set(ckpt))
        for k, v in ckpt.items():
            assert sd[k].dtype == v.dtype and torch.equal(sd[k].view(torch.uint8), v.view(torch.uint8)), k
        n_nf4 = sum(type(m).__name__ == "NF4Linear" for m in model.modules())
        model.save_pretrained({str(tmp_path / "resaved")!r})
        print("ok", n_nf4, model.num_parameters() > 0)
    """)
    assert out.strip().endswith("ok 14 True"), out
    resaved = _checkpoint(tmp_path / "resaved")
    ckpt = _checkpoint(bnb_ckpt)
    assert sorted(resaved) == sorted(ckpt) and all(_bytes(resaved[k]) == _bytes(ckpt[k]) for k in ckpt)
    cfg = json.loads((tmp_path / "resaved" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "lora_ops" and not cfg.get("load_in_4bit")


def test_fp4_and_8bit_checkpoints_are_refused_by_name(bnb_ckpt, tmp_path):
    cfg = json.loads((bnb_ckpt / "config.json").read_text())
    for change, why in (({"bnb_4bit_quant_type": "fp4"}, "'fp4'"), ({"load_in_4bit": False, "load_in_8bit": True},
                                                                   "8-bit")):
        folder = tmp_path / why.strip("'")
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**cfg, "quantization_config": {**cfg["quantization_config"],
                                                                                        **change}}))
        with pytest.raises(ValueError, match=why):
            bnb_checkpoint_config(folder)
    # fp4 entries in the tensors themselves (the config claiming nf4): refused while loading.
    from safetensors.torch import save_file

    sd = {k.replace("bitsandbytes__nf4", "bitsandbytes__fp4"): v for k, v in load_file(bnb_ckpt / "model.safetensors").items()}
    (tmp_path / "fp4_tensors").mkdir()
    save_file(sd, str(tmp_path / "fp4_tensors" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "fp4_tensors" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="fp4"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "fp4_tensors", config=bnb_checkpoint_config(tmp_path / "fp4_tensors"),
                                             device_map="cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and lora_ops.WITH_CUDA), reason="needs a GPU build and a GPU")
@pytest.mark.parametrize("device_map", ["cuda", "auto"])
def test_cuda_device_map_quantizes_on_the_gpu_like_the_cpu(dense_ckpt, device_map):
    """Each weight is quantized where the loader puts it (the GPU): the same bytes as the CPU load."""
    gpu = AutoModelForCausalLM.from_pretrained(dense_ckpt, quantization_config=NF4Config(), dtype=torch.bfloat16,
                                               device_map=device_map).eval()
    cpu = _load(dense_ckpt).eval()
    for name, m in cpu.named_modules():
        if isinstance(m, NF4Linear):
            g = gpu.get_submodule(name)
            assert g.weight.device.type == "cuda", name
            for k, v in m.weight.tensors().items():
                if v is not None:
                    assert _bytes(g.weight.tensors()[k].cpu()) == _bytes(v), (name, k)
    twin = float64_twin(cpu)  # the same bytes: the same float64 model
    plain = LlamaForCausalLM(cpu.config).to(torch.bfloat16).eval()
    plain.load_state_dict({k: v.to(torch.bfloat16) for k, v in twin.state_dict().items()})
    ids = torch.randint(0, cpu.config.vocab_size, (2, 9))
    with torch.no_grad():
        ours = gpu(input_ids=ids.cuda()).logits.double().cpu()
        ref, theirs = (m(input_ids=ids).logits.double() for m in (twin, plain))
    assert (ours - ref).abs().max() <= 2 * (theirs - ref).abs().max() + 2**-8 * ref.abs().max()
