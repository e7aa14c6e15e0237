"""The picker tokenizes chat exactly as the engine does: rendered template, no second BOS."""

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engine.tokens import HFTokenizer
from pickers.tokenize import TokenService
from pickers.types import InferenceRequest


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, the quick brown fox jumps"] * 50, trainer)
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>",
        "chat_template": "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}</s>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
    }))
    return d


def test_chat_tokens_have_one_bos_and_match_encode_chat(hf_dir):
    tokenizer = HFTokenizer(hf_dir)
    service = TokenService(tokenizer)
    messages = [{"role": "system", "content": "the quick brown fox"}, {"role": "user", "content": "hello"}]
    ids = service.tokens_sync(InferenceRequest("r1", "m", api="chat", messages=messages))
    assert ids.tolist() == tokenizer.encode_chat(messages).tolist()
    assert ids.tolist().count(0) == 1 and ids[0] == 0  # the template's BOS, not a second one


def test_completion_tokens_get_bos_and_cache_keys_differ_by_kind(hf_dir):
    tokenizer = HFTokenizer(hf_dir)
    service = TokenService(tokenizer)
    text = tokenizer.render_chat([{"role": "user", "content": "hello"}])
    as_prompt = service.tokens_sync(InferenceRequest("r1", "m", prompt=text))
    as_chat = service.tokens_sync(
        InferenceRequest("r2", "m", api="chat", messages=[{"role": "user", "content": "hello"}]))
    # The same text: as a completions prompt it gets BOS added (two in all), as chat it does not.
    assert as_prompt.tolist() == [0] + as_chat.tolist()


@pytest.mark.parametrize(("builtin", "chars", "threaded"), [
    (True, 200 * 1024, False),  # the built-in tokenizer: a 200 KB prompt is ~0.2 ms, cheaper than a thread's hop
    (True, 2 << 20, True),  # 2 MiB: ~4 ms, worth freeing the event loop for
    (False, 20 * 1024, True),  # a real tokenizer from offload_min_chars (16 KiB)
    (False, 1024, False),
])
async def test_big_prompts_are_encoded_off_the_event_loop_where_it_pays(hf_dir, builtin, chars, threaded):
    import threading

    svc = TokenService(None if builtin else HFTokenizer(str(hf_dir)))
    seen: list[int] = []
    encode = svc._encode

    def spy(text, *args):
        seen.append(threading.get_ident())
        return encode(text, *args)

    svc._encode = spy  # type: ignore[method-assign]
    ids = await svc.tokens(InferenceRequest(request_id="r", model="m", prompt="hello world " * (chars // 12)))
    assert len(ids) > 0 and len(seen) >= 1
    assert (seen[0] != threading.get_ident()) is threaded
