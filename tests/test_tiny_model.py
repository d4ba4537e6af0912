"""Tests for lmtuner_core.training.tiny_model: a real offline build, reloaded through the Auto* classes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmtuner_core.training.tiny_model import IM_END, MARKER_FILE, make_tiny_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path):
    return transformers.AutoTokenizer.from_pretrained(model_dir)


def _masked_spans(input_ids: list[int], mask: list[int]) -> list[list[int]]:
    """Group the masked token ids into contiguous runs, one per assistant turn."""
    spans: list[list[int]] = []
    previous = 0
    for token_id, flag in zip(input_ids, mask, strict=True):
        if flag and not previous:
            spans.append([])
        if flag:
            spans[-1].append(token_id)
        previous = flag
    return spans


def _assistant_spans(tokenizer, messages: list[dict], **kwargs) -> list[str]:
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **kwargs
    )
    return [tokenizer.decode(span) for span in _masked_spans(out["input_ids"], out["assistant_masks"])]


def test_build_writes_hf_layout(model_dir: Path) -> None:
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        MARKER_FILE,
    ):
        assert (model_dir / name).is_file(), name
    marker = json.loads((model_dir / MARKER_FILE).read_text())
    assert marker["args"]["hidden_size"] == 128


def test_reloads_with_auto_classes(model_dir: Path, tokenizer) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    config = model.config
    assert config.model_type == "llama"
    assert config.head_dim == config.hidden_size // config.num_attention_heads >= 32
    assert config.tie_word_embeddings is False
    assert next(model.parameters()).dtype == torch.float32
    assert max(tokenizer.get_vocab().values()) < config.vocab_size
    assert config.vocab_size >= len(tokenizer)
    assert 900 <= len(tokenizer) <= 1000  # about vocab_target
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|pad|>",
    )
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert tokenizer.model_max_length == config.max_position_embeddings == 2048
    assert tokenizer.convert_tokens_to_ids(IM_END) in model.generation_config.eos_token_id


def test_saved_config_head_dim(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    assert config["hidden_size"] // config["num_attention_heads"] >= 32
    assert config.get("head_dim", 32) >= 32


def test_forward_and_generate(model_dir: Path, tokenizer) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    batch = tokenizer("How do I cook rice?", return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], model.config.vocab_size)
    generated = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] <= batch["input_ids"].shape[1] + 4


def test_assistant_mask_single_turn(tokenizer) -> None:
    messages = [{"role": "user", "content": "Translate the sentence."}, {"role": "assistant", "content": "Bonjour."}]
    assert _assistant_spans(tokenizer, messages) == ["Bonjour.<|im_end|>"]


def test_assistant_mask_multi_turn_excludes_user_and_system(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "You are a doctor."},
        {"role": "user", "content": "What is a fever?"},
        {"role": "assistant", "content": "A high body temperature."},
        {"role": "user", "content": "How do I treat it?"},
        {"role": "assistant", "content": "Rest and drink water."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": " You are welcome 🙂"},
    ]
    spans = _assistant_spans(tokenizer, messages)
    assert spans == [
        "A high body temperature.<|im_end|>",
        "Rest and drink water.<|im_end|>",
        " You are welcome 🙂<|im_end|>",
    ]
    masked_text = "".join(spans)
    for text in ("doctor", "fever", "treat", "Thanks", "assistant", "<|im_start|>"):
        assert text not in masked_text


def test_chat_template_layout(tokenizer) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|begin_of_text|><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


def test_tools_and_tool_calls_rendered(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "It is 21 degrees."},
    ]
    text = tokenizer.apply_chat_template(messages, tools=TOOLS, tokenize=False)
    assert text.startswith("<|begin_of_text|><|im_start|>system\nBe brief.\n\n")
    assert json.dumps(TOOLS[0]) in text
    assert text.count("<|im_start|>system") == 1  # the system prompt is merged into the tools block
    assert '<|im_start|>tool\n{"temp": 21}<|im_end|>' in text
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert _assistant_spans(tokenizer, messages, tools=TOOLS) == [call + "<|im_end|>", "It is 21 degrees.<|im_end|>"]


def test_tool_call_with_string_arguments_and_content(tokenizer) -> None:
    messages = [
        {"role": "user", "content": "x"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [{"function": {"name": "a", "arguments": '{"k": 1}'}}, {"name": "b", "arguments": {}}],
        },
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert (
        'Checking.\n<tool_call>\n{"name": "a", "arguments": {"k": 1}}\n</tool_call>\n'
        '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call><|im_end|>'
    ) in text


@pytest.mark.parametrize(
    "text",
    [
        "Héllo wörld — naïve café, 日本語のテキスト, emoji 🙂🚀, Ω≈ç√",
        '{"instruction": "Übersetze", "output": "☃", "nested": {"list": [1, 2.5, null, true]}}\n',
        "def f(x):\n\treturn {'a': x ** 2}  # comment\r\n    \x00\x7f",
    ],
)
def test_unicode_and_json_round_trip(tokenizer, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    with_bos = tokenizer(text)["input_ids"]
    assert with_bos[0] == tokenizer.bos_token_id
    assert tokenizer.decode(with_bos, skip_special_tokens=True) == text
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids


def test_same_args_is_a_no_op(model_dir: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}
    assert make_tiny_model(model_dir) == model_dir
    assert {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()} == before


def test_deterministic(tmp_path: Path, model_dir: Path) -> None:
    other = make_tiny_model(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (other / name).read_bytes() == (model_dir / name).read_bytes(), name


def test_refuses_foreign_folder_unless_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "busy"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"not empty.*overwrite=True"):
        make_tiny_model(target)
    assert (target / "notes.txt").read_text() == "keep me"
    make_tiny_model(target, overwrite=True)
    assert not (target / "notes.txt").exists() and (target / "config.json").is_file()


def test_different_args_refused_then_rebuilt(tmp_path: Path) -> None:
    target = make_tiny_model(tmp_path / "m", vocab_target=600)
    with pytest.raises(ValueError, match="overwrite=True"):
        make_tiny_model(target, vocab_target=700)
    make_tiny_model(target, vocab_target=700, overwrite=True)
    assert json.loads((target / MARKER_FILE).read_text())["args"]["vocab_target"] == 700


def test_empty_existing_folder_is_used(tmp_path: Path) -> None:
    target = tmp_path / "empty"
    target.mkdir()
    assert (make_tiny_model(target) / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]  # no temporary build folder left behind


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"hidden_size": 64, "num_heads": 4}, "num_heads"),
        ({"hidden_size": 128, "num_heads": 3}, "num_heads"),
        ({"num_heads": 4, "num_kv_heads": 3}, "num_kv_heads"),
        ({"vocab_target": 100}, "vocab_target"),
    ],
)
def test_bad_shapes_refused(tmp_path: Path, kwargs: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        make_tiny_model(tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()


def test_module_import_is_light() -> None:
    heavy = "{'torch', 'transformers', 'tokenizers'}"
    code = f"import sys, lmtuner_core.training.tiny_model; print(sorted({heavy} & set(sys.modules)))"
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
