"""Both command lines: one pattern, exit 2 with one line for bad input, exit 1 for real bugs."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from cli_checks import exit_status, one_error_line

from lens_safety.cli import build_parser as safety_parser
from lens_safety.cli import main as safety_main
from pruning_bridge.cli import build_parser as bridge_parser
from pruning_bridge.cli import main as bridge_main
from pruning_bridge.common.cli import limits, run_command
from pruning_bridge.common.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
bridge_cli = importlib.import_module("pruning_bridge.cli")
safety_cli = importlib.import_module("lens_safety.cli")


@pytest.mark.parametrize("argv, says", [
    (["eval", "--model", "no-such-model-here", "--task", "mmlu"], "no-such-model-here"),
    (["eval", "--model", "tiny-gpt2", "--task", "gsm8k", "--data-dir", "/no/such/dir"],
     "--data-dir"),
    (["weights", "--model", "tiny-gpt2", "--tasks", "perplexity", "--sparsities", "50",
      "--out", "{tmp}/w.jsonl"], "did you mean 0.5"),
    (["layers", "--model", "tiny-gpt2", "--tasks", "perplexity", "--layers", "0,9",
      "--out", "{tmp}/l.jsonl"], "out of range"),
    (["eval", "--model", "tiny-gpt2", "--task", "perplexity", "--window", "1"], "window"),
    (["heads", "--model", "tiny-gpt2", "--fractions", "0.5,1.5", "--out", "{tmp}/h"],
     "fractions"),
])
def test_bad_input_exits_2_with_one_line(argv, says, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert exit_status(bridge_main, argv) == 2
    assert says in one_error_line(capsys)


@pytest.mark.parametrize("argv, says", [
    (["probe", "--model", "no-such-model-here"], "no-such-model-here"),
    (["probe", "--model", "tiny-gpt2", "--data-dir", "/no/such/dir"], "/no/such/dir"),
    (["probe", "--model", "tiny-gpt2", "--data-dir", "{data}", "--test-size", "1.5"],
     "--test-size"),
    (["direction", "--from", "{tmp}", "--layer", "1", "--out", "{tmp}/d.safetensors"],
     "probe_study.json"),
    (["generate", "--model", "tiny-gpt2", "--edit", "{tmp}", "--prompt", "Hi"],
     "No saved edit"),
])
def test_safety_bad_input_exits_2_with_one_line(argv, says, tmp_path, data_dir, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{data}", str(data_dir)) for a in argv]
    assert exit_status(safety_main, argv) == 2
    assert says in one_error_line(capsys)


@pytest.mark.parametrize("main, argv", [
    (bridge_main, ["layers", "--model", "tiny-gpt2", "--tasks", "mmlu,bleu", "--out", "x"]),
    (bridge_main, ["eval", "--model", "tiny-gpt2", "--task", "mmlu", "--limit", "many"]),
    (bridge_main, ["weights", "--model", "tiny-gpt2", "--sparsities", "0.1,half", "--out", "x"]),
    (safety_main, ["generate", "--model", "tiny-gpt2", "--edit", ".", "--max-new-tokens", "x"]),
    (safety_main, ["probe", "--model", "tiny-gpt2", "--hook", "resid_sideways"]),
])
def test_argparse_errors_exit_2(main, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and "usage:" in capsys.readouterr().err


@pytest.mark.parametrize("error", [RuntimeError("a bug"), ValueError("a bug deep in torch"),
                                   IndexError("a bug")])
def test_real_bugs_are_not_turned_into_exit_2(error, monkeypatch, data_dir):
    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr("pruning_bridge.evals.tasks.evaluate", broken)
    with pytest.raises(type(error), match="bug"):
        bridge_main(["eval", "--model", "tiny-gpt2", "--task", "perplexity", "--limit", "1",
                     "--data-dir", str(data_dir)])
    monkeypatch.setattr("lens_safety.probing.study.ProbeStudy.build", broken)
    with pytest.raises(type(error), match="bug"):
        safety_main(["probe", "--model", "tiny-gpt2", "--data-dir", str(data_dir)])


def test_run_command_catches_only_usage_errors(capsys, monkeypatch):
    def run(error):
        def fail(args):
            raise error
        monkeypatch.setattr(bridge_cli, "_run_eval", fail)
        return run_command(bridge_parser(), ["eval", "--model", "m", "--task", "mmlu"])

    assert run(UsageError("first line\n  second line")) == 2
    assert one_error_line(capsys) == "error: first line second line"
    with pytest.raises(FileNotFoundError):
        run(FileNotFoundError("not a usage error"))


@pytest.mark.parametrize("package", ["pruning_bridge", "lens_safety"])
def test_a_real_bug_exits_1_with_its_traceback(package, tmp_path):
    """Through the interpreter: a plain ValueError raised inside a command is exit status 1."""
    command = "eval" if package == "pruning_bridge" else "probe"
    script = (f"import sys\nimport {package}.cli as cli\n"
              "def broken(args):\n    raise ValueError('a real bug')\n"
              f"cli._run_{command} = broken\n"
              "sys.exit(cli.main(sys.argv[1:]))\n")
    argv = [command, "--model", "m"] + (["--task", "mmlu"] if command == "eval" else [])
    done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "ValueError: a real bug" in done.stderr


def test_one_pattern_for_both_command_lines():
    for parser in (bridge_parser(), safety_parser()):
        sub = next(a for a in parser._actions if a.dest == "command")
        for name, command in sub.choices.items():
            assert command.get_default("run").__name__ == f"_run_{name.replace('-', '_')}"
    assert limits("57") == 57 and limits("mmlu=57,perplexity=4") == {"mmlu": 57,
                                                                      "perplexity": 4}


def test_console_scripts_are_declared():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'pruning-bridge = "pruning_bridge.cli:main"' in text
    assert 'lens-safety = "lens_safety.cli:main"' in text
