"""A tiny random-weight Qwen2.5-VL checkpoint built offline, for tests, examples and CPU timings.

The checkpoint has the real architecture (``Qwen2_5_VLForConditionalGeneration``), a byte-level BPE tokenizer
trained here on the TPRU prompt vocabulary with Qwen's normalizer, split regex and special tokens, Qwen2-VL's chat
template and image processor at the TPRU pixel budget, all in the Hub layout with safetensors. It loads through
``AutoModelForImageTextToText`` / ``AutoProcessor`` like a real release, so every engine and the fine-tuning code
run on it unchanged. Nothing is downloaded.

Example:
    >>> from tpru_agent.testing import build_tiny_checkpoint
    >>> folder = build_tiny_checkpoint("/tmp/tpru-tiny")          # doctest: +SKIP
    >>> sorted(p.name for p in folder.iterdir())[:3]               # doctest: +SKIP
    ['chat_template.jinja', 'config.json', 'generation_config.json']
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import shutil
from pathlib import Path

from tpru_agent.errors import ConfigError, require
from tpru_agent.fsutil import atomic_dir
from tpru_agent.sizing import PROCESSOR_MAX_PIXELS, PROCESSOR_MIN_PIXELS

log = logging.getLogger(__name__)

#: Qwen2-VL's special tokens, in Qwen's id order (``<|endoftext|>`` first); ids follow the trained BPE vocabulary.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)

#: Qwen2-VL / Qwen2.5-VL chat template, as the Qwen releases ship it.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Model shapes. ``mrope_section`` sums to head_dim / 2; the vision ``out_hidden_size`` equals the text width.
SIZES: dict[str, dict] = {
    "tiny": dict(
        text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=[4, 6, 6]),
        vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, fullatt_block_indexes=[1]),
    ),
    # tpru-nano's shape (finetune/train/recipes/nano.yaml): ~5.8M parameters, trainable on one CPU core
    "nano": dict(
        text=dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=[8, 12, 12]),
        vision=dict(depth=4, hidden_size=128, intermediate_size=512, num_heads=2, fullatt_block_indexes=[1, 3]),
    ),
    "mid": dict(
        text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, mrope_section=[8, 12, 12]),
        vision=dict(depth=4, hidden_size=256, intermediate_size=1024, num_heads=4, fullatt_block_indexes=[1, 3]),
    ),
}
VOCAB_SIZE = 2000
#: Bumped whenever the recipe changes, so a cached build is rebuilt instead of reused.
RECIPE_VERSION = 2
_STAMP = "tpru_tiny.json"

_DESCRIPTIONS = (
    "making coffee", "opening the drawer", "stacking the red block on the blue block", "pouring water into the cup",
    "assembling a LEGO car", "sending a message in the chat app", "walking from the kitchen to the bedroom",
    "picking up the fork", "putting down a knife", "folding the towel", "wiping the table", "closing the laptop",
)
_SENTENCES = (
    "The robot arm moves to the drawer, grasps the handle and pulls it open.",
    "First the gripper picks up the cup, then it moves above the bowl and pours the water.",
    "The user opens the settings app, taps on Wi-Fi, selects the network and enters the password.",
    "A person walks through the hallway, turns left into the kitchen and stops next to the fridge.",
    "The bricks are placed one by one: the base plate, the wheels, the frame and finally the roof.",
    "Image C shows the starting state because the drawer is still closed and the cup is empty.",
    "In image A the object is already in the bowl, so it must be the last step of the procedure.",
    "The hand moves from the left side of the table to the right side while holding the sponge.",
    "Step 3 should show the block lifted above the table but not yet placed on the other block.",
    "None of the candidate frames matches the description, so the answer is the None option.",
    "The text says the knife is picked up, but the images show it being put down: they do not match.",
    "Comparing the position of the arm in every frame gives the order of the events.",
)


def _corpus(seed: int) -> list[str]:
    """Text the tokenizer is trained on: rendered TPRU prompts, answers, reasoning-like sentences, chat words."""
    from tpru_agent.tasks import next_frame, ordering, previous, render_prompt

    rng = random.Random(seed)
    perms = ["".join(p) for p in itertools.permutations("ABCD")]
    texts = ["system\nYou are a helpful assistant.", "user\n", "assistant\n", *_SENTENCES]
    for desc in (None, *_DESCRIPTIONS):
        for n in (2, 3, 4):
            texts.append(render_prompt(ordering.build(n, description=desc).problem))
        choices = rng.sample(perms, 4)
        texts.append(render_prompt(ordering.build_mcq(4, choices, none_position=rng.randint(0, 4),
                                                      description=desc).problem))
        texts.append(render_prompt(next_frame.build(2, 4, with_goal=True, none_position=rng.randint(0, 4),
                                                    description=desc).problem))
        texts.append(render_prompt(previous.build(3, 4, none_position=rng.randint(0, 4), description=desc).problem))
    for perm in perms:
        why = rng.choice(_SENTENCES)
        texts.append(f"<think>{why} So the order is {', '.join(perm)}.</think>\n<answer>{perm}</answer>")
        texts.append(f"<think>{why}</think><answer>{perm}</answer>")
    for letter in "ABCDEFGHIJ":
        texts.append(f"<think>Option {letter} fits the description best.</think>\n<answer>{letter}</answer>")
        texts.append(f"<answer>{letter}</answer> Image {letter}: Step {rng.randint(1, 7)}:")
    for _ in range(1500):
        texts.append(_sentence(rng))
    rng.shuffle(texts)
    return texts


_VERBS = (
    "pick", "place", "push", "pull", "open", "close", "lift", "lower", "turn", "rotate", "slide", "press", "tap",
    "swipe", "scroll", "type", "select", "drag", "drop", "grasp", "release", "hold", "move", "walk", "enter",
    "leave", "stack", "insert", "remove", "attach", "detach", "fold", "unfold", "pour", "fill", "empty", "wipe",
    "clean", "cut", "slice", "stir", "mix", "heat", "cook", "wash", "dry", "hang", "plug", "unplug", "switch",
    "connect", "assemble", "build", "check", "search", "download", "install", "launch", "navigate", "reach",
    "follow", "cross", "climb", "carry", "throw", "catch", "cover", "uncover", "lock", "unlock", "point", "look",
    "adjust", "align", "arrange", "collect", "compare", "copy", "paste", "delete", "share", "save", "upload",
    "confirm", "cancel", "approach", "avoid", "bend", "twist", "squeeze", "shake", "sort", "count", "measure",
    "mark", "paint", "draw", "write", "read", "record", "play", "pause", "return", "finish", "start", "repeat",
)
_NOUNS = (
    "cup", "bowl", "plate", "fork", "knife", "spoon", "bottle", "drawer", "door", "window", "table", "chair",
    "shelf", "cabinet", "fridge", "microwave", "oven", "sink", "towel", "sponge", "block", "cube", "brick",
    "wheel", "plate", "roof", "base", "car", "house", "tower", "bridge", "button", "screen", "icon", "menu",
    "keyboard", "message", "photo", "camera", "settings", "network", "password", "browser", "page", "link",
    "hallway", "kitchen", "bedroom", "bathroom", "stairs", "corridor", "sofa", "lamp", "box", "lid", "handle",
    "gripper", "arm", "hand", "finger", "object", "target", "goal", "marker", "pen", "paper", "book", "bag",
    "apple", "banana", "orange", "carrot", "egg", "bread", "cheese", "water", "coffee", "tea", "milk", "sugar",
    "cable", "charger", "phone", "laptop", "mouse", "tray", "basket", "rack", "hook", "peg", "lever", "knob",
    "garden", "street", "office", "garage", "floor", "wall", "corner", "counter", "stove", "pan", "pot", "lid",
    "glove", "shoe", "shirt", "jacket", "hat", "scarf", "blanket", "pillow", "mirror", "picture", "clock",
    "calendar", "contact", "email", "folder", "file", "document", "video", "song", "playlist", "map", "route",
    "ticket", "order", "cart", "payment", "account", "profile", "notification", "toggle", "slider", "tab",
    "screw", "bolt", "nut", "panel", "frame", "leg", "seat", "gear", "axle", "motor", "sensor", "battery",
    "plant", "flower", "vase", "candle", "match", "brush", "paint", "canvas", "tape", "scissors", "glue",
    "doorway", "staircase", "elevator", "entrance", "exit", "room", "desk", "closet", "washer", "dryer",
)
_ADJECTIVES = (
    "red", "blue", "green", "yellow", "black", "white", "small", "large", "left", "right", "top", "bottom",
    "open", "closed", "empty", "full", "first", "second", "third", "fourth", "last", "final", "next", "previous",
    "wooden", "metal", "plastic", "glass", "round", "square", "tall", "short", "new", "old", "clean", "dirty",
    "purple", "brown", "pink", "gray", "silver", "golden", "narrow", "wide", "heavy", "light", "soft", "hard",
    "upper", "lower", "middle", "central", "outer", "inner", "front", "back", "hot", "cold", "wet", "shiny",
)
_PLACES = ("on", "in", "under", "next to", "behind", "in front of", "above", "inside", "onto", "into", "near")
_SUBJECTS = ("The robot", "The arm", "The user", "A person", "The agent", "The gripper", "She", "He", "It", "We")


def _inflect(verb: str, form: int) -> str:
    if form == 0:
        return verb + ("es" if verb.endswith(("sh", "ch", "ss", "x")) else "s")
    if form == 1:
        return (verb[:-1] if verb.endswith("e") else verb) + "ing"
    return verb + ("d" if verb.endswith("e") else "ed")


def _noun(rng: random.Random) -> str:
    noun = rng.choice(_NOUNS)
    if rng.random() < 0.5:
        return noun
    return noun + ("es" if noun.endswith(("sh", "ch", "ss", "x", "o")) else "s")


def _sentence(rng: random.Random) -> str:
    form = rng.randint(0, 2)
    verb = _inflect(rng.choice(_VERBS), form)
    aux = "" if form != 1 else " is"
    aux = " has" if form == 2 else aux
    obj = f"the {rng.choice(_ADJECTIVES)} {_noun(rng)}"
    where = f"{rng.choice(_PLACES)} the {_noun(rng)}"
    step = rng.randint(1, 12)
    return f"{rng.choice(_SUBJECTS)}{aux} {verb} {obj} {where} (step {step}, frame {rng.randint(0, 999)})."


def _train_tokenizer(seed: int):
    """Byte-level BPE with Qwen2's normalizer and pre-tokenizer, wrapped as a transformers Qwen2 tokenizer."""
    tokenizers = require("tokenizers", "hf", what="building the tiny checkpoint")
    transformers = require("transformers", "hf", what="building the tiny checkpoint")
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers

    split = transformers.models.qwen2.tokenization_qwen2.PRETOKENIZE_REGEX
    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_corpus(seed), trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    vocab = state["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    # <|endoftext|> is added first (as unk / pad / eos), then the others in Qwen's order; the eos of the chat
    # models is <|im_end|>, set once every id is fixed.
    tok = transformers.Qwen2Tokenizer(vocab=vocab, merges=merges, errors="replace", model_max_length=32768,
                                      split_special_tokens=False)
    tok.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHAT_TEMPLATE
    ids = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    if ids != list(range(len(vocab), len(vocab) + len(SPECIAL_TOKENS))):  # pragma: no cover - recipe guard
        raise RuntimeError(f"special token ids came out as {ids}, not right after the {len(vocab)} BPE tokens")
    return tok


def _model_config(size: str, tok):
    from transformers import Qwen2_5_VLConfig

    shape = SIZES[size]
    text = dict(shape["text"])
    section = text.pop("mrope_section")
    ids = dict(zip(SPECIAL_TOKENS, tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))))
    vocab_size = -(-len(tok) // 64) * 64  # Qwen pads the embedding table past the tokenizer
    text.update(vocab_size=vocab_size, max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(shape["vision"], out_hidden_size=text["hidden_size"], patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, window_size=112, tokens_per_second=2, in_channels=3, hidden_act="silu")
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
    )


def _is_complete(folder: Path, size: str, seed: int) -> bool:
    stamp = folder / _STAMP
    if not stamp.is_file():
        return False
    try:
        meta = json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    want = {"recipe": RECIPE_VERSION, "size": size, "seed": seed}
    return isinstance(meta, dict) and all(meta.get(k) == v for k, v in want.items())


def build_tiny_checkpoint(path: str | os.PathLike, *, size: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight Qwen2.5-VL checkpoint (Hub layout, safetensors) to ``path`` and return it.

    ``size="tiny"`` is ~1M parameters (tests); ``size="nano"`` ~5.8M (tpru-nano's starting point); ``size="mid"``
    is ~30M (CPU timings that mean something). The
    build is idempotent (an existing complete build of the same size, seed and recipe is reused) and atomic
    (written in a temporary sibling folder, then renamed into place).

    Args:
        path: target folder; created, or replaced when it holds a different build.
        size: ``"tiny"`` or ``"mid"``.
        seed: seeds the tokenizer corpus and the weights, so a build is reproducible.

    Raises:
        ConfigError: unknown size.
        EngineUnavailableError: torch / transformers / tokenizers are not installed (extra ``hf``).

    Example:
        >>> folder = build_tiny_checkpoint("/tmp/tpru-tiny", size="tiny")   # doctest: +SKIP
    """
    if size not in SIZES:
        raise ConfigError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    target = Path(path).expanduser().resolve()
    if _is_complete(target, size, seed):
        return target
    require("torch", "hf", what="building the tiny checkpoint")
    require("transformers", "hf", what="building the tiny checkpoint")
    tok = _train_tokenizer(seed)
    model = _random_model(size, tok, seed)
    with atomic_dir(target) as tmp:
        n_params = _write_checkpoint(tmp, model, tok, {"recipe": RECIPE_VERSION, "size": size, "seed": seed})
        if _is_complete(target, size, seed):  # another process finished the same build meanwhile: keep it
            shutil.rmtree(tmp)
            return target
    log.info("built %s Qwen2.5-VL checkpoint (%d parameters) in %s", size, n_params, target)
    return target


def _random_model(size: str, tok, seed: int):
    """The seeded random-weight model of ``size``, with a generation config that stops at end of turn."""
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    config = _model_config(size, tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.text_config.bos_token_id, pad_token_id=config.text_config.pad_token_id,
        eos_token_id=[config.text_config.eos_token_id, config.text_config.bos_token_id],
    )
    return model


def _write_checkpoint(folder: Path, model, tok, stamp: dict) -> int:
    """Save model, tokenizer, processor and the build stamp into ``folder`` (Hub layout); returns the parameters."""
    from transformers import Qwen2VLImageProcessor

    model.save_pretrained(folder, safe_serialization=True)
    # The layout of the Qwen / TPRU releases: tokenizer files + chat template, preprocessor_config.json.
    tok.save_pretrained(folder)
    # The real Qwen2.5-VL-3B/7B-Instruct processor budget, written as the real preprocessor_config.json writes it
    # (top-level min_pixels / max_pixels keys, which beat a size= argument): engines must hold their own budget.
    Qwen2VLImageProcessor(min_pixels=PROCESSOR_MIN_PIXELS, max_pixels=PROCESSOR_MAX_PIXELS).save_pretrained(folder)
    preproc_path = folder / "preprocessor_config.json"
    preproc = json.loads(preproc_path.read_text(encoding="utf-8"))
    preproc.update(min_pixels=PROCESSOR_MIN_PIXELS, max_pixels=PROCESSOR_MAX_PIXELS)
    preproc_path.write_text(json.dumps(preproc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    n_params = sum(p.numel() for p in model.parameters())
    (folder / _STAMP).write_text(json.dumps(dict(stamp, parameters=n_params), indent=2), encoding="utf-8")
    return n_params


def synthetic_frames(count: int = 4, size: tuple[int, int] = (196, 168)) -> list:
    """``count`` distinct RGB frames of a made-up procedure: a square moving right over a tinted gradient.

    The default size (196x168, sides multiples of 28, 32,928 px) lies inside TPRU's pixel budget, so the
    processor keeps it as it is: 12x14 patches, 42 visual tokens per frame.
    """
    import numpy as np
    from PIL import Image

    width, height = size
    yy, xx = np.mgrid[0:height, 0:width]
    frames = []
    for i in range(count):
        img = np.zeros((height, width, 3), dtype=np.uint8)
        img[..., 0] = (xx * 255 // max(width - 1, 1)).astype(np.uint8)
        img[..., 1] = (yy * 255 // max(height - 1, 1)).astype(np.uint8)
        img[..., 2] = (40 + 50 * i) % 256
        side = height // 4
        x0 = 8 + i * (width - side - 16) // max(count - 1, 1)
        img[height // 3: height // 3 + side, x0: x0 + side] = ((255 - 60 * i) % 256, (30 * i) % 256, 255)
        frames.append(Image.fromarray(img, "RGB"))
    return frames


def sample_requests(frames: list) -> list:
    """8 engine requests over the 4 task forms (ordering, ordering MCQ, next frame, previous frame), 3 to 7 images.

    A fixed question set for engine parity tests and benchmarks; needs at least 4 frames.
    """
    from tpru_agent.engines.base import Request
    from tpru_agent.tasks import next_frame, ordering, previous, render_prompt

    f4 = frames[:4]
    f7 = f4 + [f.transpose(0) for f in frames[:3]]  # mirrored copies: 7 distinct frames
    items = [
        (ordering.build(4), [f4[2], f4[0], f4[3], f4[1]]),
        (ordering.build(4, description="making coffee"), [f4[1], f4[3], f4[0], f4[2]]),
        (ordering.build(3, description="opening the drawer"), [f4[2], f4[1], f4[0]]),
        (ordering.build_mcq(4, ["ABCD", "BADC", "CABD", "DCBA"], none_position=2), [f4[3], f4[1], f4[2], f4[0]]),
        (next_frame.build(2, 4, with_goal=True), [f7[0], f7[1], f7[6], f7[4], f7[2], f7[5], f7[3]]),
        (next_frame.build(2, 4, none_position=0, description="pouring water into the cup"), f7[:6]),
        (previous.build(3, 4), [f7[2], f7[3], f7[4], f7[6], f7[1], f7[0], f7[5]]),
        (previous.build(3, 4, none_position=1, description="folding the towel"),
         [f7[4], f7[5], f7[6], f7[0], f7[3], f7[2], f7[1]]),
    ]
    return [Request(q, render_prompt(q.problem), tuple(ims)) for q, ims in items]
