"""Saving model folders for use with this package installed (outside the remote-code closure).

`save_pretrained` / `push_to_hub` on a LLaDA or Dream model copy the library's code files next to the weights, so
that the folder works with `trust_remote_code=True` where this package is not installed. Folders that live with the
package (the repository's `model_cards/`, a local cache of checkpoints) do not need those copies: importing
`dlm_generation` registers the model types with the Auto classes, which then load the folder with the installed
code. `save_without_code` writes such a folder.
"""

from __future__ import annotations

from pathlib import Path


def save_without_code(model, folder: str | Path, **kwargs) -> None:
    """`model.save_pretrained(folder, **kwargs)` without the copies of the library's code files.

    config.json keeps its `auto_map` (what a pushed copy of the model would hold); load the folder with
    `import dlm_generation` and `AutoModelForCausalLM.from_pretrained(folder)`.
    """
    # transformers copies code when the class is registered for an Auto class (`is_remote_code()` reads the class
    # attribute), so the registration is lifted for the duration of the save.
    classes = (type(model), type(model.config))
    registered = [cls.__dict__.get("_auto_class") for cls in classes]
    for cls in classes:
        cls._auto_class = None
    try:
        model.save_pretrained(folder, **kwargs)
    finally:
        for cls, value in zip(classes, registered):
            cls._auto_class = value
