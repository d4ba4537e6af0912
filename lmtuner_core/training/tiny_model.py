"""Build a tiny, randomly initialised Llama model and BPE tokenizer fully offline.

Tests and the demo need a real Hugging Face checkpoint (loadable with ``AutoModelForCausalLM`` and
``AutoTokenizer``, with a chat template that supports assistant-only loss) without touching the network.
torch, transformers and tokenizers are imported inside the functions so that importing this module stays fast.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lmtuner_core.data.chat_template import CHAT_TEMPLATE

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "make_tiny_model"]  # CHAT_TEMPLATE: the tokenizer it builds uses it

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IM_START, IM_END)

MARKER_FILE = "lmtuner_tiny.json"
# Bump when the build output changes, so stale fixtures on disk are not mistaken for current ones.
_FORMAT_VERSION = 1
_REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    MARKER_FILE,
)
_MIN_HEAD_DIM = 32  # vLLM's CPU attention backend rejects head_dim 16
_MIN_VOCAB = 300  # 256 byte symbols + special tokens + a few merges


# Common English words plus the vocabulary of typical instruction datasets, so real prompts tokenize compactly.
_WORD_TEXT = """
the a an and or but if then so because of to in on at by for with from about into over after before under
between through during without within as than like up down out off again once here there when where why how
what which who whom whose this that these those i you he she it we they me him her us them my your his its
our their mine yours is are was were be been being am have has had having do does did doing will would shall
should can could may might must not no yes all any both each few more most other some such only own same too
very just now also well even still back never always often sometimes usually first last next new old good bad
great small large big long short high low right left early late young important different possible free full
easy hard best better true false real sure clear simple open close public private main special certain whole
time year day week month hour minute today tomorrow yesterday morning night people person man woman child
children friend family group company system program problem question answer example number part place case
point fact way thing world life work home school student teacher class lesson book story word sentence
paragraph text language english french german spanish chinese translate translation summary summarize
explain describe list write read say tell ask give take make get go come see know think want need use find
help try call keep let put show turn start stop begin end run move live believe hold bring happen provide
include continue learn change lead understand watch follow create speak allow add spend grow offer remember
consider appear buy wait serve die send expect build stay fall cut reach kill remain suggest raise pass sell
require report decide pull return check choose compare convert generate classify extract rewrite correct
instruction input output response user assistant system prompt task context information data dataset model
training train test evaluate score result value type name title topic idea reason goal step steps method
patient doctor nurse hospital health medicine disease symptom treatment pain fever blood heart test care
recipe food cook cooking water salt sugar flour egg eggs milk butter oil bread rice chicken meat fish soup
salad cheese tomato onion garlic pepper minute minutes cup cups spoon bake boil mix stir serve oven pan
code python function class method variable string integer float list dict array loop return import print
error bug file line program script library module package install version json key value object null true
false def self none lambda yield async await print input output sort search query database table select
from where join server client request http api url web page email message phone address city country state
money price cost pay bank market business job team manager customer product service order account
music song movie game sport ball player win lose play art color red blue green black white light dark
weather rain snow sun wind cold hot warm cool air tree flower animal dog cat bird horse river sea mountain
road car bus train plane travel trip hotel room door window house table chair bed wall floor kitchen
please thank thanks sorry hello hi dear okay yes maybe perhaps however therefore although while until unless
one two three four five six seven eight nine ten hundred thousand million first second third half
"""
_WORDS = tuple(_WORD_TEXT.split())

_SYLLABLE_ONSETS = (
    "b",
    "c",
    "d",
    "f",
    "g",
    "h",
    "j",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "w",
    "z",
    "br",
    "ch",
    "cl",
    "dr",
    "fl",
    "gr",
    "pl",
    "qu",
    "sh",
    "st",
    "th",
    "tr",
)
_SYLLABLE_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ee", "io", "ou", "y")
_SYLLABLE_CODAS = ("", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng")
# JSON, code and Q&A snippets, so the byte patterns of typical training data get merges too.
_SNIPPETS = (
    '{"name": "value", "id": 1, "items": [1, 2, 3], "ok": true}',
    '{"instruction": "Translate the sentence.", "input": "hello", "output": "bonjour"}',
    "def function(x):\n    return x + 1\n",
    "for i in range(10):\n    print(i)\n",
    "import json\nresult = json.loads(text)\n",
    "Question: What is the answer?\nAnswer: The answer is 42.",
)


def make_tiny_model(
    out_dir: str | Path,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_target: int = 1000,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Returns out_dir after writing config.json, model.safetensors, tokenizer files and generation_config.json.

    Deterministic for a given set of arguments. A folder already holding a build with the same arguments is
    returned untouched, so test fixtures can call this repeatedly for free.
    """
    out = Path(out_dir)
    build_args = {
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "vocab_target": vocab_target,
        "max_position_embeddings": max_position_embeddings,
        "seed": seed,
    }
    _validate_args(**build_args)
    if _is_matching_build(out, build_args):
        return out
    _check_target(out, overwrite)

    out.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and move it in at the end: a crash never leaves a half-written folder that
    # looks complete, and concurrent builders (pytest-xdist) cannot interleave files.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _build(tmp, build_args)
        _place(tmp, out, overwrite)
    except (OSError, ValueError):
        if _is_matching_build(out, build_args):  # another process won the race with the same build
            return out
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return out


def _validate_args(
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    vocab_target: int,
    max_position_embeddings: int,
    seed: int,
) -> None:
    """Reject shapes that transformers or vLLM would only reject later, with a less helpful message."""
    for name, value in (
        ("hidden_size", hidden_size),
        ("num_layers", num_layers),
        ("num_heads", num_heads),
        ("num_kv_heads", num_kv_heads),
        ("max_position_embeddings", max_position_embeddings),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    head_dim = hidden_size // num_heads
    if head_dim < _MIN_HEAD_DIM:
        raise ValueError(
            f"head_dim = hidden_size // num_heads = {hidden_size} // {num_heads} = {head_dim} is below "
            f"{_MIN_HEAD_DIM} (vLLM's CPU attention rejects it); raise hidden_size or lower num_heads"
        )
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
    if not isinstance(vocab_target, int) or isinstance(vocab_target, bool) or vocab_target < _MIN_VOCAB:
        raise ValueError(f"vocab_target must be an int >= {_MIN_VOCAB}, got {vocab_target!r}")


def _marker(build_args: dict[str, Any]) -> dict[str, Any]:
    return {"format": _FORMAT_VERSION, "builder": "lmtuner_core.training.tiny_model", "args": build_args}


def _is_matching_build(out: Path, build_args: dict[str, Any]) -> bool:
    """True if `out` holds a complete build made with exactly these arguments."""
    if not all((out / name).is_file() for name in _REQUIRED_FILES):
        return False
    try:
        stored = json.loads((out / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return stored == _marker(build_args)


def _check_target(out: Path, overwrite: bool) -> None:
    """Refuse to clobber a foreign or differently built folder unless asked to."""
    if not out.exists():
        return
    if not out.is_dir():
        if overwrite:
            return
        raise ValueError(f"out_dir {out} exists and is not a directory; pass overwrite=True to replace it")
    if any(out.iterdir()) and not overwrite:
        raise ValueError(
            f"out_dir {out} exists and is not empty (and holds no tiny model built with these "
            "arguments); pass overwrite=True to replace it"
        )


def _place(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished build into place, replacing the old folder only when allowed."""
    if out.is_dir() and not out.is_symlink():
        if any(out.iterdir()):
            if not overwrite:  # filled by someone else since _check_target
                raise ValueError(f"out_dir {out} became non-empty during the build")
            shutil.rmtree(out)
        else:
            out.rmdir()
    elif out.exists() or out.is_symlink():
        out.unlink()
    tmp.rename(out)


def _build(target: Path, build_args: dict[str, Any]) -> None:
    """Write tokenizer, model and generation config into `target`; the marker file goes last."""
    tokenizer = _make_tokenizer(build_args["vocab_target"], build_args["max_position_embeddings"], build_args["seed"])
    model = _make_model(tokenizer, build_args)
    with _quiet_progress_bars():
        tokenizer.save_pretrained(target)
        model.save_pretrained(target, safe_serialization=True)
    (target / MARKER_FILE).write_text(json.dumps(_marker(build_args), indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------- tokenizer


def _make_tokenizer(vocab_target: int, max_length: int, seed: int) -> Any:
    """Train a byte-level BPE and wrap it as a transformers fast tokenizer with a ChatML template."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = _train_bpe(vocab_target, seed)
    bos_id = backend.token_to_id(BOS_TOKEN)
    # Like Llama 3: plain `tokenizer(text)` gets a bos; apply_chat_template encodes without special tokens
    # and takes the bos from the template instead.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B:1", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=max_length,
        padding_side="right",
        # The default clean-up rewrites " ." to "." and would break exact decode round-trips.
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _train_bpe(vocab_target: int, seed: int) -> Any:
    """Train until the vocabulary reaches about `vocab_target`, adding pseudo-words when real words run out."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(seed)
    sentences = [_sentence(rng) for _ in range(2000)] + list(_SNIPPETS)
    extra_words: list[str] = []
    tokenizer = None
    for _ in range(8):
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_target,
            special_tokens=list(SPECIAL_TOKENS),
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is a token: no unknowns, ever
        )
        tokenizer.train_from_iterator(sentences + _pseudo_lines(extra_words), trainer=trainer)
        missing = vocab_target - tokenizer.get_vocab_size()
        if missing <= vocab_target // 100:
            break
        # Each new pseudo-word yields one or more merges; the trainer caps the vocab so overshooting is harmless.
        extra_words += [_pseudo_word(rng) for _ in range(missing)]
    return tokenizer


def _sentence(rng: random.Random) -> str:
    """An English-like sentence: capitalised, punctuated, now and then a comma or a number."""
    words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
    if rng.random() < 0.3:
        words.insert(rng.randrange(1, len(words)), str(rng.randint(0, 2025)))
    if rng.random() < 0.3:
        at = rng.randrange(1, len(words))
        words[at - 1] += ","
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice(".....?!:")


def _pseudo_word(rng: random.Random) -> str:
    syllables = rng.randint(2, 4)
    return "".join(
        rng.choice(_SYLLABLE_ONSETS) + rng.choice(_SYLLABLE_VOWELS) + rng.choice(_SYLLABLE_CODAS)
        for _ in range(syllables)
    )


def _pseudo_lines(words: list[str]) -> list[str]:
    """Pseudo-words repeated in short lines, so they count as frequent pairs for the trainer."""
    return [" ".join(words[i : i + 8]) for i in range(0, len(words), 8)] * 2


# -------------------------------------------------------------------------------------------------------- model


def _make_model(tokenizer: Any, build_args: dict[str, Any]) -> Any:
    """A randomly initialised float32 Llama whose embedding covers every tokenizer id."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    hidden = build_args["hidden_size"]
    bos_id, eos_id, pad_id = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    im_end_id = tokenizer.convert_tokens_to_ids(IM_END)
    # Exactly len(tokenizer): padded rows would be ids a random model can sample but nothing can decode.
    vocab_size = len(tokenizer)
    assert max(tokenizer.get_vocab().values()) < vocab_size
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=build_args["num_layers"],
        num_attention_heads=build_args["num_heads"],
        num_key_value_heads=build_args["num_kv_heads"],
        head_dim=hidden // build_args["num_heads"],
        max_position_embeddings=build_args["max_position_embeddings"],
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):  # seed locally; leave the caller's RNG stream alone
        torch.manual_seed(build_args["seed"])
        model = LlamaForCausalLM(config).to(torch.float32).eval()
    # Chat turns end with <|im_end|>, plain text with <|end_of_text|>: generation must stop at either.
    model.generation_config = GenerationConfig(
        bos_token_id=bos_id, eos_token_id=[eos_id, im_end_id], pad_token_id=pad_id
    )
    return model


@contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """save_pretrained draws a 'Writing model shards' bar; silence it without changing global state for good."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
