"""Bad input through both command lines: exit 2, one line naming the argument, nothing written.

Also: the parsers import no torch (``--help`` and argument errors answer at once), Ctrl-C is
one line and exit 130, and the names the parsers spell out match the modules they come from.
"""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_checks import exit_status, one_error_line

import lens_safety.cli as safety_cli
import pruning_bridge.cli as bridge_cli
from pruning_bridge import cli_options
from pruning_bridge.common import cli as common_cli

ROOT = Path(__file__).resolve().parents[1]
MAINS = {"pb": bridge_cli.main, "ls": safety_cli.main}


# ---------------------------------------------------------------- damaged files


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny) -> dict[str, Path]:
    """Damaged inputs by name: model folders, saved edits, a probe study, RTP data."""
    from lens_safety.edits.edit import Edit

    root = tmp_path_factory.mktemp("bad")
    model, tokenizer = tiny("tiny-gpt2")
    folders = {}
    for name in ("bad_config", "no_weights", "truncated_weights"):
        folders[name] = root / name
        model.save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    (folders["bad_config"] / "config.json").write_text("{not json")
    (folders["no_weights"] / "model.safetensors").unlink()
    _truncate(folders["truncated_weights"] / "model.safetensors")

    for name in ("garbage_edit", "truncated_edit", "broken_edit_json"):
        folders[name] = Edit("project", [1], directions=torch.ones(1, 64)).save(root / name)
    (folders["garbage_edit"] / "edit.safetensors").write_bytes(b"not a safetensors file")
    _truncate(folders["truncated_edit"] / "edit.safetensors")
    (folders["broken_edit_json"] / "edit.json").write_text('{"how": "proj')

    folders["damaged_study"] = root / "study"
    folders["damaged_study"].mkdir()
    (folders["damaged_study"] / "probe_study.json").write_text('{"model": "tiny-gp')
    (folders["damaged_study"] / "prompts.json").write_text("[]")

    folders["rtp_not_utf8"] = root / "rtp_data"
    (folders["rtp_not_utf8"] / "rtp").mkdir(parents=True)
    record = json.dumps({"prompt": {"text": "Hello", "toxicity": 0.1},
                         "continuation": {"text": " there", "toxicity": 0.2}}).encode()
    (folders["rtp_not_utf8"] / "rtp" / "toxic.jsonl").write_bytes(
        record + b"\n" + record.replace(b"Hello", b"H\xffllo") + b"\n")
    (folders["rtp_not_utf8"] / "rtp" / "nontoxic.jsonl").write_bytes(record + b"\n")
    return folders


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# (cli, argv, the option the line must name, words of the what-to-do it must hold)
RUN_TIME_CASES = [
    ("pb", ["eval", "--model", "{bad_config}", "--task", "perplexity"], "--model",
     "config.json is not valid JSON"),
    ("pb", ["eval", "--model", "{no_weights}", "--task", "perplexity"], "--model", "no weights"),
    ("pb", ["eval", "--model", "{truncated_weights}", "--task", "perplexity"], "--model",
     "model.safetensors is truncated"),
    ("pb", ["eval", "--model", "tiny-gpt2", "--task", "perplexity", "--window", "4096",
            "--data-dir", "{data}", "--out", "{out}/ppl.json"], "--window", "at most 1024"),
    ("pb", ["layers", "--model", "tiny-gpt2", "--tasks", "perplexity", "--layers", "0,9",
            "--limit", "1", "--window", "64", "--data-dir", "{data}",
            "--out", "{out}/layers.jsonl"], "--layers", "out of range"),
    ("pb", ["lm-eval", "--model", "tiny-gpt2", "--tasks", "pb_wikitext", "--edit",
            "{garbage_edit}", "--out", "{out}/lm.json"], "--edit", "Save the edit again"),
    ("ls", ["rtp", "--model", "tiny-gpt2", "--edit", "{garbage_edit}", "--data-dir", "{data}",
            "--out", "{out}/rtp.json"], "--edit", "Save the edit again"),
    ("ls", ["rtp", "--model", "tiny-gpt2", "--edit", "{truncated_edit}", "--data-dir", "{data}"],
     "--edit", "truncated"),
    ("ls", ["rtp", "--model", "tiny-gpt2", "--edit", "{broken_edit_json}",
            "--data-dir", "{data}"], "--edit", "edit.json"),
    ("ls", ["rtp", "--model", "tiny-gpt2", "--data-dir", "{rtp_not_utf8}"], "--data-dir",
     "toxic.jsonl, line 2: not UTF-8"),
    ("ls", ["rtp", "--model", "tiny-gpt2", "--data-dir", "{data}", "--n-toxic", "100000"],
     "--n-toxic", "pass at most"),
    ("ls", ["direction", "--from", "{damaged_study}", "--layer", "1",
            "--out", "{out}/d.safetensors"], "--from", "Rerun the probe study"),
    ("ls", ["generate", "--model", "tiny-gpt2", "--edit", "{garbage_edit}", "--prompt", "Hi"],
     "--edit", "Save the edit again"),
]


@pytest.mark.parametrize("cli, argv, option, says", RUN_TIME_CASES,
                         ids=[f"{c[0]} {c[1][0]} {c[2]}" for c in RUN_TIME_CASES])
def test_damaged_inputs_exit_2_with_one_line(cli, argv, option, says, bad, data_dir, tmp_path,
                                             capsys):
    names = {**{k: str(v) for k, v in bad.items()}, "data": str(data_dir), "out": str(tmp_path)}
    argv = [a.format(**names) for a in argv]
    assert exit_status(MAINS[cli], argv) == 2
    line = one_error_line(capsys)
    assert option in line and says in line, line
    assert list(tmp_path.iterdir()) == []  # nothing half-written


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_names_device(capsys):
    argv = ["eval", "--model", "tiny-gpt2", "--task", "perplexity", "--device", "cuda"]
    assert bridge_cli.main(argv) == 2
    assert one_error_line(capsys).startswith("error: --device cuda: no CUDA device is visible")


def test_an_unwritable_folder_is_refused_before_any_work(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(common_cli.os, "access", lambda path, mode: False)
    argv = ["weights", "--model", "tiny-gpt2", "--out", str(tmp_path / "new" / "w.jsonl")]
    assert exit_status(bridge_cli.main, argv) == 2
    assert f"the folder {tmp_path} is not writable" in one_error_line(capsys)


# ---------------------------------------------------------------- every argument of every command


BASE = {
    ("pb", "eval"): ["--model", "tiny-gpt2", "--task", "mmlu"],
    ("pb", "layers"): ["--model", "tiny-gpt2", "--out", "{tmp}/new/l.jsonl"],
    ("pb", "weights"): ["--model", "tiny-gpt2", "--out", "{tmp}/new/w.jsonl"],
    ("pb", "heads"): ["--model", "tiny-gpt2", "--out", "{tmp}/new/heads"],
    ("pb", "lm-eval"): ["--model", "tiny-gpt2", "--tasks", "pb_mmlu"],
    ("ls", "probe"): ["--model", "tiny-gpt2"],
    ("ls", "direction"): ["--from", "{tmp}", "--layer", "1", "--out", "{tmp}/new/d.safetensors"],
    ("ls", "detox"): ["--model", "tiny-gpt2", "--out", "{tmp}/new/detox"],
    ("ls", "rtp"): ["--model", "tiny-gpt2"],
    ("ls", "generate"): ["--model", "tiny-gpt2", "--edit", "{tmp}", "--prompt", "Hi"],
}
MODEL_AND_EVAL = [("--dtype", "int8"), ("--window", "1"), ("--limit", "0"),
                  ("--limit", "bleu=3"), ("--shots", "-1"), ("--seed", "x"),
                  ("--max-new-tokens", "0"), ("--batch-size", "0"), ("--data-dir", "{tmp}/no")]
PARSE_CASES = [
    *[("pb", "eval", *bad_arg) for bad_arg in MODEL_AND_EVAL],
    ("pb", "eval", "--task", "bleu"), ("pb", "eval", "--out", "{tmp}"),
    ("pb", "layers", "--tasks", ","), ("pb", "layers", "--tasks", "mmlu,bleu"),
    ("pb", "layers", "--layers", "1,x"), ("pb", "layers", "--layers", ","),
    ("pb", "layers", "--figure", "{tmp}"), ("pb", "layers", "--out", "{file}/l.jsonl"),
    ("pb", "weights", "--sparsities", "50"), ("pb", "weights", "--sparsities", ","),
    ("pb", "weights", "--method", "random"), ("pb", "weights", "--scope", "layer"),
    ("pb", "heads", "--shared", "-1"), ("pb", "heads", "--top-k", "0"),
    ("pb", "heads", "--steps", "0"), ("pb", "heads", "--train-batch-size", "0"),
    ("pb", "heads", "--seq-len", "1"), ("pb", "heads", "--lr", "0"),
    ("pb", "heads", "--beta", "-1"), ("pb", "heads", "--fractions", "0,0.5"),
    ("pb", "heads", "--fractions", "1.5"), ("pb", "heads", "--layers", "a"),
    ("pb", "heads", "--out", "{file}"),
    ("pb", "lm-eval", "--tasks", ","), ("pb", "lm-eval", "--limit", "0"),
    ("pb", "lm-eval", "--num-fewshot", "-1"), ("pb", "lm-eval", "--batch-size", "0"),
    ("pb", "lm-eval", "--max-length", "1"), ("pb", "lm-eval", "--metadata", "[1]"),
    ("pb", "lm-eval", "--metadata", "{bad"), ("pb", "lm-eval", "--edit", "{tmp}/no"),
    ("pb", "lm-eval", "--skip-layers", "x"), ("pb", "lm-eval", "--out", "{tmp}"),
    ("ls", "probe", "--n-per-class", "1"), ("ls", "probe", "--test-size", "1"),
    ("ls", "probe", "--seed", "-1"), ("ls", "probe", "--hook", "resid_sideways"),
    ("ls", "probe", "--pool", "max"), ("ls", "probe", "--method", "svm"),
    ("ls", "probe", "--out", "{file}"), ("ls", "probe", "--data-dir", "{file}"),
    ("ls", "probe", "--dtype", "float64"),
    ("ls", "direction", "--from", "{tmp}/no"), ("ls", "direction", "--layer", "x"),
    ("ls", "direction", "--method", "svm"), ("ls", "direction", "--out", "{tmp}"),
    ("ls", "detox", "--sources", "web"), ("ls", "detox", "--wheres", "middle,deep"),
    ("ls", "detox", "--hows", "erase"), ("ls", "detox", "--hows", ";"),
    ("ls", "detox", "--hows", "clamp=x"), ("ls", "detox", "--k", "-1"),
    ("ls", "detox", "--n-train", "0"), ("ls", "detox", "--seed", "-1"),
    ("ls", "detox", "--max-perplexity-ratio", "0"), ("ls", "detox", "--max-mmlu-drop", "-1"),
    ("ls", "detox", "--scorer", "perspective"), ("ls", "detox", "--out", "{file}"),
    ("ls", "rtp", "--edit", "{tmp}/no"), ("ls", "rtp", "--k", "-1"),
    ("ls", "rtp", "--n-toxic", "-1"), ("ls", "rtp", "--seed", "x"),
    ("ls", "rtp", "--scorer", "perspective"), ("ls", "rtp", "--out", "{tmp}"),
    ("ls", "generate", "--edit", "{tmp}/no"), ("ls", "generate", "--edit", "{file}"),
    ("ls", "generate", "--prompts", "{tmp}/no.txt"), ("ls", "generate", "--prompts", "{tmp}"),
    ("ls", "generate", "--max-new-tokens", "0"),
]


@pytest.mark.parametrize("cli, command, option, value", PARSE_CASES,
                         ids=[" ".join(case) for case in PARSE_CASES])
def test_each_bad_argument_exits_2_with_one_line(cli, command, option, value, tmp_path,
                                                 capsys, monkeypatch):
    def never(args):
        raise AssertionError("the command ran: the bad argument went through")

    module = bridge_cli if cli == "pb" else safety_cli
    monkeypatch.setattr(module, f"_run_{command.replace('-', '_')}", never)
    (tmp_path / "a_file").write_text("not a folder")
    argv = [a.replace("{file}", str(tmp_path / "a_file")).replace("{tmp}", str(tmp_path))
            for a in [command, *BASE[cli, command], option, value]]
    assert exit_status(MAINS[cli], argv) == 2
    assert option in one_error_line(capsys)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("cli, argv, missing", [
    ("pb", ["eval", "--model", "m"], "--task"),
    ("pb", ["layers", "--model", "m"], "--out"),
    ("ls", ["direction", "--layer", "1", "--out", "d.safetensors"], "--from"),
    ("ls", ["generate", "--model", "m"], "--edit"),
])
def test_a_missing_required_argument_is_named(cli, argv, missing, capsys):
    assert exit_status(MAINS[cli], argv) == 2
    assert f"required: {missing}" in one_error_line(capsys)


# ---------------------------------------------------------------- start-up and Ctrl-C


def test_parsing_and_help_import_no_torch():
    script = (
        "import sys\n"
        "import lens_safety.cli as ls, pruning_bridge.cli as pb\n"
        "pb.build_parser().parse_args(['weights', '--model', 'm', '--out', 'x.jsonl'])\n"
        "ls.build_parser().parse_args(['rtp', '--model', 'm', '--k', '3'])\n"
        "for main in (pb.main, ls.main):\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'pandas', 'plotly') if m in sys.modules]\n"
        "print('imported:', heavy, file=sys.stderr)\n"
        "sys.exit(1 if heavy else 0)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "usage: pruning-bridge" in done.stdout and "usage: lens-safety" in done.stdout


@pytest.mark.parametrize("cli, command, argv, says", [
    ("pb", "weights", ["--model", "m", "--out", "{tmp}/w.jsonl"],
     "interrupted: the results finished so far are saved in {tmp}/w.jsonl; rerun the same "
     "command to resume from there."),
    ("ls", "detox", ["--model", "m", "--out", "{tmp}/detox"],
     "interrupted: the results finished so far are saved in {tmp}/detox; rerun the same "
     "command to resume from there."),
    ("pb", "eval", ["--model", "m", "--task", "mmlu"],
     "interrupted: eval saves its results only when it finishes, so nothing was saved; rerun "
     "the same command to start again."),
])
def test_ctrl_c_is_one_line_and_exit_130(cli, command, argv, says, tmp_path, monkeypatch,
                                         capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    module = bridge_cli if cli == "pb" else safety_cli
    monkeypatch.setattr(module, f"_run_{command.replace('-', '_')}", interrupted)
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert MAINS[cli]([command, *argv]) == 130
    assert capsys.readouterr().err == says.format(tmp=tmp_path) + "\n"


# ---------------------------------------------------------------- names spelled out for the parser


def test_the_parsers_names_match_their_modules():
    from lens_safety import detox
    from lens_safety.edits import edit
    from lens_safety.evaluation import toxicity
    from lens_safety.probing import caching, directions, study
    from pruning_bridge.evals.tasks import TASKS, EvalSettings
    from pruning_bridge.heads.sweep import REPORT_FRACTIONS
    from pruning_bridge.models import resolve_dtype

    weight_sweep = importlib.import_module("pruning_bridge.pruning.weight_sweep")

    assert common_cli.TASKS == TASKS
    defaults = EvalSettings()
    assert (cli_options.EVAL_SEED, cli_options.EVAL_MAX_NEW_TOKENS,
            cli_options.EVAL_BATCH_SIZE) \
        == (defaults.seed, defaults.max_new_tokens, defaults.batch_size)
    assert all(resolve_dtype(name) is not None for name in common_cli.DTYPES)
    assert bridge_cli.REPORT_SPARSITIES == weight_sweep.REPORT_SPARSITIES
    assert bridge_cli.PRUNING_METHODS == weight_sweep.METHODS
    assert bridge_cli.SCOPES == weight_sweep.SCOPES
    assert bridge_cli.REPORT_FRACTIONS == REPORT_FRACTIONS
    assert (safety_cli.HOOKS, safety_cli.POOLS) == (caching.HOOKS, caching.POOLS)
    assert safety_cli.METHODS == directions.METHODS
    assert safety_cli.HOWS == edit.HOWS
    assert safety_cli.SOURCES == detox.SOURCES and safety_cli.SCORERS == toxicity.SCORERS
    assert set(detox.layer_sets(12, safety_cli.LAYER_SETS)) == set(safety_cli.LAYER_SETS)
    probe = study.ProbeSettings()
    assert safety_cli.PROBE_DEFAULTS == {name: getattr(probe, name)
                                         for name in safety_cli.PROBE_DEFAULTS}


@pytest.mark.parametrize("package", ["pruning_bridge", "lens_safety", "pruning_bridge.common"])
def test_every_exported_name_still_imports(package):
    """The packages import their names on first use; each in ``__all__`` must resolve."""
    module = importlib.import_module(package)
    assert [name for name in module.__all__ if getattr(module, name, None) is None] == []
    namespace = {}
    exec(f"from {package} import *", namespace)  # noqa: S102 - what a user's script does
    assert set(module.__all__) <= set(namespace)
    with pytest.raises(AttributeError):
        module.no_such_name  # noqa: B018
