"""lm-evaluation-harness task configurations for the toolkit's own protocols, offline.

``pb_mmlu``, ``pb_gsm8k`` and ``pb_wikitext`` read the same local folders (or hub data sets) as
``pruning_bridge.evals`` and prompt exactly as ``mmlu_accuracy`` / ``gsm8k_accuracy`` do, so lm-eval
and the toolkit's harness can be compared question by question. Their data come from
``local_data.py`` (lm-eval loads it by path through ``custom_dataset: !function``), configured by
lm-eval task metadata (``TaskManager(metadata=...)`` or ``--metadata``): ``data_dir``, ``seed``,
``mmlu_limit``, ``mmlu_shots``, ``gsm8k_limit``, ``gsm8k_shots``, ``wikitext_chars``.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
LOCAL_TASKS = ("pb_mmlu", "pb_gsm8k", "pb_wikitext")

__all__ = ["LOCAL_TASKS", "TASKS_DIR"]
