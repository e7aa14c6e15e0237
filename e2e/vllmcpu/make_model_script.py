"""Make the tiny random-weight Llama model and its BPE tokenizer. Run with vLLM's python:

    .venv-vllm/bin/python e2e/vllmcpu/make_model_script.py OUT_DIR

Standalone on purpose (no kvswitch imports): transformers, torch and tokenizers live only in .venv-vllm.
Deterministic: fixed seeds, so the same version gives the same token ids everywhere.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
VOCAB_SIZE = 2048
# A Llama-3-like layout: BOS first, one block per turn, each turn ended by EOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more write "
    "go see number no way could people my than first water been call who oil its now find long down day did "
    "get come made may part cache token prefix block decode prefill request model server latency route pod "
    "kv hash event metric picker envoy vllm gpu cpu queue batch stream usage"
).split()


def corpus(seed: int = 7, lines: int = 4000) -> list[str]:
    rnd = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rnd.choice(_WORDS) for _ in range(rnd.randint(4, 30))]
        if rnd.random() < 0.3:
            words.insert(rnd.randrange(len(words)), str(rnd.randint(0, 99999)))
        line = " ".join(words)
        out.append(line.capitalize() + rnd.choice([".", "?", "!", ",", ":"]))
    out.append("<|system|>\n<|user|>\n<|assistant|>\n{\"json\": [1, 2.5, true, null]} #$%&'()*+-/;<=>@[\\]^_`{|}~")
    return out


def make_tokenizer(out: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Like Llama tokenizers: plain encodes (completions) get BOS in front; chat renders BOS in the template.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": True,
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}, indent=2) + "\n"
    )
    return tok.get_vocab_size()


def make_model(out: Path, vocab_size: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(str(out), safe_serialization=True)


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(out)
    make_model(out, vocab)
    print(json.dumps({"dir": str(out), "vocab_size": vocab}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
