"""`FusedLoraLinear` (LoRA's product accumulated in place into the frozen layer's output) computes what peft's
LoRA `Linear` computes, with the same parameters, and hands every case it does not cover back to peft."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer
from transformers import AutoModelForCausalLM

from lmtune.model.fused_lora import FusedLoraLinear, fuse_lora_layers

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(tiny_dir, dtype=torch.float32, dropout=0.0):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=dtype)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS, init_lora_weights=False)
    return get_peft_model(model, config)


def use_fused(model, fused: bool) -> None:
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.__class__ = FusedLoraLinear if fused else LoraLinear


def loss_and_grads(model, ids, autocast: bool = False):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_fused_layers_match_peft_in_fp32_with_the_same_parameters(tiny_dir):
    model = lora_model(tiny_dir)
    names = {n: p.shape for n, p in model.state_dict().items()}
    ids = torch.randint(0, model.config.vocab_size, (3, 21))
    peft_loss, peft_grads = loss_and_grads(model, ids)
    layers = model.get_base_model().config.num_hidden_layers
    assert fuse_lora_layers(model) == layers * len(TARGETS)
    assert {n: p.shape for n, p in model.state_dict().items()} == names  # checkpoints and exports unchanged
    fused_loss, fused_grads = loss_and_grads(model, ids)
    torch.testing.assert_close(fused_loss, peft_loss, rtol=1e-6, atol=1e-6)
    assert set(fused_grads) == set(peft_grads) and any("lora_A" in n for n in fused_grads)
    for name, grad in peft_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_fused_layers_under_bf16_autocast_keep_fp32_adapters_and_match_peft(tiny_dir):
    """A bf16 frozen base, fp32 adapters, bf16 autocast (bf16-mixed): the same loss and gradients within bf16
    rounding, gradients in fp32."""
    model = lora_model(tiny_dir, dtype=torch.bfloat16)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    ids = torch.randint(0, model.config.vocab_size, (3, 21))
    results = {}
    for fused in (False, True):
        use_fused(model, fused)
        results[fused] = loss_and_grads(model, ids, autocast=True)
    (peft_loss, peft_grads), (fused_loss, fused_grads) = results[False], results[True]
    torch.testing.assert_close(fused_loss, peft_loss, rtol=2e-2, atol=2e-2)
    for name, grad in peft_grads.items():
        assert fused_grads[name].dtype == torch.float32
        cosine = torch.nn.functional.cosine_similarity(fused_grads[name].flatten(), grad.flatten(), dim=0)
        assert cosine > 0.99, name


def test_what_the_fused_path_does_not_cover_runs_peft_forward(tiny_dir):
    ids = torch.randint(0, 100, (2, 9))
    plain = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    model = lora_model(tiny_dir).eval()
    fuse_lora_layers(model)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    x = torch.randn(2, 9, layer.in_features)
    assert isinstance(layer, FusedLoraLinear) and layer._fusable_adapter(x, (), {}) == "default"
    with torch.no_grad():
        with model.disable_adapter():  # adapters off: exactly the base model
            assert layer._fusable_adapter(x, (), {}) is None
            torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits)
        assert layer._fusable_adapter(x.double(), (), {}) is None  # mixed dtypes without autocast: peft's rules
        adapted = model(input_ids=ids).logits
        merged = model.merge_and_unload()  # the export's merge sees ordinary LoRA weights
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)
    with_dropout = lora_model(tiny_dir, dropout=0.1)
    fuse_lora_layers(with_dropout)
    layer = with_dropout.get_base_model().model.layers[0].self_attn.q_proj
    assert layer._fusable_adapter(x, (), {}) is None


@pytest.mark.parametrize("adapter", ["lora", "qlora"])
def test_load_model_fuses_plain_lora_layers_only(tiny_dir, adapter):
    from lmtune.model.loading import load_model

    quant = {"quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"} if adapter == "qlora" else None
    adapter_cfg = {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": TARGETS, "quantization": quant}
    model = load_model(tiny_dir, {"dtype": "float32"}, adapter_cfg, torch.device("cpu"))
    fused = [m for m in model.modules() if isinstance(m, FusedLoraLinear)]
    if adapter == "lora":
        assert len(fused) == model.get_base_model().config.num_hidden_layers * len(TARGETS)
    else:  # 4-bit bases keep peft's bitsandbytes layer
        assert not fused and any(isinstance(m, LoraLayer) for m in model.modules())
