"""Train the chain-arith tokenizer shipped with the tiny trained models (model_cards/tiny-chain-arith-tokenizer).

A byte-level BPE trained with `tokenizers` on chain-arith text (train stream only). Digits are split off one by
one before BPE, so every digit is its own token; the full byte alphabet is kept, so any text still encodes.
Special tokens sit at fixed ids: `<|pad|>` 0, `<|startoftext|>` 1 (BOS, prepended by the tokenizer),
`<|endoftext|>` 2 (EOS), `<|mdm_mask|>` 3 (the diffusion mask). The chat template turns a user message into
the training prompt: a bare question ("Start with 12. Add 30.") gains the `Question: ` prefix and the closing
` What is the result?`, a message already in that form is kept, and `\\nAnswer:` follows, so chat-style and raw
prompts give the same ids.

    python examples/build_chain_arith_tokenizer.py        # rewrites model_cards/tiny-chain-arith-tokenizer
"""

from __future__ import annotations

import itertools
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from dlm_generation.tasks.chain_arith import train_stream

FOLDER = Path(__file__).resolve().parents[1] / "model_cards" / "tiny-chain-arith-tokenizer"
SPECIAL_TOKENS = ["<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>"]  # ids 0, 1, 2, 3
VOCAB_SIZE = 320  # 4 special + 256 bytes + merges (BPE stops early when the corpus has no more pairs)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{% set question = message['content'] | trim %}"
    "{% if not question.startswith('Question:') %}{% set question = 'Question: ' + question %}{% endif %}"
    "{% if not question.endswith('?') %}{% set question = question + ' What is the result?' %}{% endif %}"
    "{{ question }}"
    "{% elif message['role'] == 'assistant' %}{{ '\\n' }}Answer: {{ message['content'] | trim }}{{ eos_token }}"
    "{% else %}{{ raise_exception('chain-arith chats have only user and assistant messages, got role '"
    " + message['role']) }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n' }}Answer:{% endif %}"
)


def build_tokenizer(corpus_size: int = 20_000) -> PreTrainedTokenizerFast:
    corpus = [p.prompt + p.completion for p in itertools.islice(train_stream(), corpus_size)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A", pair="<|startoftext|> $A $B", special_tokens=[("<|startoftext|>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<|pad|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        mask_token="<|mdm_mask|>",
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    ids = [fast.pad_token_id, fast.bos_token_id, fast.eos_token_id, fast.mask_token_id]
    if ids != [0, 1, 2, 3]:
        raise RuntimeError(f"special token ids moved: {ids}")
    for digit in "0123456789":
        if len(fast.tokenize(f"x {digit}{digit}{digit}")) != 5:
            raise RuntimeError(f"digit {digit} is not its own token: {fast.tokenize(f'x {digit}{digit}{digit}')}")
    return fast


def main() -> None:
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(FOLDER)
    print(f"saved {len(tokenizer)} tokens to {FOLDER}")


if __name__ == "__main__":
    main()
