"""What ``vtprune eval`` checks before any model loads, beyond the method grammar: lmms-eval task names and
whether their datasets can be read, and method options against the model's config (a layer or head the
model does not have), each failure one ``ValueError`` line."""

from __future__ import annotations

import os

from vtprune.errors import OutOfRange, did_you_mean


def check_tasks(tasks, include_path=None, skip=()) -> None:
    """Every task is one lmms-eval knows (with ``include_path``), and its hub dataset is cached or the hub
    answers; ``skip``: tasks written at run time (the toy task)."""
    tasks = [t for t in tasks if t not in skip]
    if not tasks:
        return
    from loguru import logger
    from lmms_eval.tasks import TaskManager

    logger.disable("lmms_eval")  # its task indexer logs at DEBUG whatever the verbosity: one line is ours
    try:
        manager = TaskManager(verbosity="ERROR", include_path=include_path)
    finally:
        logger.enable("lmms_eval")
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            raise ValueError(f"--tasks {task}: lmms-eval has no such task or group{did_you_mean(task, known)}; "
                             "`lmms-eval --tasks list` lists them (add --include-path for your own)")
    for task in tasks:
        try:
            config = manager._get_config(task)  # a task's yaml (groups have none of their own)
        except Exception:  # noqa: BLE001 - lmms-eval's private reader changed: skip the dataset check
            continue
        path = config.get("dataset_path") if isinstance(config, dict) else None
        if isinstance(path, str) and not os.path.exists(path):
            check_dataset(task, path)


def check_dataset(task: str, repo: str, timeout: float = 10.0) -> None:
    """A hub dataset is in the local cache, or the hub answers within ``timeout`` seconds."""
    from huggingface_hub import HfApi, constants

    if os.path.isdir(os.path.join(constants.HF_HUB_CACHE, "datasets--" + repo.replace("/", "--"))):
        return
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE", "") not in ("", "0")
    if offline:
        raise ValueError(f"--tasks {task}: its dataset {repo} is not in the local hub cache ({constants.HF_HUB_CACHE}) "
                         "and the hub is switched off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); download it once online")
    try:
        HfApi().dataset_info(repo, timeout=timeout)
    except Exception as err:  # noqa: BLE001 - any failure to reach it is the same advice
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise ValueError(f"--tasks {task}: its dataset {repo} is not cached and the hub did not answer ({first}); "
                         "check the network, or download it once online") from None


def check_options(config, specs, keep) -> None:
    """Wrap a weightless copy of the model (meta tensors, from ``config``) with every spec: an option that
    names a layer or head the model lacks raises ``ValueError``.  Other reasons a method cannot apply
    (``NotApplicable``) are left to the sweep, which records such cells and goes on."""
    import torch
    from transformers import AutoModelForImageTextToText

    import vtprune
    from vtprune.spec import parse_spec

    try:
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config)
    except Exception:  # noqa: BLE001 - a model transformers cannot build is reported when it loads
        return
    for spec in specs:
        names, options = parse_spec(spec)
        try:
            vtprune.wrap(model, names, **{"keep": keep, **options} if _takes_keep(names) else options)
        except OutOfRange as err:
            raise ValueError(f"--methods {spec}: {err}") from None
        except Exception:  # noqa: BLE001 - not a range error: the sweep reports it per cell
            continue
        vtprune.unwrap(model)


def _takes_keep(names) -> bool:
    import dataclasses

    from vtprune import methods

    return any("keep" in {f.name for f in dataclasses.fields(methods.get(n))} for n in names)
