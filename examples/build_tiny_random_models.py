"""Build the tiny random models shipped in model_cards/ (tiny-random-llada, tiny-random-dream).

Their weights are the golden-vector checkpoints of tests/fixtures/golden (random, 512-token vocabulary: mask 500,
EOS/pad 501, EoT 502, BOS 503), saved through the library so that each folder is a complete Hugging Face model for
use with this package installed: safetensors weights, config.json (with the auto_map a pushed copy carries),
generation_config.json, and a byte-level BPE tokenizer trained here with `tokenizers` on a small built-in corpus
(ids 0-499) plus the special tokens. No copies of the library's code: `import dlm_generation` registers the
classes that load the folders (`save_pretrained` / `push_to_hub` of a loaded model still write the code).

They produce gibberish (the weights are random): they exist to run the API offline in seconds. Usage:

    python examples/build_tiny_random_models.py            # rewrites model_cards/tiny-random-*
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import dlm_generation  # noqa: F401  (registers the model types)
from dlm_generation.hub import save_without_code

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "fixtures" / "golden"
CARDS = ROOT / "model_cards"

CORPUS = """
Diffusion language models write a whole answer at once. They start from a canvas of mask tokens and, step by step,
replace the masks they are most confident about with words, until nothing is masked. A block-wise schedule fills the
canvas from left to right, one block at a time, so that the text stays coherent. Caches keep the keys and values of
positions that no longer change, and confidence thresholds let a single step commit several tokens.
Question: Tom has 3 apples and buys 5 more. How many apples does he have? Answer: 3 + 5 = 8. #### 8
Question: A train travels 60 miles in 2 hours. What is its speed? Answer: 60 / 2 = 30 miles per hour. #### 30
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. 0123456789
Hello, world! How are you today? I am fine, thank you. What is the capital of France? Paris is the capital.
"""

SPECIAL_TOKENS = ["<|mdm_mask|>", "<|endoftext|>", "<|eot_id|>", "<|startoftext|>"]  # ids 500, 501, 502, 503
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator([CORPUS] * 4, trainer=trainer)
    if tokenizer.get_vocab_size() != 500:
        raise RuntimeError(f"expected 500 trained tokens, got {tokenizer.get_vocab_size()}")
    # Unused reserved slots 504-511 keep the vocabulary at the models' 512 rows.
    reserved = [f"<|reserved_{i}|>" for i in range(8)]
    tokenizer.add_special_tokens(SPECIAL_TOKENS + reserved)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        mask_token="<|mdm_mask|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        additional_special_tokens=["<|eot_id|>"],
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    assert fast.mask_token_id == 500 and fast.eos_token_id == 501 and fast.convert_tokens_to_ids("<|eot_id|>") == 502
    return fast


CARD = """---
library_name: dlm-generation
tags: [diffusion-language-model, {family}, tiny, random]
---
# tiny-random-{family}

A {params:,}-parameter {arch} with **random weights** (the checkpoint of the golden reference vectors in
`tests/fixtures/golden/tiny-{family}`), plus a byte-level BPE tokenizer trained on a small built-in corpus (ids
0-499; `<|mdm_mask|>` 500, `<|endoftext|>` 501 = EOS = pad, `<|eot_id|>` 502, `<|startoftext|>` 503). It produces
gibberish: it exists to run and test the dlm-generation API offline in seconds. Built by
`examples/build_tiny_random_models.py`; not trained.

```python
import dlm_generation  # registers LLaDA and Dream with the Auto classes (the folder holds no code)
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("model_cards/tiny-random-{family}")
tokenizer = AutoTokenizer.from_pretrained("model_cards/tiny-random-{family}")
ids = tokenizer("Hello", return_tensors="pt").input_ids
print(tokenizer.decode(model.diffusion_generate(ids, max_new_tokens=16)[0]))
```
"""


def main() -> None:
    tokenizer = build_tokenizer()
    for family in tqdm(("llada", "dream"), desc="building models"):
        folder = CARDS / f"tiny-random-{family}"
        model = AutoModelForCausalLM.from_pretrained(GOLDEN / f"tiny-{family}")
        model.generation_config.eot_token_id = 502
        if family == "dream":  # the golden config mirrors Dream-7B's (alg "origin", 512 steps); ship a greedy one
            model.generation_config.alg = "entropy"
            model.generation_config.steps = None
        save_without_code(model, folder)
        tokenizer.save_pretrained(folder)
        arch = "LLaDA (LLaMA-style blocks)" if family == "llada" else "Dream (Qwen2 layout, shifted logits)"
        (folder / "README.md").write_text(CARD.format(family=family, params=model.num_parameters(), arch=arch))
        tqdm.write(f"wrote {folder}")


if __name__ == "__main__":
    main()
