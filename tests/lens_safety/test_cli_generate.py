"""``lens-safety generate``: a saved edit applied to prompts, unedited vs edited side by side,
against greedy decoding of the Hugging Face model with the edit as a plain PyTorch hook."""

import pytest
import torch

from lens_safety.cli import main
from lens_safety.edits.edit import Edit

PROMPTS = ["The old house on the hill", "You are such a"]


def _direction(d_model: int, seed: int) -> torch.Tensor:
    d = torch.randn(d_model, generator=torch.Generator().manual_seed(seed))
    return d / d.norm()


def _greedy(model, tok, prompt, n_new, edit=None, layer=1):
    """Greedy decoding without a KV cache (end-of-text suppressed, as the protocol does); with
    ``edit``, block ``layer``'s output is edited at every position but the first."""
    block = model.transformer.h[layer]

    def post(module, args, out):
        x = out[0] if isinstance(out, tuple) else out
        x = torch.cat([x[:, :1], edit(x[:, 1:])], dim=1)
        return (x, *out[1:]) if isinstance(out, tuple) else x

    handle = block.register_forward_hook(post) if edit is not None else None
    ids = torch.tensor([tok(prompt)["input_ids"]])
    try:
        with torch.no_grad():
            for _ in range(n_new):
                logits = model(input_ids=ids, use_cache=False).logits[:, -1]
                logits[:, tok.eos_token_id] = -float("inf")
                ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    finally:
        if handle is not None:
            handle.remove()
    return tok.decode(ids[0, len(tok(prompt)["input_ids"]):], skip_special_tokens=True)


def test_generate_prints_unedited_and_edited_continuations(tiny, tmp_path, capsys):
    model, tok = tiny("tiny-gpt2")
    d = _direction(model.config.n_embd, 3)
    alpha = 4.0
    Edit.from_direction(d, "subtract", layers=[1], alpha=alpha).save(tmp_path / "edit")
    (tmp_path / "prompts.txt").write_text(PROMPTS[1] + "\n\n", encoding="utf-8")
    argv = ["generate", "--model", "tiny-gpt2", "--edit", str(tmp_path / "edit"),
            "--prompt", PROMPTS[0], "--prompts", str(tmp_path / "prompts.txt"),
            "--max-new-tokens", "6"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "subtract L1" in out.splitlines()[0]
    changed = 0
    for prompt in PROMPTS:
        unedited = _greedy(model, tok, prompt, 6)
        edited = _greedy(model, tok, prompt, 6, edit=lambda x: x - alpha * d)
        changed += unedited != edited
        assert (f"prompt:   {prompt!r}\nunedited: {unedited!r}\nedited:   {edited!r}"
                in out), out
    assert changed  # the edit is visible in at least one continuation


@pytest.mark.parametrize("argv, says", [
    (["--edit", "{edit}"], "No prompts"),
    (["--edit", "{edit}", "--prompts", "{latin1}"], "--prompts"),
    (["--edit", "{tmp}", "--prompt", "Hi"], "--edit"),
    (["--edit", "{wide}", "--prompt", "Hi"], "--edit"),
])
def test_generate_bad_input_is_one_line(argv, says, tmp_path, capsys):
    Edit.from_direction(_direction(64, 1), "project", layers=[0]).save(tmp_path / "edit")
    Edit.from_direction(_direction(65, 1), "project", layers=[0]).save(tmp_path / "wide")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    names = {"edit": tmp_path / "edit", "wide": tmp_path / "wide",
             "latin1": tmp_path / "latin1.txt", "tmp": tmp_path}
    argv = ["generate", "--model", "tiny-gpt2", *[a.format(**names) for a in argv]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
