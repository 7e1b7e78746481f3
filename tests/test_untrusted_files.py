"""Checkpoints and exports come from other people's machines: a crafted file is refused in one line (exit status 1,
no traceback) and nothing in it runs. Each case plants one crafted file beside a real run and runs the CLI as a
user would (tests/helpers/cli_driver.py); the payloads would create a marker file, which must not exist after."""

from __future__ import annotations

import builtins
import json
import shutil

import pytest
import torch
import yaml

from conftest import ROOT, SAMPLE, compose_train
from helpers.cli_driver import run_commands
from lmtune.training.train import train


class RunsCode:
    """Unpickling calls `exec`, which creates the marker."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('ran')",))


def crafted_export(run, folder, name: str, change) -> str:
    """A copy of the run's export whose config.yaml, formatting.json or labels.json `change` edits."""
    export = folder / name
    shutil.copytree(run / "export", export)
    files = {f: export / f for f in ("config.yaml", "formatting.json", "labels.json")}
    data = {"config.yaml": yaml.safe_load(files["config.yaml"].read_text())}
    data |= {f: json.loads(files[f].read_text()) for f in ("formatting.json", "labels.json")}
    change(data)
    files["config.yaml"].write_text(yaml.safe_dump(data["config.yaml"]))
    for f in ("formatting.json", "labels.json"):
        files[f].write_text(json.dumps(data[f]))
    return str(export)


@pytest.fixture(scope="module")
def planted(tmp_path_factory, cache_dir):
    folder = tmp_path_factory.mktemp("untrusted")
    run = folder / "run"
    overrides = ["experiment=smoke", "logger=none", "trainer.max_steps=2", "report.enabled=false"]
    train(compose_train(overrides, run, cache_dir))
    marker, copied = folder / "marker", folder / "copied.jsonl"
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["note"] = RunsCode(marker)
    torch.save(checkpoint, run / "checkpoints" / "crafted.ckpt")

    def data_target(d):  # Hydra would call shutil.copyfile(SAMPLE, copied)
        d["config.yaml"]["data"].update({"_target_": "shutil.copyfile", "_args_": [str(SAMPLE), str(copied)]})

    def nested_target(d):
        d["config.yaml"]["data"]["columns"] = {"_target_": "shutil.copyfile", "src": str(SAMPLE), "dst": str(copied)}

    exports = {
        "data target": crafted_export(run, folder, "target", data_target),
        "nested target": crafted_export(run, folder, "nested", nested_target),
        "interpolation": crafted_export(
            run, folder, "interp", lambda d: d["config.yaml"]["data"].update(path="${oc.env:HOME}")
        ),
        "attention kernel": crafted_export(
            run, folder, "kernel", lambda d: d["config.yaml"]["model"].update(attn_implementation="kernels-community/x")
        ),
        "max_length": crafted_export(run, folder, "long", lambda d: d["formatting.json"].update(max_length=10**12)),
        "template": crafted_export(
            run, folder, "template", lambda d: d["formatting.json"].update(user_template="{title}" * 10**4)
        ),
        "label": crafted_export(run, folder, "label", lambda d: d["labels.json"].__setitem__(0, "x" * 500)),
    }
    return folder, run, marker, copied, exports


def test_crafted_checkpoints_and_exports_are_refused_in_one_line_and_run_nothing(planted, cache_dir):
    folder, run, marker, copied, exports = planted
    crafted_ckpt = run / "checkpoints" / "crafted.ckpt"
    cases = [
        ("train.py", ["experiment=smoke", "logger=none", f"ckpt_path={crafted_ckpt}"], "refused: it stores exec"),
        ("eval.py", [f"ckpt={crafted_ckpt}", "logger=none"], "refused: it stores exec"),
        ("eval.py", [f"ckpt={exports['data target']}", "logger=none"], "refused: data._target_ is shutil.copyfile"),
        (
            "eval.py",
            [f"ckpt={exports['nested target']}", "logger=none"],
            "refused: data.columns._target_ is a _target_",
        ),
        ("eval.py", [f"ckpt={exports['interpolation']}", "logger=none"], "refused: data.path is an interpolation"),
        ("predict.py", [f"ckpt={exports['attention kernel']}", "title=x", "abstract=y"], "model.attn_implementation"),
        ("predict.py", [f"ckpt={exports['max_length']}", "title=x", "abstract=y"], "max_length must be an integer"),
        ("serve.py", [f"ckpt={exports['template']}"], "user_template must be a string of at most 20,000"),
        ("merge.py", [f"ckpt={exports['label']}", f"out={folder / 'merged'}"], "at most 10,000 labels of 1 to 200"),
    ]
    commands = [
        {
            "script": str(ROOT / "src" / script),
            "args": [*args, f"paths.cache_dir={cache_dir}", f"hydra.run.dir={folder / 'out' / str(n)}"],
        }
        for n, (script, args, _) in enumerate(cases)
    ]
    results = run_commands(commands, folder, "untrusted")
    for (script, args, expected), result in zip(cases, results, strict=True):
        lines = [line for line in result["stderr"].splitlines() if line.startswith("error: ")]
        assert result["returncode"] == 1 and "Traceback" not in result["stderr"], (
            script,
            args,
            result["stderr"][-2000:],
        )
        assert len(lines) == 1 and expected in lines[0], (script, args, lines)
    assert not marker.exists() and not copied.exists()
    # the real run's own files still load
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
