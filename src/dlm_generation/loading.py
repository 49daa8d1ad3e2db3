"""The one model loader of `dlm-generate`, `dlm-demo` and `dlm-eval`'s `dlm` model.

    from dlm_generation.loading import load_models
    model, tokenizer, guide = load_models("model_cards/tiny-llada-chain-arith", device="cpu")

`load_models` checks what it is given before anything is downloaded or loaded, so a mistake answers at once with
what to change instead of after the Hub's network retries:

- a model is a local folder or a Hub id (`name` or `owner/name`). Text that looks like a path (it starts with `.`,
  `/` or `~`, has more than one `/`, a backslash, or a first folder that exists here, as in
  `model_cards/tiny-llada`) must be an existing folder; the error names the folder it looked for and close sibling
  folders. Anything else must be a valid Hub id, and with `HF_HUB_OFFLINE=1` one already in the local cache;
- `dtype` is a floating torch dtype (or its name), `device` a torch device that this machine has;
- the model is a LLaDA or Dream model of this library; the guide (`assistant_model`) an autoregressive one.

Every such mistake raises `ValueError` with a one-line message.
"""

from __future__ import annotations

import difflib
import os
import re
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")
_OFFLINE_VALUES = {"1", "ON", "YES", "TRUE"}


def check_model_source(source: str, what: str = "model", marker: str = "config.json") -> str:
    """`source` as `from_pretrained` should get it: an existing local folder (`~` expanded) or a Hub id.

    `what` names the thing in messages ("model", "assistant model", "PEFT adapter"); `marker` is the file a local
    folder must hold. Raises `ValueError` at once, without network access, when `source` looks like a path but is no
    such folder, is not a valid Hub id, or is a Hub id missing from the local cache while the Hub is offline.
    """
    if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
        raise ValueError(f"the {what} must be a folder or a Hub id (owner/name), got {source!r}")
    text = os.fspath(source)
    local = os.path.expanduser(text)
    if os.path.isdir(local):
        if not os.path.isfile(os.path.join(local, marker)):
            raise ValueError(f"the {what} folder {os.path.abspath(local)} holds no {marker}: pass the folder that "
                             f"save_pretrained wrote{_suggestion(text, local, marker)}")
        return local
    if _looks_like_path(text):
        absolute = os.path.abspath(local)
        if os.path.exists(local):
            raise ValueError(f"{absolute} is a file, not a {what} folder: pass the folder that holds {marker}")
        raise _missing_folder_error(text, local, what, marker)
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError as error:
        raise ValueError(f"the {what} {text!r} is neither a local folder nor a valid Hub id ({error}); pass an "
                         "existing folder or a Hub id such as owner/name") from None
    if _hub_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(text, marker), str):
            raise ValueError(f"the {what} {text!r} is not a local folder, and HF_HUB_OFFLINE=1 but the Hub id is not "
                             "in the local Hugging Face cache: pass a local folder, or download it once with the Hub "
                             "reachable (HF_HUB_OFFLINE unset)")
    return text


def load_models(model_path: str, assistant_model: str | None = None, device: Any = "cpu", dtype: Any = None,
                peft: str | None = None, option_names: dict[str, str] | None = None):
    """(model, tokenizer, guide) for a LLaDA / Dream folder or Hub id, an optional PEFT (LoRA) adapter and an
    optional autoregressive guide (`assistant_model`; `guide` is None without one).

    The tokenizer pads on the left (the canvas follows the prompt); the models are in eval mode on `device`, in
    `dtype` (None: as saved; "auto" as transformers reads it). Raises `ValueError` with a one-line message saying what
    to change for bad arguments and models that fail to load. `option_names` says how the caller's user names the
    `assistant_model` and `peft` settings in messages (the command line: `--assistant-model`, `--peft`).
    """
    names = {"assistant_model": "assistant_model", "peft": "peft", **(option_names or {})}
    torch_dtype = resolve_dtype(dtype)
    torch_device = resolve_device(device)
    model_path = check_model_source(model_path, "model")
    if assistant_model:
        assistant_model = _checked(assistant_model, "the guide", names["assistant_model"], "assistant model")
    if peft:
        peft = _checked(peft, "the adapter", names["peft"], "PEFT adapter", marker="adapter_config.json")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import dlm_generation  # noqa: F401  (registers LLaDA and Dream)

    from .generation_utils import DiffusionGenerationMixin

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
    except OSError as error:
        raise ValueError(f"cannot load {model_path!r}: {_first_line(error)}") from error
    tokenizer.padding_side = "left"
    model = model.to(torch_device).eval()
    if not isinstance(model, DiffusionGenerationMixin):
        raise ValueError(f"{model_path} holds a {type(model).__name__}, not a diffusion model (LLaDA or Dream); pass "
                         f"an autoregressive model as {names['assistant_model']} (the guide of AR-guided decoding)")
    if peft:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, peft).eval()
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot load the adapter {names['peft']} {peft!r}: {_first_line(error)}") from error
    guide = None
    if assistant_model:
        try:
            guide = AutoModelForCausalLM.from_pretrained(assistant_model, dtype=torch_dtype)
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot load the guide {names['assistant_model']} {assistant_model!r}: "
                             f"{_first_line(error)}") from error
        guide = guide.to(torch_device).eval()
    return model, tokenizer, guide


def _checked(source: str, role: str, option: str, what: str, marker: str = "config.json") -> str:
    """`check_model_source` for a secondary model, its errors prefixed with the option that named it."""
    try:
        return check_model_source(source, what, marker)
    except ValueError as error:
        raise ValueError(f"cannot load {role} {option} {source!r}: {error}") from None


def resolve_dtype(dtype: Any):
    """A torch dtype (or None / "auto") from a dtype or its name ("float32", "bfloat16", "float16", "torch.float16")."""
    import torch

    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)} (or auto); float32 is the CPU default, "
                         "bfloat16 the usual choice on a GPU")
    return getattr(torch, name)


def resolve_device(device: Any):
    """A torch device this machine has, from a device or its name ("cpu", "cuda", "cuda:1", "mps")."""
    import torch

    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is not a torch device: pass cpu, cuda, cuda:N or mps") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asks for CUDA, which is not available here: pass cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} asks for Apple's MPS, which is not available here: pass cpu")
    return resolved


# ------------------------------------------------------------------------------------------------------ helpers
def _looks_like_path(text: str) -> bool:
    """Whether `text` is meant as a local path rather than a Hub id (see the module docstring)."""
    if text.startswith((".", "/", "~", "\\")) or os.path.isabs(text) or "\\" in text or text.count("/") > 1:
        return True
    if os.sep != "/" and os.sep in text:
        return True
    first = re.split(r"[\\/]", text)[0]
    return os.path.exists(text) or ("/" in text and os.path.isdir(first))


def _missing_folder_error(text: str, local: str, what: str, marker: str) -> ValueError:
    absolute = os.path.abspath(local)
    existing = absolute
    while not os.path.isdir(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    where = "" if os.path.dirname(absolute) == existing else f"; {existing} is the deepest folder of it that exists"
    return ValueError(f"no {what} folder at {absolute}{_suggestion(text, local, marker)}{where}; pass an existing "
                      "folder or a Hub id (owner/name)")


def _suggestion(text: str, local: str, marker: str) -> str:
    """' (did you mean A or B?)' with the sibling folders of `local` whose names are close to its name."""
    parent, name = os.path.split(os.path.normpath(local))
    try:
        siblings = sorted(entry.name for entry in os.scandir(parent or ".") if entry.is_dir())
    except OSError:
        return ""
    siblings = [s for s in siblings if s != name]
    models = [s for s in siblings if os.path.isfile(os.path.join(parent or ".", s, marker))]
    candidates = models or siblings
    starting = [s for s in candidates if min(len(s), len(name)) >= 4 and (s.startswith(name) or name.startswith(s))]
    close = starting + [s for s in difflib.get_close_matches(name, candidates, n=3, cutoff=0.6) if s not in starting]
    if not close:
        return ""
    given_parent = os.path.dirname(os.path.normpath(text))
    shown = [os.path.join(given_parent, s) if given_parent else s for s in close[:3]]
    return f" (did you mean {' or '.join(shown)}?)"


def _hub_offline() -> bool:
    import huggingface_hub

    from_env = any(os.environ.get(name, "").upper() in _OFFLINE_VALUES for name in ("HF_HUB_OFFLINE",
                                                                                   "TRANSFORMERS_OFFLINE"))
    return from_env or huggingface_hub.is_offline_mode()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
