"""common.tokenizer against transformers.AutoTokenizer, on a Llama-3-style and a Qwen2-style tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend
from transformers import AutoTokenizer

from common.errors import InvalidRequestError
from common.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer, find_stop
from engine.demo_model import write_demo_model

REPO_ROOT = Path(__file__).resolve().parents[2]
CORPUS = (REPO_ROOT / "engine" / "demo_corpus.txt").read_text(encoding="utf-8")
EXTRA_CORPUS = """\
Grüße aus München! Ça va très bien, merci. Él dijo: «¿dónde está la señal?»
日本語のテキストも少し入れておきます。東京は今日も晴れです。中文也可以：你好，世界！
Emoji tests 😀 😃 🚀 ❤️ 👍🏽 and math like ∑ x² ≤ ∞ or arrows → ← ↔.
"""

QWEN_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

CHATML_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- '\\n\\n# Tools\\n\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' + tool | tojson }}
    {%- endfor %}
    {{- '\\n</tools><|im_end|>\\n' }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first %}
        {%- continue %}
    {%- endif %}
    {%- if message.role not in ['user', 'assistant', 'tool'] %}
        {{- raise_exception('unknown role: ' + message.role) }}
    {%- endif %}
    {{- '<|im_start|>' + message.role + '\\n' }}
    {%- if message.content is string %}
        {{- message.content }}
    {%- else %}
        {%- for part in message.content %}
            {{- part.text }}
        {%- endfor %}
    {%- endif %}
    {%- if message.tool_calls is defined %}
        {%- for call in message.tool_calls %}
            {{- '\\n<tool_call>\\n' + call.function | tojson + '\\n</tool_call>' }}
        {%- endfor %}
    {%- endif %}
    {{- '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

TEXTS = [
    "Hello world",
    "The KV cache holds 16 tokens per block; 12 * 34 = 408.",
    "  leading and trailing spaces   ",
    "tabs\t\tand\nnew\n\n\nlines\r\n",
    "Grüße, Ça va, señal, naïve café",
    "e\u0301 decomposed and \u00e9 composed",
    "日本語のテキスト 東京 你好，世界！",
    "emoji 😀🚀 ❤️ 👍🏽 family 👨‍👩‍👧",
    "math ∑ x² ≤ ∞ → ←",
    "special <|eot_id|> and <|im_start|>user in text<|im_end|>",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>",
    "unknown-ish tokens: ʬ ꙮ 𓀀 \u200b zero width",
    "",
    " ",
    "a" * 300,
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is a KV cache?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there! 😀"}],
    [
        {"role": "system", "content": "Answer in German."},
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "  Mir geht es gut, danke.  "},
        {"role": "user", "content": "Und jetzt auf Japanisch? 日本語で"},
    ],
    [{"role": "user", "content": [{"type": "text", "text": "parts "}, {"type": "text", "text": "of text"}]}],
    [{"role": "user", "content": "a <|eot_id|> b <|im_end|> c"}],
]

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Wetter für einen Ort — mit Ümlauten & <html>",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}]


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")


def write_qwen_style_tokenizer(path: Path) -> Path:
    """A Qwen2-style checkpoint: NFC + Qwen split regex + byte-level BPE, ChatML, no BOS."""
    path.mkdir(parents=True, exist_ok=True)
    backend = Backend(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=900, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator([CORPUS, EXTRA_CORPUS], trainer=trainer)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    backend.save(str(path / "tokenizer.json"))
    ids = {t: backend.token_to_id(t) for t in specials}
    _write_json(path / "tokenizer_config.json", {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_prefix_space": False,
        "errors": "replace",
        "split_special_tokens": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 32768,
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for t, i in ids.items()
        },
    })
    # transformers 5 keeps the template in its own file.
    (path / "chat_template.jinja").write_text(CHATML_TEMPLATE, encoding="utf-8")
    _write_json(path / "config.json", {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": backend.get_vocab_size(),
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|endoftext|>"],
    })
    _write_json(path / "generation_config.json",
                {"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "pad_token_id": ids["<|endoftext|>"]})
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_model(tmp_path_factory.mktemp("llama"), hidden_size=64, num_layers=1, num_heads=4,
                            num_kv_heads=2, intermediate_size=128)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_qwen_style_tokenizer(tmp_path_factory.mktemp("qwen"))


@pytest.fixture(scope="module", params=["llama", "qwen"])
def pair(request: pytest.FixtureRequest) -> tuple[Tokenizer, object]:
    path = request.getfixturevalue(f"{request.param}_dir")
    return Tokenizer.from_dir(path), AutoTokenizer.from_pretrained(path)


# ---- encode / decode -------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_hf(pair, text: str) -> None:
    ours, hf = pair
    assert ours.encode(text) == hf.encode(text)
    assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_hf(pair, text: str) -> None:
    ours, hf = pair
    ids = hf.encode(text)
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)


def test_decode_arbitrary_ids_matches_hf(pair) -> None:
    ours, hf = pair
    ids = list(range(0, ours.vocab_size, 7))
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_vocabulary_and_special_ids(pair) -> None:
    ours, hf = pair
    assert ours.vocab_size == len(hf)
    assert ours.bos_token_id == hf.bos_token_id
    assert ours.pad_token_id == hf.pad_token_id
    assert hf.eos_token_id in ours.eos_token_ids
    assert set(hf.all_special_ids) <= ours.all_special_ids


def test_eos_ids_collect_every_source(llama_dir: Path, qwen_dir: Path) -> None:
    llama = Tokenizer.from_dir(llama_dir)
    ids = {llama.encode(t, add_special_tokens=False)[0] for t in ("<|end_of_text|>", "<|eot_id|>")}
    assert llama.eos_token_ids == ids
    assert llama.bos_token_id == llama.encode("x")[0]
    qwen = Tokenizer.from_dir(qwen_dir)
    assert qwen.bos_token_id is None
    assert qwen.eos_token_ids == {qwen.token_to_id("<|im_end|>"), qwen.token_to_id("<|endoftext|>")}
    assert qwen.encode("x") == qwen.encode("x", add_special_tokens=False)


def test_add_bos_token_is_ignored_like_transformers_5(llama_dir: Path, tmp_path: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((llama_dir / name).read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    _write_json(tmp_path / "tokenizer_config.json", config | {"add_bos_token": False, "add_eos_token": True})
    ours, hf = Tokenizer.from_dir(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    # With a tokenizer.json, transformers 5 drops these keys: the post-processor decides.
    assert ours.encode("no bos here") == hf.encode("no bos here")
    assert ours.encode("no bos here")[0] == ours.bos_token_id
    assert ours.encode("no bos here")[-1] != ours.token_to_id("<|eot_id|>")


def test_no_torch_or_transformers_import() -> None:
    code = "import sys, common.tokenizer; assert not {'torch', 'transformers'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


# ---- chat templates --------------------------------------------------------------------------


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_hf(pair, messages, add_generation_prompt: bool) -> None:
    ours, hf = pair
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    expected_ids = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)["input_ids"]
    assert ours.encode_chat(messages, add_generation_prompt=add_generation_prompt) == expected_ids


def test_chat_template_with_tools_matches_hf(pair) -> None:
    ours, hf = pair
    messages = [
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
        {"role": "tool", "content": "{\"temp_c\": 21}"},
    ]
    expected = hf.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages, tools=TOOLS) == expected
    assert "Ümlauten & <html>" in expected  # tojson keeps non-ASCII and does not escape HTML


def test_named_templates_from_config(llama_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((llama_dir / "tokenizer.json").read_bytes())
    config = json.loads((llama_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "default", "template": "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"},
        {"name": "tool_use", "template": "{{ tools | tojson(indent=2) }}{{ messages | length }}"},
    ]
    _write_json(tmp_path / "tokenizer_config.json", config)
    ours, hf = Tokenizer.from_dir(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    messages = CONVERSATIONS[1]
    assert ours.apply_chat_template(messages) == hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True) == "[system]You are terse.[user]Hi there! 😀"
    assert ours.apply_chat_template(messages, tools=TOOLS) == hf.apply_chat_template(
        messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)


def test_loads_what_transformers_5_saves(pair, tmp_path: Path) -> None:
    # transformers 5 writes chat_template.jinja, no special_tokens_map.json, class TokenizersBackend.
    ours, hf = pair
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").is_file()
    reloaded = Tokenizer.from_dir(tmp_path)
    for messages in CONVERSATIONS:
        assert reloaded.apply_chat_template(messages) == ours.apply_chat_template(messages)
    assert reloaded.encode(TEXTS[9]) == ours.encode(TEXTS[9])
    assert reloaded.vocab_size == ours.vocab_size


def test_template_kwargs_reach_the_template(llama_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((llama_dir / "tokenizer.json").read_bytes())
    config = json.loads((llama_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ eos_token }}{% if enable_thinking %}think{% endif %}{{ strftime_now('%Y') }}"
    _write_json(tmp_path / "tokenizer_config.json", config)
    ours = Tokenizer.from_dir(tmp_path)
    rendered = ours.apply_chat_template(CONVERSATIONS[0], enable_thinking=True)
    assert rendered.startswith("<|eot_id|>think") and rendered[-4:].isdigit()


@pytest.mark.parametrize("messages", [
    [],
    "hello",
    [{"role": "user"}],
    [{"role": 3, "content": "x"}],
    [{"role": "user", "content": 5}],
    ["not a dict"],
])
def test_malformed_messages_are_rejected(pair, messages) -> None:
    ours, _ = pair
    with pytest.raises(InvalidRequestError) as info:
        ours.apply_chat_template(messages)
    assert info.value.field == "messages"


def test_template_raise_exception_is_an_invalid_request(qwen_dir: Path) -> None:
    ours = Tokenizer.from_dir(qwen_dir)
    with pytest.raises(InvalidRequestError, match="unknown role: wizard") as info:
        ours.apply_chat_template([{"role": "wizard", "content": "hi"}])
    assert info.value.field == "messages"


def test_missing_template_is_an_invalid_request(llama_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((llama_dir / "tokenizer.json").read_bytes())
    ours = Tokenizer.from_dir(tmp_path)
    with pytest.raises(InvalidRequestError) as info:
        ours.apply_chat_template(CONVERSATIONS[0])
    assert info.value.field == "messages"


def test_sandbox_blocks_mutation(llama_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((llama_dir / "tokenizer.json").read_bytes())
    _write_json(tmp_path / "tokenizer_config.json", {"chat_template": "{{ messages.append(1) }}"})
    with pytest.raises(InvalidRequestError):
        Tokenizer.from_dir(tmp_path).apply_chat_template(CONVERSATIONS[0])


# ---- incremental detokenization ----------------------------------------------------------------

STREAM_TEXTS = [
    "Grüße aus München! 日本語のテキスト 😀🚀 👨‍👩‍👧 done.",
    "ʬ ꙮ 𓀀 rare characters split into single bytes: 🦀🦀🦀",
    "plain ascii with  double  spaces and\nnewlines\n",
]


def _stream(ours: Tokenizer, ids: list[int], prompt: list[int], skip: bool, step: int = 1) -> list[str]:
    detok = IncrementalDetokenizer(ours, prompt, skip_special_tokens=skip)
    deltas = [detok.add(ids[i:i + step]) for i in range(0, len(ids), step)]
    deltas.append(detok.flush())
    assert "".join(deltas) == detok.text
    return deltas


@pytest.mark.parametrize("text", STREAM_TEXTS)
@pytest.mark.parametrize("step", [1, 2, 3])
def test_incremental_detokenizer_matches_full_decode(pair, text: str, step: int) -> None:
    ours, _ = pair
    ids = ours.encode(text, add_special_tokens=False)
    prompt = ours.encode("User said:")
    deltas = _stream(ours, ids, prompt, skip=True, step=step)
    assert "".join(deltas) == ours.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)
    assert deltas[-1] == ""  # nothing was left for flush


def test_split_characters_are_really_exercised(pair) -> None:
    ours, _ = pair
    ids = ours.encode("𓀀🦀", add_special_tokens=False)
    assert any("\ufffd" in ours.decode([i]) for i in ids)  # single tokens hold partial characters
    deltas = _stream(ours, ids, [], skip=True)
    assert "" in deltas[:-1] and "".join(deltas) == "𓀀🦀"


@pytest.mark.parametrize("skip", [True, False])
def test_incremental_detokenizer_with_special_tokens(pair, skip: bool) -> None:
    ours, hf = pair
    eos = "<|eot_id|>" if ours.token_to_id("<|eot_id|>") is not None else "<|im_end|>"
    ids = ours.encode(f"Hello 😀{eos} world{eos}", add_special_tokens=False)
    deltas = _stream(ours, ids, ours.encode("prompt"), skip=skip)
    assert "".join(deltas) == hf.decode(ids, skip_special_tokens=skip)


def test_incomplete_character_is_held_until_flush(pair) -> None:
    ours, _ = pair
    ids = ours.encode("ok 🦀", add_special_tokens=False)
    detok = IncrementalDetokenizer(ours, [])
    emitted = "".join(detok.add([i]) for i in ids[:-1])
    assert "\ufffd" not in emitted
    assert detok.flush().endswith("\ufffd")  # the crab never completed
    assert detok.text == ours.decode(ids[:-1])


def test_prompt_context_keeps_leading_space(pair) -> None:
    ours, _ = pair
    prompt = ours.encode("The answer is", add_special_tokens=False)
    full = ours.encode("The answer is forty two", add_special_tokens=False)
    assert full[:len(prompt)] == prompt
    detok = IncrementalDetokenizer(ours, ours.encode("The answer is"))
    ids = full[len(prompt):]
    assert "".join(detok.add([i]) for i in ids) == " forty two"


# ---- stop strings -----------------------------------------------------------------------------


def test_find_stop_only_checks_the_new_region() -> None:
    text = "one STOP two STOP"
    assert find_stop(text, 5, ["STOP"]) == (13, "STOP")
    assert find_stop(text, 5, ["STOP"], include_stop=True) == (17, "STOP")
    assert find_stop(text, 2, ["STOP"]) == (13, "STOP")  # starts before the new text, ends in it
    assert find_stop(text, 0, ["STOP"]) == (None, None)
    assert find_stop("one STOP two", 4, ["STOP"]) == (None, None)  # the match ended earlier
    assert find_stop("xabc", 4, ["abc", "b"]) == (2, "b")  # the stop that ends first wins
    assert find_stop("xabc", 4, ["bc", "abc"]) == (1, "abc")  # same end: the longest


def _run_matcher(deltas: list[str], stops: list[str], include: bool) -> tuple[list[str], str | None]:
    matcher = StopStringMatcher(stops, include_stop=include)
    out = []
    for delta in deltas:
        emit, stopped, matched = matcher.feed(delta)
        out.append(emit)
        if stopped:
            return out, matched
    out.append(matcher.flush())
    return out, None


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_split_across_tokens(pair, include: bool) -> None:
    ours, _ = pair
    text = "Sure, here it is.\n\nUser: and then more text"
    ids = ours.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(ours, [])
    deltas = [detok.add([i]) for i in ids]
    assert "\n\nUser:" not in deltas  # the stop string really spans tokens
    out, matched = _run_matcher(deltas, ["\n\nUser:"], include)
    assert matched == "\n\nUser:"
    expected = "Sure, here it is.\n\nUser:" if include else "Sure, here it is."
    assert "".join(out) == expected


def test_held_back_text_is_released() -> None:
    matcher = StopStringMatcher(["</answer>"])
    assert matcher.feed("value </an") == ("value ", False, None)
    assert matcher.feed("swer") == ("", False, None)
    assert matcher.feed("!") == ("</answer!", False, None)  # turned out not to be the stop string
    assert matcher.feed(" </") == (" ", False, None)
    assert matcher.flush() == "</"
    assert not matcher.stopped


def test_stop_result_is_independent_of_chunking() -> None:
    text = "alpha beta ]]> gamma ]] delta"
    stops = ["]]>", "a ]"]
    whole = _run_matcher([text], stops, include=False)
    by_char = _run_matcher(list(text), stops, include=False)
    assert "".join(whole[0]) == "".join(by_char[0]) == "alpha bet"
    assert whole[1] == by_char[1] == "a ]"


def test_matcher_without_stops_streams_everything() -> None:
    matcher = StopStringMatcher([])
    assert matcher.feed("abc") == ("abc", False, None)
    assert matcher.flush() == ""


def test_empty_stop_string_is_rejected() -> None:
    with pytest.raises(InvalidRequestError) as info:
        StopStringMatcher(["ok", ""])
    assert info.value.field == "stop"
