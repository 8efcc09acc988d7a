"""The one command-line system (`phi_train/cli.py`): every shipped YAML composes into its schema, and every user
mistake is one line `error: ...` with exit status 2, for a tool command and for train, with real Hydra."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from data_tools.codetextbook import config as ctb
from data_tools.decontaminate import config as decon
from data_tools.synth import common as synth
from data_tools.synth import textbooks
from phi_train import cli
from phi_train.config import Config, register_configs
from phi_train.errors import CONF_ROOT
from phi_train.evaluate import EvaluateConfig
from phi_train.evaluate import register_configs as register_eval

ROOT = Path(__file__).resolve().parent.parent
TOOLS = {"codetextbook": ctb.load_config, "decontaminate": decon.load_config, "synth": synth.load_config}
TRAIN_GROUPS = sorted(p.name for p in CONF_ROOT.iterdir() if p.is_dir() and p.name not in (*TOOLS, "eval"))


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", ROOT / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cases() -> list[tuple[str, str]]:
    out = [(group, p.stem) for group in TOOLS for p in sorted((CONF_ROOT / group).glob("*.yaml"))]
    out += [("eval", p.stem) for p in sorted((CONF_ROOT / "eval").glob("*.yaml"))]
    out += [(group, p.stem) for group in TRAIN_GROUPS for p in sorted((CONF_ROOT / group).glob("*.yaml"))]
    return out


def test_every_shipped_yaml_is_composed_below():
    covered = {CONF_ROOT / group / f"{name}.yaml" for group, name in cases()}
    covered |= {CONF_ROOT / "config.yaml", CONF_ROOT / "evaluate.yaml"}
    assert set(CONF_ROOT.rglob("*.yaml")) == covered


@pytest.mark.parametrize(("group", "name"), cases())
def test_shipped_yaml_builds_its_dataclasses(group, name):
    if group in TOOLS:
        cfg = TOOLS[group](name, [])
        assert type(cfg).__name__ == {"codetextbook": "CodeTextbookConfig", "decontaminate": "DecontaminateConfig"}.get(
            group, "SynthConfig"
        )
        return
    if group == "eval":
        register_eval()
        cfg = cli.load(EvaluateConfig, "evaluate", [f"eval={name}"], CONF_ROOT, "evaluate_schema")
        assert cfg.eval.benchmark
        return
    register_configs()
    overrides = [f"+model={name}"] if group == "model" else ["+model=phi1_tiny", f"{group}={name}"]
    cfg = cli.load(Config, "config", overrides, CONF_ROOT, "config_schema")
    assert isinstance(cfg, Config) and cfg.model.n_layer > 0


def test_synth_demo_starts_from_base_by_its_defaults_list():
    cfg = synth.load_config("demo", ["textbooks.count=3"])
    assert set(cfg.textbooks.templates) == {"lesson", "worked_example"}  # from base.yaml
    assert cfg.teacher.model == "phi-train" and cfg.textbooks.count == 3  # demo.yaml, then the command line
    assert "${stdlib:}" not in synth.to_yaml(ctb.load_config("demo"))  # the resolver still runs


def test_a_users_yaml_elsewhere_can_start_from_a_shipped_one(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("defaults:\n  - demo\n  - _self_\ntextbooks:\n  count: 7\n")
    cfg = synth.load_config(str(mine))
    assert cfg.textbooks.count == 7 and cfg.teacher.model == "phi-train"


TOOL_MISTAKES = [
    (["textbooks.countt=3"], "unknown key 'textbooks.countt': textbooks has count, seed,"),
    (["textbooks.count=many"], "textbooks.count='many' is not a valid int"),
    (["--config-name", "nope"], "unknown config name 'nope'; choose one of base, demo, openai"),
    (["+foo=1"], "unknown key 'foo': the config has teacher, textbooks, exercises"),
    (["textbooks.count=0"], "textbooks.count=0 must be >= 1"),
    (["--count", "3"], "unknown option '--count'"),
]


@pytest.mark.parametrize(("argv", "message"), TOOL_MISTAKES)
def test_tool_mistakes_are_one_line_exit_2(capsys, argv, message):
    assert textbooks.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert "_schema" not in err


def test_unknown_group_option_of_a_tool_is_one_line_exit_2(capsys):
    evaluate = load_script("evaluate")
    assert evaluate.main(["eval=nope"]) == 2
    err = capsys.readouterr().err
    assert err == "error: unknown eval 'nope'; choose one of custom, humaneval, mbpp, unconventional\n"


TRAIN_MISTAKES = [
    (["+model=nope"], "unknown model 'nope'; choose one of phi1, phi1_small, phi1_tiny"),
    ([], "no model chosen: add +model=NAME with NAME one of phi1, phi1_small, phi1_tiny"),
    (["+model=phi1_tiny", "train.lrr=1"], "unknown key 'train.lrr': train has global_batch_size,"),
    (["+model=phi1_tiny", "train.lr=fast"], "train.lr='fast' is not a valid float"),
    (["+model=phi1_tiny", "train=nope"], "unknown train 'nope'; choose one of demo, finetune, finetune_demo, pretrain"),
    (["+model=phi1_tiny", "train.stage=finetune"], "unknown key 'train.stage'"),
    (["+model=phi1_tiny", "model.n_head=5"], "model.n_head=5 does not divide model.d_model"),
]


@pytest.mark.parametrize(("argv", "message"), TRAIN_MISTAKES)
def test_train_mistakes_are_one_line_exit_2(capsys, monkeypatch, argv, message):
    train = load_script("train")
    monkeypatch.setenv("RANK", "0")
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert "_schema" not in err


def test_train_errors_print_on_rank_0_only(capsys, monkeypatch):
    train = load_script("train")
    monkeypatch.setenv("RANK", "1")
    assert train.main(["+model=nope"]) == 2
    assert capsys.readouterr().err == ""


def test_cfg_job_prints_the_config_and_help_works_without_hydra_outputs(tmp_path):
    run = dict(cwd=tmp_path, capture_output=True, text=True, timeout=120)
    r = subprocess.run([sys.executable, "-m", "data_tools.shard", "--cfg", "job", "seq_len=64"], **run)
    assert r.returncode == 0, r.stderr
    assert "seq_len: 64" in r.stdout and "shard_sequences: 512" in r.stdout
    r = subprocess.run([sys.executable, "-m", "data_tools.synth.textbooks", "--help"], **run)
    assert r.returncode == 0 and "textbooks:" in r.stdout, r.stderr
    assert list(tmp_path.iterdir()) == []  # no outputs/, no .hydra/, no log file
