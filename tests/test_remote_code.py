"""Saved models carry their code: `save_pretrained` / `push_to_hub` output loads with `trust_remote_code=True` alone.

* The saved folder holds the weights, config.json (auto_map for AutoConfig, AutoModel and AutoModelForCausalLM),
  generation_config.json and the modeling file with every single-dot sibling it imports, byte-identical to the
  library sources and free of absolute `dlm_generation` imports.
* In a fresh interpreter in which `import dlm_generation` fails, `AutoModelForCausalLM.from_pretrained(folder,
  trust_remote_code=True)` runs the copied code and `diffusion_generate` reproduces the pre-save output exactly.
* `push_to_hub` is run offline with `HfApi.create_repo` / `HfApi.create_commit` (and the model-card download)
  replaced by recorders; the recorded commit holds the same files.
"""

from __future__ import annotations

import ast
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard
from huggingface_hub.errors import EntryNotFoundError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import dlm_generation
from dlm_generation import DreamModel, LLaDAModelLM

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
SRC = Path(dlm_generation.__file__).resolve().parent

PROMPT = [[495, 65, 138, 430, 447, 294, 491, 416, 151, 336]]
SHARED_CODE = [
    "generation_utils.py",
    "configuration_diffusion.py",
    "diffusion_cache.py",
    "diffusion_caches.py",
    "diffusion_adaptive_caches.py",
    "diffusion_guidance.py",
    "diffusion_kv_caches.py",
    "diffusion_strategies.py",
    "modeling_diffusion_utils.py",
]

# family -> folder, class, code files, auto_map, generate calls (name -> (seed or None, kwargs))
FAMILIES = {
    "llada": SimpleNamespace(
        folder=GOLDEN / "tiny-llada",
        model_class=LLaDAModelLM,
        code_files=sorted(["modeling_llada.py", "configuration_llada.py", *SHARED_CODE]),
        auto_map={
            "AutoConfig": "configuration_llada.LLaDAConfig",
            "AutoModel": "modeling_llada.LLaDAModelLM",
            "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
        },
        calls={
            # model defaults: low_confidence remasking, temperature 0 (deterministic)
            "default": (None, {"max_new_tokens": 16, "steps": 16, "block_length": 8}),
            "sampled": (1234, {"max_new_tokens": 16, "steps": 16, "block_length": 8, "temperature": 0.7}),
            "dual-cache": (None, {"max_new_tokens": 16, "steps": 16, "block_length": 8, "cache_implementation": "dual"}),
        },
    ),
    "dream": SimpleNamespace(
        folder=GOLDEN / "tiny-dream",
        model_class=DreamModel,
        code_files=sorted(["modeling_dream.py", "configuration_dream.py", *SHARED_CODE]),
        auto_map={
            "AutoConfig": "configuration_dream.DreamConfig",
            "AutoModel": "modeling_dream.DreamModel",
            "AutoModelForCausalLM": "modeling_dream.DreamModel",
        },
        calls={
            # the tiny-dream generation_config.json says alg "origin" (random order): seeded
            "default": (0, {"max_new_tokens": 16, "steps": 16}),
            "entropy": (None, {"max_new_tokens": 16, "steps": 16, "alg": "entropy"}),
            "prefix-cache": (None, {"max_new_tokens": 16, "steps": 16, "block_length": 8, "alg": "entropy",
                                    "cache_implementation": "prefix"}),
        },
    ),
}
WEIGHT_AND_CONFIG_FILES = ["model.safetensors", "config.json", "generation_config.json"]


def _generate_all(model, calls) -> dict:
    """Run every generate call of a family; returns name -> {"sequences": list, "nfe": int}."""
    results = {}
    prompt = torch.tensor(PROMPT)
    for name, (seed, kwargs) in calls.items():
        if seed is not None:
            torch.manual_seed(seed)
        out = model.diffusion_generate(prompt, return_dict_in_generate=True, **kwargs)
        results[name] = {"sequences": out.sequences.tolist(), "nfe": int(out.nfe)}
    return results


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def saved(request, tmp_path_factory):
    """Load a tiny golden model, run diffusion_generate, then save it. Shared by the tests of this module."""
    family = FAMILIES[request.param]
    model = AutoModelForCausalLM.from_pretrained(family.folder)
    assert type(model) is family.model_class
    reference = _generate_all(model, family.calls)
    with torch.no_grad():
        reference_logits = model(torch.tensor(PROMPT)).logits
    out_dir = tmp_path_factory.mktemp(f"saved-{request.param}")
    model.save_pretrained(out_dir)
    return SimpleNamespace(
        name=request.param,
        family=family,
        model=model,
        dir=out_dir,
        reference=reference,
        reference_logits=reference_logits,
    )


# ---------------------------------------------------------------------------------------------------------------
# (a) save_pretrained output
# ---------------------------------------------------------------------------------------------------------------


def test_reference_generation_is_complete(saved):
    # Sanity of the pre-save reference: prompt kept, every mask filled, expected forward counts.
    for name, result in saved.reference.items():
        sequences = result["sequences"]
        assert len(sequences) == 1 and len(sequences[0]) == len(PROMPT[0]) + 16, name
        assert sequences[0][: len(PROMPT[0])] == PROMPT[0], name
        assert 500 not in sequences[0], name
        assert result["nfe"] == 16, name


def test_saved_folder_has_weights_configs_and_code(saved):
    files = sorted(p.name for p in saved.dir.iterdir())
    assert files == sorted(WEIGHT_AND_CONFIG_FILES + saved.family.code_files)
    assert all((saved.dir / f).is_file() and (saved.dir / f).stat().st_size > 0 for f in files)

    config = json.loads((saved.dir / "config.json").read_text())
    assert config["auto_map"] == saved.family.auto_map
    assert config["model_type"] == saved.model.config.model_type
    assert config["mask_token_id"] == 500

    generation_config = json.loads((saved.dir / "generation_config.json").read_text())
    assert generation_config["mask_token_id"] == 500
    assert generation_config["eos_token_id"] == 501

    # Weights: exactly the model's state dict.
    weights = load_file(saved.dir / "model.safetensors")
    state = saved.model.state_dict()
    assert set(weights) == set(state)
    for key, tensor in state.items():
        assert torch.equal(weights[key], tensor), key


def test_saved_code_is_the_library_code(saved):
    for file in saved.family.code_files:
        assert (saved.dir / file).read_bytes() == (SRC / file).read_bytes(), file


def test_saved_code_has_no_absolute_package_import(saved):
    for path in sorted(saved.dir.glob("*.py")):
        text = path.read_text()
        assert "dlm_generation" not in text, f"{path.name} mentions dlm_generation"
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] in {"torch", "transformers", "math", "copy", "difflib", "functools", "os"}, (
                        path.name,
                        alias.name,
                    )
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    top = node.module.split(".")[0]
                    assert top in {"__future__", "torch", "transformers", "huggingface_hub", "typing", "dataclasses"}, (
                        path.name,
                        node.module,
                    )
                else:
                    # Only single-dot siblings, and each one was saved.
                    assert node.level == 1, (path.name, node.module)
                    assert (saved.dir / f"{node.module}.py").is_file(), (path.name, node.module)


@pytest.mark.slow
def test_remote_code_loads_and_generates_identically_without_the_package(saved, tmp_path):
    hf_home = tmp_path / "hf_home"
    modules_cache = tmp_path / "hf_modules"
    calls_json = json.dumps({k: [seed, kwargs] for k, (seed, kwargs) in saved.family.calls.items()})
    logits_path = tmp_path / "logits.pt"
    child = textwrap.dedent(
        """
        import sys

        # Block the library before anything else can import it (the editable install puts src/ on sys.path).
        class _BlockDlmGeneration:
            def find_spec(self, name, path=None, target=None):
                if name == "dlm_generation" or name.startswith("dlm_generation."):
                    raise ModuleNotFoundError(f"{name} is blocked in this test", name=name)
                return None

        sys.meta_path.insert(0, _BlockDlmGeneration())
        sys.modules["dlm_generation"] = None
        try:
            import dlm_generation  # noqa: F401
        except ImportError:
            pass
        else:
            raise SystemExit("import dlm_generation unexpectedly succeeded")
        try:
            import dlm_generation.modeling_llada  # noqa: F401
        except ImportError:
            pass
        else:
            raise SystemExit("import dlm_generation.modeling_llada unexpectedly succeeded")

        import inspect
        import json
        import os

        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(1)  # same as the parent (tests/conftest.py): bitwise-identical float reductions
        folder, calls_json, logits_path, src_dir = sys.argv[1:5]
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        cls = type(model)
        assert cls.__module__.startswith("transformers_modules."), cls.__module__
        module_file = os.path.realpath(inspect.getfile(cls))
        modules_cache = os.path.realpath(os.environ["HF_MODULES_CACHE"])
        assert module_file.startswith(modules_cache + os.sep), (module_file, modules_cache)
        assert type(model.config).__module__.startswith("transformers_modules."), type(model.config).__module__

        prompt = torch.tensor(%s)
        results = {}
        for name, (seed, kwargs) in json.loads(calls_json).items():
            if seed is not None:
                torch.manual_seed(seed)
            out = model.diffusion_generate(prompt, return_dict_in_generate=True, **kwargs)
            results[name] = {"sequences": out.sequences.tolist(), "nfe": int(out.nfe)}
        with torch.no_grad():
            torch.save(model(prompt).logits, logits_path)

        # Nothing of the library was imported along the way.
        assert sys.modules["dlm_generation"] is None
        src_dir = os.path.realpath(src_dir)
        leaked = sorted(
            name
            for name, module in list(sys.modules.items())
            if module is not None
            and getattr(module, "__file__", None)
            and os.path.realpath(module.__file__).startswith(src_dir + os.sep)
        )
        assert not leaked, leaked
        print("RESULTS=" + json.dumps({"class": cls.__name__, "results": results}))
        """
        % (PROMPT,)
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(hf_home),
        HF_MODULES_CACHE=str(modules_cache),
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONDONTWRITEBYTECODE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [sys.executable, "-c", child, str(saved.dir), calls_json, str(logits_path), str(SRC)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS=")]
    assert len(lines) == 1, proc.stdout
    payload = json.loads(lines[0][len("RESULTS=") :])
    assert payload["class"] == saved.family.model_class.__name__
    assert payload["results"] == saved.reference
    torch.testing.assert_close(torch.load(logits_path), saved.reference_logits, rtol=0, atol=0)
    # transformers copied the code into the temporary modules cache, not into the user's cache.
    copied = {p.name for p in modules_cache.rglob("*.py")}
    assert set(saved.family.code_files) <= copied


# ---------------------------------------------------------------------------------------------------------------
# (b) push_to_hub, offline
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def offline_hub(monkeypatch):
    """Replace the three Hub contacts of `PushToHubMixin.push_to_hub` (transformers 5.23 utils/hub.py):

    * `hf_api().create_repo(repo_id, private=, token=, exist_ok=True).repo_id`
    * `create_and_tag_model_card` -> `ModelCard.load(repo_id)`; `EntryNotFoundError` selects the template card
    * `hf_api().create_commit(repo_id=, operations=[CommitOperationAdd(...)], ...)`, called while the temporary
      save folder still exists, so the recorder reads the file contents right away.

    Any socket connection fails, so nothing can reach the network unnoticed.
    """
    record = SimpleNamespace(repos=[], commits=[], card_loads=[])

    def fake_create_repo(self, repo_id, *args, **kwargs):
        record.repos.append((repo_id, kwargs))
        return SimpleNamespace(repo_id=repo_id)

    def fake_create_commit(self, repo_id, operations, *args, **kwargs):
        files = {}
        for op in operations:
            assert isinstance(op, CommitOperationAdd)
            source = op.path_or_fileobj
            if isinstance(source, (str, Path)):
                files[op.path_in_repo] = Path(source).read_bytes()
            elif isinstance(source, bytes):
                files[op.path_in_repo] = source
            else:
                files[op.path_in_repo] = source.read()
        record.commits.append(SimpleNamespace(repo_id=repo_id, files=files, kwargs=kwargs))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0", oid="0" * 40)

    def fake_card_load(cls, repo_id_or_path, *args, **kwargs):
        record.card_loads.append(repo_id_or_path)
        raise EntryNotFoundError(f"no README.md in {repo_id_or_path} (offline test)")

    def no_network(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(HfApi, "create_repo", fake_create_repo)
    monkeypatch.setattr(HfApi, "create_commit", fake_create_commit)
    monkeypatch.setattr(ModelCard, "load", classmethod(fake_card_load))
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    return record


@pytest.mark.parametrize("family_name", sorted(FAMILIES))
def test_push_to_hub_offline_commit_contains_weights_configs_and_code(family_name, offline_hub):
    family = FAMILIES[family_name]
    model = AutoModelForCausalLM.from_pretrained(family.folder)
    repo_id = f"user/tiny-{family_name}"
    result = model.push_to_hub(repo_id)

    assert result.commit_url.startswith(f"https://huggingface.co/{repo_id}")
    assert [repo for repo, _ in offline_hub.repos] == [repo_id]
    assert offline_hub.repos[0][1].get("exist_ok") is True
    assert offline_hub.card_loads == [repo_id]
    assert len(offline_hub.commits) == 1
    commit = offline_hub.commits[0]
    assert commit.repo_id == repo_id
    assert commit.kwargs.get("commit_message") == "Upload model"

    assert sorted(commit.files) == sorted(WEIGHT_AND_CONFIG_FILES + family.code_files + ["README.md"])

    config = json.loads(commit.files["config.json"])
    assert config["auto_map"] == family.auto_map
    assert config["model_type"] == model.config.model_type
    generation_config = json.loads(commit.files["generation_config.json"])
    assert generation_config["mask_token_id"] == 500

    weights = load_safetensors_bytes(commit.files["model.safetensors"])
    state = model.state_dict()
    assert set(weights) == set(state)
    for key, tensor in state.items():
        assert torch.equal(weights[key], tensor), key

    for file in family.code_files:
        assert commit.files[file] == (SRC / file).read_bytes(), file
        assert b"dlm_generation" not in commit.files[file], file

    readme = commit.files["README.md"].decode()
    assert "library_name: transformers" in readme
