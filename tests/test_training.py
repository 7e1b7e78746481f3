"""Training on the tiny model with a real Trainer: adapters learn, the base stays frozen, overfit, resume, export."""

import json

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import ROOT, SnapshotAtFitStart, compose_train
from helpers.chats import write_chats
from lmtune.evaluation.predictor import Row
from lmtune.model.module import NonFiniteLossError
from lmtune.model.scoring import rank_scores
from lmtune.training.train import train


@pytest.mark.parametrize("checkpointing", [False, True, "mlp"], ids=["plain", "gradient_checkpointing", "mlp"])
def test_lora_b_learns_and_base_stays_frozen(tmp_path, cache_dir, checkpointing):
    cfg = compose_train(
        [
            "experiment=smoke",
            "logger=none",
            "callbacks=none",
            "trainer.max_steps=3",
            "trainer.val_check_interval=3",
            f"model.gradient_checkpointing={checkpointing}",
            "+callbacks.snapshot._target_=conftest.SnapshotAtFitStart",
        ],
        tmp_path,
        cache_dir,
    )
    _, objects = train(cfg)
    module = objects["module"]
    (before,) = [c for c in objects["trainer"].callbacks if isinstance(c, SnapshotAtFitStart)]
    assert before.checkpointing == checkpointing
    after = module.trainable_state_dict()
    lora_b = [k for k in after if "lora_B" in k]
    assert lora_b and set(after) == set(before.trainable) and all("lora_" in k for k in after)
    assert all(before.trainable[k].abs().sum() == 0 for k in lora_b)  # LoRA-B starts at zero
    assert all(after[k].abs().sum() > 0 for k in lora_b), "some LoRA-B weights never moved"
    # only trainable parameters went to the optimizer
    optimized = [p for group in objects["trainer"].optimizers[0].param_groups for p in group["params"]]
    assert {id(p) for p in optimized} == {id(p) for p in module.parameters() if p.requires_grad}
    frozen_after = {k: v for k, v in module.model.state_dict().items() if k in before.frozen}
    assert len(frozen_after) == len(before.frozen) > 0
    assert all(torch.equal(frozen_after[k], v) for k, v in before.frozen.items())


def test_every_lora_b_gets_a_gradient_with_gradient_checkpointing(tmp_path, cache_dir):
    import hydra

    from lmtune.model.loading import load_tokenizer, resolve_pretrained
    from lmtune.model.module import CausalLMClassifier
    from lmtune.training.config import resolve_auto
    from lmtune.training.train import _plain

    cfg = compose_train(["experiment=smoke", "model.gradient_checkpointing=true"], tmp_path, cache_dir)
    resolve_auto(cfg)
    pretrained = resolve_pretrained(cfg.model, cache_dir)
    tokenizer = load_tokenizer(pretrained)
    dm = hydra.utils.instantiate(cfg.data, tokenizer=tokenizer)
    dm.setup()
    module = CausalLMClassifier(
        pretrained,
        _plain(cfg.model),
        _plain(cfg.adapter),
        _plain(cfg.optim),
        dm.labels,
        dm.formatter.answer_ids,
        tokenizer.pad_token_id,
        True,
    )
    module.configure_model()
    # make B non-zero so A gets a gradient too, then check both
    for name, p in module.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    loss_sum, n = module.supervised_loss(next(iter(dm.train_dataloader())))
    (loss_sum / n).backward()
    grads = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_overfit_eight_examples_to_accuracy_one(tmp_path, cache_dir):
    cfg = compose_train(["experiment=smoke", "debug=overfit", "logger=none"], tmp_path, cache_dir)
    metrics, objects = train(cfg)
    assert metrics["val/acc"] == 1.0 and metrics["test/acc"] == 1.0
    assert objects["trainer"].current_epoch < 200, "stopped by EarlyStopping at acc 1.0, not by the epoch limit"


@pytest.mark.parametrize("kind", ["classify", "generate"])
def test_resume_from_last_ckpt_matches_an_uninterrupted_run(tmp_path, cache_dir, kind):
    common = ["experiment=smoke", "logger=none", "trainer.max_steps=10", "trainer.val_check_interval=2"]
    if kind == "generate":  # the sampler, the optimizer and the data position resume the same for conversations
        write_chats(tmp_path / "chats.jsonl", 110)
        common += ["data=chat", f"data.path={tmp_path / 'chats.jsonl'}", "report.enabled=false"]

    straight_cfg = compose_train(common, tmp_path / "straight", cache_dir)
    train(straight_cfg)

    first_cfg = compose_train(
        common + ["+callbacks.stop._target_=conftest.StopAtStep", "+callbacks.stop.step=6"],
        tmp_path / "first",
        cache_dir,
    )
    train(first_cfg)
    interrupted = torch.load(tmp_path / "first/checkpoints/last.ckpt", weights_only=False)
    assert interrupted["global_step"] == 6  # mid-epoch: 8 batches per epoch (classify), 9 (generate)

    resumed_cfg = compose_train(common, tmp_path / "resumed", cache_dir)
    with open_dict(resumed_cfg):
        resumed_cfg.ckpt_path = str(tmp_path / "first/checkpoints/last.ckpt")
    train(resumed_cfg)

    straight = torch.load(tmp_path / "straight/checkpoints/last.ckpt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed/checkpoints/last.ckpt", weights_only=False)
    assert straight["global_step"] == resumed["global_step"] == 10
    assert set(straight["state_dict"]) == set(resumed["state_dict"])
    for key, value in straight["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)


def test_export_reloads_with_peft_and_predicts_like_the_trained_module(tmp_path, cache_dir):
    cfg = compose_train(["experiment=smoke", "logger=none", "trainer.precision=32-true"], tmp_path, cache_dir)
    metrics, objects = train(cfg)
    module, dm = objects["module"], objects["datamodule"]
    export = tmp_path / "export"
    assert json.loads((export / "labels.json").read_text()) == dm.labels
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["test"]["test/acc"] == pytest.approx(metrics["test/acc"])

    formatting = json.loads((export / "formatting.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(formatting["base_model"], dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, export).eval()
    prompts = [e.input_ids[: e.prompt_length] for e in dm.examples["test"]]
    module.eval()
    ours = rank_scores(module.causal_lm, prompts, dm.formatter.answer_ids, dm.formatter.opening_ids)
    theirs = rank_scores(reloaded, prompts, formatting["answer_ids"], dm.formatter.opening_ids)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))
    # the adapter moved the predictions away from the base model's
    plain = AutoModelForCausalLM.from_pretrained(formatting["base_model"], dtype=torch.float32).eval()
    assert not torch.allclose(rank_scores(plain, prompts, formatting["answer_ids"]), ours, atol=1e-3)


def test_qlora_stores_the_base_in_4bit_nf4_trains_the_adapter_and_merges_into_a_full_precision_base(
    tmp_path, cache_dir
):
    import bitsandbytes as bnb

    cfg = compose_train(
        [
            "experiment=smoke",
            "adapter=qlora",
            "adapter.quantization.compute_dtype=float32",
            "logger=none",
            "callbacks=none",
            "trainer.max_steps=3",
            "trainer.val_check_interval=3",
            "+callbacks.snapshot._target_=conftest.SnapshotAtFitStart",
        ],
        tmp_path,
        cache_dir,
    )
    metrics, objects = train(cfg)
    module = objects["module"]
    quantized = [m for m in module.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7  # every linear layer of both decoder layers (lm_head stays unquantized)
    assert all(m.weight.quant_type == "nf4" and m.weight.quant_state.nested for m in quantized)  # double quant
    (before,) = [c for c in objects["trainer"].callbacks if isinstance(c, SnapshotAtFitStart)]
    after = module.trainable_state_dict()
    assert all(after[k].abs().sum() > 0 for k in after if "lora_B" in k)
    assert any(not torch.equal(before.trainable[k], v) for k, v in after.items() if "lora_A" in k)
    assert 0 <= metrics["test/acc"] <= 1

    # merged for shipping: into the base reloaded in float32, not into the 4-bit weights
    from lmtune.artifacts.merge import merge_export
    from lmtune.evaluation.predictor import Predictor
    from lmtune.model.loading import load_base_model

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        export_cfg = compose("merge.yaml", overrides=[f"ckpt={tmp_path}", f"out={tmp_path / 'merged'}"])
    with open_dict(export_cfg):
        export_cfg.paths.cache_dir = str(cache_dir)
    merged_dir = merge_export(export_cfg)
    assert "not the 4-bit weights" in json.loads((merged_dir / "formatting.json").read_text())["merged"]["into"]
    cpu = torch.device("cpu")
    qlora, merged = Predictor.from_export(tmp_path, cache_dir, cpu), Predictor.from_export(merged_dir, cache_dir, cpu)
    rows = [Row(r.fields, r.id) for r in objects["datamodule"].splits["test"]]
    prompts = [ids for ids, _ in qlora.formatter.fit_prompts([r.fields for r in rows])]
    answers = qlora.formatter.answer_ids
    # the quantization gap: the same base, 4-bit vs full precision, without any adapter
    base = json.loads((tmp_path / "export" / "formatting.json").read_text())["base_model"]
    full = load_base_model(base, {"dtype": "float32"}, None, cpu).eval()
    four_bit = load_base_model(base, {"dtype": "float32"}, dict(cfg.adapter.quantization), cpu).eval()
    gap = (rank_scores(full, prompts, answers) - rank_scores(four_bit, prompts, answers)).abs().max()
    difference = (merged.scores(rows)[0] - qlora.scores(rows)[0]).abs().max()
    assert 0 < difference <= 2 * gap, (difference, gap)  # merged != 4-bit model, by no more than quantization


def test_zero_steps_evaluates_the_untrained_base_model(tmp_path, cache_dir):
    cfg = compose_train(["experiment=smoke", "logger=none", "trainer.max_steps=0"], tmp_path, cache_dir)
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 0 and not list((tmp_path / "checkpoints").glob("*.ckpt"))
    module, dm = objects["module"], objects["datamodule"]
    assert all(v.abs().sum() == 0 for k, v in module.trainable_state_dict().items() if "lora_B" in k)
    # the same numbers as scoring the plain base model directly
    base = AutoModelForCausalLM.from_pretrained(module.hparams.pretrained, dtype=torch.float32).eval()
    prompts = [e.input_ids[: e.prompt_length] for e in dm.examples["test"]]
    preds = rank_scores(base, prompts, dm.formatter.answer_ids, dm.formatter.opening_ids).argmax(-1)
    truth = torch.tensor([e.label_index for e in dm.examples["test"]])
    assert metrics["test/acc"] == pytest.approx((preds == truth).float().mean().item())


def test_eval_loss_from_rank_scores_equals_the_masked_training_loss(tmp_path, cache_dir):
    cfg = compose_train(
        ["experiment=smoke", "logger=none", "trainer.max_steps=4", "trainer.val_check_interval=4"], tmp_path, cache_dir
    )
    metrics, objects = train(cfg)
    module, dm = objects["module"], objects["datamodule"]
    module.eval()
    total, count = 0.0, 0
    # in the precision validation ran in (bf16 autocast where `auto` picked bf16-mixed)
    with torch.no_grad(), objects["trainer"].precision_plugin.forward_context():
        for batch in dm.val_dataloader():
            loss_sum, n = module.supervised_loss(batch)
            total, count = total + loss_sum.item(), count + n.item()
    assert metrics["val/loss"] == pytest.approx(total / count, abs=1e-4)


class PoisonAtStep(L.Callback):
    """Turns one LoRA weight into NaN before the given step, as a diverging run would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            name, weight = next((n, p) for n, p in pl_module.named_parameters() if "lora_A" in n)
            with torch.no_grad():
                weight.fill_(float("nan"))


def test_nan_loss_stops_the_run_naming_the_step_and_rows(tmp_path, cache_dir):
    cfg = compose_train(["experiment=smoke", "logger=none"], tmp_path, cache_dir)
    with open_dict(cfg):
        cfg.callbacks.poison = {"_target_": "test_training.PoisonAtStep", "step": 3}
    with pytest.raises(NonFiniteLossError, match=r"training loss is nan at step 3 \(epoch 0, batch 3; row ids 2501\."):
        train(cfg)


@pytest.mark.parametrize(
    "debug, steps, files",
    [("fdr", 2, []), ("limit", 4, []), ("profiler", 20, ["fit-profile.txt"])],
)
def test_debug_presets_run(tmp_path, cache_dir, debug, steps, files):
    cfg = compose_train(["experiment=smoke", "logger=none", f"debug={debug}"], tmp_path, cache_dir)
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == steps and "test/acc" in metrics
    assert all((tmp_path / name).is_file() for name in files)


def test_mlp_checkpointing_keeps_less_for_the_backward_pass_and_gives_the_same_gradients(tiny_dir):
    """Selective checkpointing (`model.gradient_checkpointing=mlp`): the bytes autograd keeps between forward and
    backward shrink (the MLPs' and the norms' before them), and the LoRA gradients are the same as without it."""
    from lmtune.model.loading import load_model

    adapter = {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "up_proj", "down_proj"]}
    ids = torch.randint(0, 100, (2, 40))
    results = {}
    for mode in (False, "mlp"):
        torch.manual_seed(0)
        model = load_model(tiny_dir, {"dtype": "float32"}, adapter, torch.device("cpu"), mode).train()
        with torch.no_grad():  # B starts at zero: move it so A gets a gradient too
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn_like(param) * 0.1)
        kept = []

        def pack(t, kept=kept):
            kept.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results[mode] = (sum(kept), loss.detach(), grads)
    (plain_bytes, plain_loss, plain_grads), (mlp_bytes, mlp_loss, mlp_grads) = results[False], results["mlp"]
    # 0.57 with the norm in front of each MLP inside its checkpoint, 0.63 with the MLP alone
    assert mlp_bytes < 0.6 * plain_bytes, (mlp_bytes, plain_bytes)
    torch.testing.assert_close(mlp_loss, plain_loss, rtol=0, atol=0)
    assert set(mlp_grads) == set(plain_grads) and all(g is not None for g in mlp_grads.values())
    for name, grad in plain_grads.items():
        torch.testing.assert_close(mlp_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_the_best_weights_are_validated_and_tested_once_with_the_numbers_a_second_pass_gives(
    tmp_path, cache_dir, caplog
):
    """After fit, the best checkpoint's validation metrics come from its validation during training, and on one
    process the report's evaluation of the test split gives the test metrics: neither split is scored twice.
    Lightning's own validate/test passes over the same weights give the same numbers."""
    cfg = compose_train(["experiment=smoke", "logger=none", "trainer.precision=32-true"], tmp_path, cache_dir)
    with caplog.at_level("INFO", logger="lmtune.training.train"):
        metrics, objects = train(cfg)
    assert "measured during training" in caplog.text
    trainer, module, dm = objects["trainer"], objects["module"], objects["datamodule"]
    best = objects["summary"]["best_checkpoint"]
    assert set(objects["summary"]["test"]) == {"test/loss", "test/acc", "test/macro_f1"}
    (validated,) = trainer.validate(module, datamodule=dm, ckpt_path=best)
    (tested,) = trainer.test(module, datamodule=dm, ckpt_path=best)
    for key, value in {**validated, **tested}.items():
        assert metrics[key] == pytest.approx(value, abs=1e-5), key


def test_balanced_class_weights_give_every_label_the_same_total_weight(tmp_path, cache_dir):
    overrides = ["experiment=smoke", "logger=none", "trainer.max_steps=2", "report.enabled=false"]
    metrics, objects = train(compose_train([*overrides, "loss.class_weights=balanced"], tmp_path, cache_dir))
    module, dm = objects["module"], objects["datamodule"]
    counts = [dm.splits["train"].column("label").count(label) for label in dm.labels]
    assert len(set(counts)) > 1, "the sample's labels should be imbalanced for this test to mean anything"
    totals = [c * float(w) for c, w in zip(counts, module.class_weights, strict=True)]
    assert totals == pytest.approx([sum(counts) / len(counts)] * len(counts))
    batch = next(iter(dm.train_dataloader()))
    weights = module.token_weights(batch)
    assert torch.equal(weights[:, 0], module.class_weights[batch["label_index"]])
    from lmtune.training.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match="loss.class_weights='inverse': use balanced"):
        validate_config(compose_train(["experiment=smoke", "loss.class_weights=inverse"], tmp_path, cache_dir))
    with pytest.raises(ConfigError, match="no label set to weigh"):
        validate_config(
            compose_train(["experiment=smoke", "data=chat", "loss.class_weights=balanced"], tmp_path, cache_dir)
        )
