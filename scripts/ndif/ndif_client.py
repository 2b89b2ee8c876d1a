"""Client side of the local NDIF (scripts/ndif_local.sh): configure nnsight and build the model.

Also the helper the start script calls (``python scripts/ndif/ndif_client.py COMMAND``):

* ``checkpoint DIR``            write the embedded SmolLM2-135M as a float32 checkpoint in DIR
* ``deploy-yaml DIR TEMPLATE OUT``  fill the deployment YAML template for the checkpoint in DIR
* ``key DIR``                   print the model key a client mints for DIR
* ``ping DIR``                  one remote trace against $NDIF_HOST; exit 0 when it answered

Use from Python (a test module, a notebook)::

    from ndif_client import configure, remote_model      # scripts/ndif on sys.path
    configure("http://127.0.0.1:8011")                   # or NDIF_HOST in the environment
    model = remote_model(".ndif/smollm2-135m")           # meta model: no weights loaded
    with model.trace("Hello", remote=True):
        h = model.model.layers[3].output.save()
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def configure(host: str | None = None, api_key: str | None = None,
              logging: bool = False) -> str:
    """Point nnsight at a local NDIF: ``CONFIG.API.HOST`` (default ``$NDIF_HOST``).

    nnsight 0.8.1 has no ``CONFIG.API.SSL`` setting: the scheme of the host decides (``http://``
    -> plain HTTP and ``ws://``). No auth runs on a server without Postgres, so the API key is
    only carried for telemetry; any value (or none) works. ``logging=False`` turns off the
    live status display.
    """
    from nnsight import CONFIG

    host = host or os.environ.get("NDIF_HOST")
    if not host:
        raise RuntimeError("No NDIF host: pass one or set NDIF_HOST "
                           "(scripts/ndif_local.sh start prints it)")
    CONFIG.API.HOST = host.rstrip("/")
    CONFIG.API.APIKEY = api_key if api_key is not None else CONFIG.API.APIKEY
    CONFIG.APP.REMOTE_LOGGING = logging
    return CONFIG.API.HOST


def checkpoint_path(path: str | os.PathLike) -> str:
    """The key-relevant spelling of a checkpoint directory: absolute and resolved."""
    return str(Path(path).expanduser().resolve())


def seed_model_id(path: str | os.PathLike) -> str:
    """Make nnsight mint a model key for a local directory without asking the Hub.

    ``HuggingFaceModel._remoteable_model_key`` canonicalises the repo id with
    ``HfApi().model_info`` (cached in ``nnsight.modeling.huggingface._ID_CACHE``); a local path
    is not a Hub id, so seed the cache with the path itself. The server deployed exactly this
    string as ``repo_id``.
    """
    from nnsight.modeling import huggingface

    path = checkpoint_path(path)
    huggingface._ID_CACHE[path] = path
    return path


def remote_model(path: str | os.PathLike, tokenizer=None):
    """An nnsight ``LanguageModel`` for the deployed checkpoint, built on the meta device.

    No weights are loaded (only config.json and the tokenizer files are read), the tokenizer is
    passed explicitly, and the model-id cache is seeded so ``model.to_model_key()`` equals the
    key the server deployed.
    """
    import warnings

    from nnsight import LanguageModel
    from transformers import AutoTokenizer

    path = seed_model_id(path)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LanguageModel is a deprecated alias in nnsight 0.8
        return LanguageModel(path, tokenizer=tokenizer)


def local_model(path: str | os.PathLike, tokenizer=None):
    """The same ``LanguageModel`` with the real float32 weights loaded here (for comparisons)."""
    import warnings

    import torch
    from nnsight import LanguageModel
    from transformers import AutoTokenizer

    path = checkpoint_path(path)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LanguageModel(path, tokenizer=tokenizer, dispatch=True, dtype=torch.float32,
                             device_map="cpu")


def model_key(path: str | os.PathLike) -> str:
    return remote_model(path).to_model_key()


# -- commands for scripts/ndif_local.sh ---------------------------------------------------------


def write_checkpoint(directory: str) -> None:
    """Copy the repo's embedded SmolLM2-135M checkpoint (float32 safetensors, converted once by
    ``pruning_bridge.models.smollm2_checkpoint``) to ``directory`` for the server to deploy."""
    import shutil
    import tempfile

    target = Path(directory).resolve()
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        print(f"checkpoint present: {target}")
        return
    repo = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(repo))
    from pruning_bridge.models import smollm2_checkpoint

    source = smollm2_checkpoint()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    shutil.copytree(source, tmp, dirs_exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)  # atomic: a half-written checkpoint is never deployed
    print(f"checkpoint written: {target} (from {source})")


def write_deploy_yaml(directory: str, template: str, out: str) -> None:
    path = checkpoint_path(directory)
    size = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    text = Path(template).read_text()
    # JSON strings are valid YAML scalars, so json.dumps quotes them safely.
    for name, value in {"CHECKPOINT": json.dumps(path), "MODEL_KEY": json.dumps(model_key(path)),
                        "SIZE_BYTES": str(size)}.items():
        text = text.replace(f"@{name}@", value)
    Path(out).write_text(text)
    print(out)


def ping(directory: str) -> None:
    import torch

    configure()
    model = remote_model(directory)
    with model.trace("ping", remote=True):
        out = model.lm_head.output.save()
    assert isinstance(out, torch.Tensor) and out.shape[-1] == model.config.vocab_size, out
    print(f"remote trace ok: lm_head.output {tuple(out.shape)}")


if __name__ == "__main__":
    command, *args = sys.argv[1:] or ["help"]
    commands = {"checkpoint": write_checkpoint, "deploy-yaml": write_deploy_yaml,
                "key": lambda d: print(model_key(d)), "ping": ping}
    if command not in commands:
        sys.exit(__doc__)
    commands[command](*args)
