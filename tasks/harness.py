"""lm-evaluation-harness tasks by name: the index of task files (lm-eval's own, the suite's folder,
the user's ``evaluate.include_path``) and the loaded tasks with their datasets. Used by the
evaluate stage (scoring) and the decontaminate stage (their documents are evaluation documents).
lm-eval itself is imported only when a task is looked up."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable


class TaskDataMissing(RuntimeError):
    """A named harness task whose dataset is not available here."""



def quiet_harness() -> None:
    """lm-eval and datasets log every request batch at INFO; keep warnings."""
    for name in ("lm-eval", "lm_eval", "datasets", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # a passage longer than the model's context is cut on the left, as lm-eval does: said once per item
    logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)


def task_manager(paths: Iterable[str | Path | None], names: Iterable[str] = ()):
    """lm-eval's task index over the folders ``paths`` (the suite's, ``evaluate.include_path``),
    with lm-eval's own tasks only when a name in ``names`` is not found in those folders
    (indexing them all takes seconds)."""
    from lm_eval.tasks import TaskManager
    folders = [str(p) for p in paths if p]
    for folder in folders:
        if not Path(folder).is_dir():
            raise TaskDataMissing(f"evaluate.include_path: {folder} is not a folder of lm-eval task files")
    names = list(names)
    if folders:
        manager = TaskManager(include_path=folders, include_defaults=False)
        if all(n in manager.all_tasks or n in manager.all_groups for n in names):
            return manager
    return TaskManager(include_path=folders or None, include_defaults=bool(names))


def load_tasks(names: list[str], manager) -> dict:
    """lm-eval's loaded tasks ({"tasks", "groups", "group_map"}), their datasets read, zero-shot;
    a task that is unknown, or whose dataset is not available here, raises TaskDataMissing naming
    it and what to do."""
    unknown = [n for n in names if n not in manager.all_tasks and n not in manager.all_groups]
    if unknown:
        raise TaskDataMissing(f"unknown lm-eval task(s) {', '.join(unknown)} (see `lm_eval ls tasks`)")
    loaded: dict = {"tasks": {}, "groups": {}, "group_map": {}}
    for name in names:
        try:
            part = manager.load([name])
        except Exception as e:   # datasets raises ConnectionError, FileNotFoundError, ValueError, ...
            entry = manager.task_index.get(name)
            where = _dataset_of(entry.yaml_path if entry else None)
            raise TaskDataMissing(
                f"lm-eval task {name!r} needs the dataset {where or '(see its YAML)'}, which is not "
                f"available here ({type(e).__name__}). Put it in the Hugging Face datasets cache "
                f"({_hf_cache()}) on a machine with internet (python -c \"import datasets; "
                f"datasets.load_dataset({', '.join(map(repr, (where or 'DATASET').split()))})\") and copy that "
                "folder here, or drop the task from evaluate.tasks") from None
        for k in loaded:
            loaded[k].update(part.get(k) or {})
    for task in loaded["tasks"].values():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=0)
    return loaded


def _dataset_of(yaml_path) -> str | None:
    """'PATH NAME' of the dataset a task's YAML reads (following its include)."""
    if not yaml_path:
        return None
    from lm_eval.tasks._yaml_loader import load_yaml
    try:
        cfg = load_yaml(yaml_path, resolve_func=False)   # includes followed
    except Exception:
        return None
    return " ".join(str(x) for x in (cfg.get("dataset_path"), cfg.get("dataset_name")) if x) or None


def _hf_cache() -> str:
    from datasets import config
    return str(config.HF_DATASETS_CACHE)




def task_documents(task) -> list[tuple[str, str]]:
    """(id, text) of every evaluation document of a loaded lm-eval task, as the model is shown it:
    its decontamination query when the task sets one (``should_decontaminate``), else its prompt
    (``doc_to_text``) followed by its gold answer (``doc_to_target``; for multiple choice, the
    gold choice)."""
    out = []
    delimiter = task.config.target_delimiter or " "
    for i, doc in enumerate(task.eval_docs):
        if task.should_decontaminate():
            text = str(task.doc_to_decontamination_query(doc))
        else:
            prompt, target = task.doc_to_text(doc), task.doc_to_target(doc)
            choices = task.doc_to_choice(doc) if task.config.doc_to_choice is not None else None
            if isinstance(prompt, int) and choices:      # the prompt is one of the choices (winogrande)
                prompt = choices[prompt]
            if isinstance(target, int) and choices:
                target = choices[target]
            elif isinstance(target, list):
                target = " ".join(str(choices[t] if isinstance(t, int) and choices else t) for t in target)
            text = f"{prompt}{delimiter}{target}"
        out.append((f"{task.config.task}:{i}", text))
    return out
