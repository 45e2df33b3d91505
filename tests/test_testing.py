"""The offline tiny checkpoint: Hub layout, unpatched loading, tokenizer, special tokens, chat template, builds."""

from __future__ import annotations

import json

import pytest

from tpru_agent.errors import ConfigError
from tpru_agent.sizing import PROCESSOR_MAX_PIXELS, PROCESSOR_MIN_PIXELS
from tpru_agent.tasks import next_frame, ordering, previous, render_prompt
from tpru_agent.testing import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tiny_checkpoint

transformers = pytest.importorskip("transformers", reason="the tiny checkpoint needs the [hf] extra")


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return transformers.AutoProcessor.from_pretrained(tiny_checkpoint)


def test_folder_has_the_hub_layout(tiny_checkpoint):
    names = {p.name for p in tiny_checkpoint.iterdir()}
    for required in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json", "preprocessor_config.json", "chat_template.jinja"):
        assert required in names, f"{required} missing from {sorted(names)}"
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))], "pickle weights written"
    assert not [n for n in names if n.startswith(".")], "temporary files left behind"
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert config["model_type"] == "qwen2_5_vl"


def test_loads_unpatched_through_the_auto_classes(tiny_checkpoint, processor):
    model = transformers.AutoModelForImageTextToText.from_pretrained(tiny_checkpoint, use_safetensors=True)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    n_params = sum(p.numel() for p in model.parameters())
    assert 500_000 < n_params < 2_000_000, n_params
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    # the real checkpoint's processor budget, as top-level keys like the real preprocessor_config.json
    preproc = json.loads((tiny_checkpoint / "preprocessor_config.json").read_text())
    assert (preproc["min_pixels"], preproc["max_pixels"]) == (PROCESSOR_MIN_PIXELS, PROCESSOR_MAX_PIXELS)
    text = model.config.text_config
    assert text.hidden_size == model.config.vision_config.out_hidden_size
    assert sum(text.rope_parameters["mrope_section"]) * 2 == text.hidden_size // text.num_attention_heads
    assert text.vocab_size >= len(processor.tokenizer)


def test_special_tokens_match_the_config(tiny_checkpoint, processor):
    tok = processor.tokenizer
    ids = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert len(SPECIAL_TOKENS) == 14 and len(set(ids)) == 14
    assert ids == list(range(ids[0], ids[0] + 14)), "special tokens must follow the BPE vocabulary in Qwen's order"
    assert 1500 <= ids[0] <= 2100, f"BPE vocabulary of {ids[0]} tokens, expected about 2000"
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    named = dict(zip(SPECIAL_TOKENS, ids))
    assert config["image_token_id"] == named["<|image_pad|>"]
    assert config["video_token_id"] == named["<|video_pad|>"]
    assert config["vision_start_token_id"] == named["<|vision_start|>"]
    assert config["vision_end_token_id"] == named["<|vision_end|>"]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    generation = json.loads((tiny_checkpoint / "generation_config.json").read_text())
    assert named["<|im_end|>"] in generation["eos_token_id"]
    for token in SPECIAL_TOKENS:  # each is one unsplittable token and disappears with skip_special_tokens
        assert tok(f"a{token}b", add_special_tokens=False)["input_ids"].count(named[token]) == 1
        assert token not in tok.decode(tok(f"a{token}b")["input_ids"], skip_special_tokens=True)


@pytest.mark.parametrize("problem", [
    ordering.build(4, description="making coffee").problem,
    ordering.build_mcq(4, ["ABCD", "DCBA", "BADC", "CABD"], none_position=2).problem,
    next_frame.build(2, 4, with_goal=True).problem,
    previous.build(3, 4, none_position=0, description="opening the drawer").problem,
    "<think>Image B comes first; café, naïve, 東京 and emoji 🤖 survive the bytes.</think>\n<answer>BDAC</answer>",
])
def test_tokenizer_round_trips_and_compresses_the_prompt_vocabulary(processor, problem):
    tok = processor.tokenizer
    text = render_prompt(problem)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    if problem.startswith("<think>"):
        return
    # trained on this vocabulary: well under one token per 3 characters (bytes alone would be 1 per char)
    assert len(ids) < len(text) / 3, (len(ids), len(text))


def test_answer_tags_tokenize_like_qwen(processor):
    tok = processor.tokenizer
    pieces = [tok.decode([i]) for i in tok("<answer>CABD</answer>", add_special_tokens=False)["input_ids"]]
    # Qwen's split regex glues the closing '>' to the letters: why scoring compares tokens, not strings.
    assert pieces[0] == "<answer" and pieces[1].startswith(">C"), pieces


def test_chat_template_is_qwen2_vl(processor):
    messages = [{"role": "user", "content": [{"type": "text", "text": "Image A: "}, {"type": "image"},
                                             {"type": "text", "text": "\nOrder them."}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nImage A: "
                    "<|vision_start|><|image_pad|><|vision_end|>\nOrder them.<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert processor.chat_template == CHAT_TEMPLATE


def test_build_is_idempotent_and_replaces_a_different_build(tmp_path):
    target = tmp_path / "ckpt"
    first = build_tiny_checkpoint(target, seed=1)
    weights = first / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert build_tiny_checkpoint(target, seed=1) == first
    assert weights.stat().st_mtime_ns == stamp, "a complete build was rebuilt"
    (first / "stale.txt").write_text("left from the old build")
    build_tiny_checkpoint(target, seed=2)
    meta = json.loads((target / "tpru_tiny.json").read_text())
    assert meta["seed"] == 2
    assert not (target / "stale.txt").exists(), "the old folder must be replaced as a whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"], "temporary folders left behind"


def test_seed_makes_builds_reproducible(tmp_path, tiny_checkpoint):
    again = build_tiny_checkpoint(tmp_path / "again", seed=0)
    assert (again / "model.safetensors").read_bytes() == (tiny_checkpoint / "model.safetensors").read_bytes()
    assert (again / "tokenizer.json").read_text() == (tiny_checkpoint / "tokenizer.json").read_text()


def test_unknown_size_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="size must be one of"):
        build_tiny_checkpoint(tmp_path / "x", size="huge")
    assert not (tmp_path / "x").exists()
