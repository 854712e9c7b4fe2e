"""Every task `finetune.py` and `tools.predict` run, by name: the only table of them. A new
task is a module with its `base.Task` and a line here."""

from collections.abc import Callable

from bert_jax.tasks import base, conll, embedding, glue, own, squad, swag

_TASKS: dict[str, Callable[[], base.Task]] = {
    **{name: (lambda spec=spec: glue.GlueTask(spec)) for name, spec in glue.TASKS.items()},
    "squad_v1": lambda: squad.SquadTask("1.1"),
    "squad_v2": lambda: squad.SquadTask("2.0"),
    "conll2003": conll.Conll2003Task,
    "swag": swag.SwagTask,
}
# Tasks on a user's folder: `classify:<folder>`, `tag:<folder>`, `embed:<folder>`.
_ON_FOLDERS: dict[str, Callable[[str], base.Task]] = {
    "classify": own.ClassifyTask,
    "tag": own.TagTask,
    "embed": embedding.EmbeddingTask,
}


def get_task(name: str) -> base.Task:
    """A task by name: a GLUE task (`mrpc`, or `glue:mrpc`), `squad_v1`, `squad_v2`,
    `conll2003`, `swag`, or your own data: `classify:<folder>`, `tag:<folder>`, `embed:<folder>`
    (sentence embeddings)."""
    key = name.lower().removeprefix("glue:")
    prefix, sep, folder = name.partition(":")
    if sep and prefix.lower() in _ON_FOLDERS:
        if not folder:
            raise ValueError(f"task {name!r} names no folder: {prefix}:<folder under data_dir>")
        return _ON_FOLDERS[prefix.lower()](folder)
    if key not in _TASKS:
        try:
            key = glue.get_spec(key).name  # GLUE's spellings: SST-2, sst_2, ...
        except ValueError:
            others = sorted(set(_TASKS) - set(glue.TASKS))
            raise ValueError(
                f"unknown task {name!r}: choose a GLUE task ({', '.join(glue.TASKS)}, or all), "
                f"one of {', '.join(others)}, or your own data as classify:<folder>, "
                f"tag:<folder> or embed:<folder>"
            ) from None
    return _TASKS[key]()


def task_names(spec: str) -> list[str]:
    """`all` or `glue:all`: every GLUE task; otherwise the comma-separated names."""
    names = []
    for name in [t.strip() for t in spec.split(",") if t.strip()]:
        if name.lower() in ("all", "glue:all"):
            names += list(glue.TASKS)
        else:
            names.append(get_task(name).name)
    return names
