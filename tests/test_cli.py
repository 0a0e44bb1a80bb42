"""partitioner/cli.py and examples/: `python -m partitioner` and the examples as a user runs them (subprocesses), the
other commands and the parsers in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import partitioner
import zoo
from partitioner import cli

ROOT = Path(__file__).resolve().parents[1]
LLAMA = (
    "hf:LlamaConfig:num_hidden_layers=2,hidden_size=64,intermediate_size=128,num_attention_heads=4,"
    "num_key_value_heads=2,vocab_size=256"
)


def _python(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`python ARGS` in a fresh process, the checkout importable from any directory (cwd stays first on sys.path)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=240, check=False
    )


def _tiny_plan() -> partitioner.Plan:
    """What `partitioner plan gpt3-tiny --devices 2 --batch 4` plans: bf16 on meta, h100."""
    with torch.device("meta"):
        model = zoo.get("gpt3-tiny").to(torch.bfloat16)
    x = zoo.example_inputs("gpt3-tiny", batch=4, device="meta")
    return partitioner.compile(model, devices=2, example_inputs=x).plan


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    """One `python -m partitioner plan gpt3-tiny ... --json` run, shared by the tests that read its output."""
    path = tmp_path_factory.mktemp("cli") / "plan.json"
    return _python(
        "-m", "partitioner", "plan", "gpt3-tiny", "--devices", "2", "--batch", "4", "--json", str(path)
    ), path


def test_plan_prints_the_summary_of_the_plan_compile_makes(planned) -> None:
    result, _ = planned
    assert result.returncode == 0, result.stderr
    expected = _tiny_plan().summary()
    assert result.stdout.splitlines()[0] == expected.splitlines()[0]
    assert result.stdout.startswith(expected + "\n")  # the same options reached compile: the same plan, every figure
    assert "compiled in" in result.stdout and "Traceback" not in result.stderr


def test_plan_json_is_the_plan_and_explain_reads_it_back(planned, capsys: pytest.CaptureFixture) -> None:
    result, path = planned
    assert result.returncode == 0, result.stderr
    assert f"plan: {path}" in result.stdout
    saved = partitioner.Plan.from_json(path.read_text())
    assert saved == _tiny_plan()
    assert cli.main(["explain", str(path)]) == 0  # in this process: the subprocess path is the fixture's
    assert capsys.readouterr().out == saved.summary() + "\n"


def test_plan_builds_a_transformers_config_on_meta(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["plan", LLAMA, "--devices", "2", "--batch", "4", "--seq", "32"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("Plan for LlamaForCausalLM on 2 x h100 (") and "captured with export" in first


def test_an_unknown_model_is_one_error_line_naming_every_form(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["plan", "gpt3-tny", "--devices", "2"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("partitioner: error: unknown model 'gpt3-tny' (did you mean gpt3-tiny")
    for form in [*zoo.names(), "module:factory", "--inputs module:function", "hf:ConfigClass:key=value"]:
        assert form in lines[0], form


def test_plan_imports_a_factory_and_its_inputs_from_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "my_models.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            class TwoBlocks(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 32)

                def forward(self, x):
                    return self.b(torch.relu(self.a(x)))

            def build():
                return TwoBlocks()

            def example(batch, seq):
                return (torch.randn(batch, seq, 32),)
            """
        )
    )
    args = ["my_models:build", "--inputs", "my_models:example", "--devices", "2", "--batch", "6", "--seq", "5"]
    monkeypatch.chdir(tmp_path)  # in this process, as the console script does: the current directory is importable
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "my_models", raising=False)
    assert cli.main(["plan", *args, "--pipeline", "2", "--json", "p.json"]) == 0
    assert capsys.readouterr().out.startswith("Plan for TwoBlocks on 2 x h100 (pipeline 2 x tensor 1 x data 1;")
    plan = partitioner.Plan.from_json((tmp_path / "p.json").read_text())
    assert plan.num_stages == 2 and plan.capture == "fx"


def test_example_reuse_saved_plan_runs() -> None:
    result = _python("examples/reuse_saved_plan.py")
    assert result.returncode == 0, result.stderr
    assert "compiled again from the saved plan" in result.stdout
    assert "outputs equal the plain model's" in result.stdout


def test_example_control_flow_trains_equal_to_the_plain_model() -> None:
    result = _python("examples/control_flow.py")
    assert result.returncode == 0, result.stderr
    assert "captured with module-placement" in result.stdout
    assert "trained equal to the plain model" in result.stdout


def test_example_plan_gpt3_runs_small() -> None:
    result = _python("examples/plan_gpt3_175b.py", "--model", "gpt3-1.3b", "--devices", "8", "--batch", "16")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("Plan for GPT on 8 x h100 (")
    assert lines[-1].startswith("planned gpt3-1.3b for 8 x h100 in ")


def test_example_plans_a_long_context_with_context_parallelism() -> None:
    """64K-token sequences of gpt3-13b on 64 H100s: the layouts without context parallelism recompute, with it
    they need not; the summary says so."""
    result = _python("examples/plan_gpt3_175b.py", "--model", "gpt3-13b", "--seq", "65536", "--batch", "16")
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert " x context " in first, first
    assert "  context parallel " in result.stdout and "without it the best layout" in result.stdout


@pytest.mark.slow
def test_example_plan_gpt3_175b_as_published() -> None:
    result = _python("examples/plan_gpt3_175b.py")
    assert result.returncode == 0, result.stderr
    start = "Plan for GPT on 64 x h100 (pipeline 8 x tensor 4 sequence parallel x data 2;"  # README
    assert result.stdout.startswith(start), result.stdout[:200]


def test_bench_forwards_to_bench_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli.main(["bench", "gpt3-tiny", "--devices", "2", "--batch", "4", "--out", str(tmp_path)])
    assert code == 0
    assert "=== gpt3-tiny" in capsys.readouterr().out
    (written,) = tmp_path.glob("gpt3-tiny-2dev-h100-*.json")
    assert json.loads(written.read_text())["options"]["batch"] == 4


def test_bench_refuses_a_non_zoo_model_in_one_line(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["bench", LLAMA]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bench takes a zoo name" in err and "gpt3-tiny" in err


def test_explain_names_a_file_that_is_not_a_plan(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "x.json").write_text("{}")
    assert cli.main(["explain", str(tmp_path / "x.json")]) == 2
    assert "x.json: not a partitioner plan" in capsys.readouterr().err
    assert cli.main(["explain", str(tmp_path / "missing.json")]) == 2
    assert "cannot read" in capsys.readouterr().err


def _subcommands() -> dict:
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return sub.choices


def test_help_shows_every_option_with_help_and_a_default(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    top = capsys.readouterr().out
    assert all(name in top for name in ("plan", "explain", "bench"))
    for name in ("plan", "explain"):
        with pytest.raises(SystemExit):
            cli.main([name, "--help"])
        text = capsys.readouterr().out
        for action in _subcommands()[name]._actions:
            assert action.help, (name, action.dest)
            assert action.option_strings[0] in text if action.option_strings else action.metavar in text
            if action.option_strings and action.dest != "help":
                assert "default" in action.help or action.required, (name, action.dest)
    assert "hf:LlamaConfig:" in _subcommands()["plan"].format_help()


def test_the_console_script_is_declared() -> None:
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"partitioner": "partitioner.cli:main"}


@pytest.mark.parametrize(
    ("text", "value"),
    [("4", 4), ("-2", -2), ("1e-5", 1e-5), ("0.5", 0.5), ("true", True), ("False", False), ("silu", "silu")],
)
def test_parse_value(text: str, value: object) -> None:
    parsed = cli.parse_value(text)
    assert parsed == value and type(parsed) is type(value)


def test_parse_config_args() -> None:
    assert cli.parse_config_args("a=1, b=x,c=true") == {"a": 1, "b": "x", "c": True}
    assert cli.parse_config_args("") == {}
    with pytest.raises(cli.CliError, match="'b' is not key=value"):
        cli.parse_config_args("a=1,b")


def test_plan_forwards_recompute_data_parallel_and_sequence_parallel(capsys: pytest.CaptureFixture) -> None:
    argv = ["plan", "gpt3-tiny", "--devices", "4", "--batch", "8", "--tensor-parallel", "2"]
    assert cli.main([*argv, "--sequence-parallel", "on", "--recompute", "full", "--data-parallel", "zero1"]) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert "tensor 2 sequence parallel" in first and "data parallel zero1" in first
    assert " full\n" in out  # the stage table's recompute column
    assert cli.main([*argv, "--sequence-parallel", "off"]) == 0
    assert "sequence parallel" not in capsys.readouterr().out.splitlines()[0]
    assert cli.main(["plan", "gpt3-tiny", "--devices", "4", "--batch", "8", "--context-parallel", "2"]) == 0
    assert "x context 2 x" in capsys.readouterr().out.splitlines()[0]
