"""How the paper preset differs from the TPRU authors' own training configs (EasyR1 ``tpru-3b.yaml`` /
``tpru-7b.yaml``), and why. The model card lists these; ``examples/tpru-3b.yaml`` carries the same list as comments.

What is the same is not listed: GRPO without SFT, vision tower trainable, 5 rollouts at temperature 1.0 / top-p
0.99, responses up to 1,024 tokens, KL (k3) 0.01 as a loss term, lr 1e-6 constant with no warm-up, AdamW (0.9,
0.999) with weight decay 0.01, grad clip 1.0, 256 prompts per rollout and 128 per update, one pass per rollout
(``ppo_epochs 1`` = TRL ``num_iterations 1``), 2 epochs, clipping 0.2 / 0.3 with dual clip 3.0, prompts over
7,000 left out, frames at 16,384..36,864 pixels, the reward (rule for rule; tests check it against the authors'
cases).
"""

from __future__ import annotations

#: (topic, the authors' setting, ours, why). Topics are the keys tests look for in examples/tpru-3b.yaml.
DIFFERENCES: tuple[tuple[str, str, str, str], ...] = (
    ("trainer", "EasyR1 (verl), FSDP with parameter and optimizer offload",
     "TRL GRPOTrainer through accelerate, DeepSpeed ZeRO-2 (3B) / ZeRO-3 (7B), fp32 master weights",
     "TRL is the maintained library this SDK builds on; ZeRO shards what FSDP offload saved"),
    ("rollouts", "vLLM, tensor parallel 2, 60% of GPU memory, at most 7 images per prompt",
     "vLLM colocated at 30% when installed, else transformers generate in chunks of generation_chunk_size",
     "TRL's colocate mode; TPRU data has at most 7 images per prompt, so no image limit is needed"),
    ("loss aggregation", "token mean per micro-batch of 4 sequences",
     "TRL loss_type dapo: token mean over the whole update",
     "TRL has no per-micro-batch mode; dapo is the closest and does not depend on the micro-batch size"),
    ("kl", "low-variance k3 estimate clamped to [-10, 10]", "TRL k3 estimate, unclamped",
     "TRL does not clamp; at beta 0.01 and lr 1e-6 the estimate stays far inside the clamp"),
    ("advantage", "(reward - group mean) / (group std + 1e-6)", "TRL scale_rewards group: the same with eps 1e-4",
     "TRL's constant; it only matters for groups whose rewards are all equal (advantage 0 either way)"),
    ("prompt filter", "length of the chat text before images are expanded (with the processor of transformers "
     "4.51 that call returns text, so the 7,000 limit counts characters)",
     "tokens as the model sees them, image tokens included, up to max_prompt_length 7,000",
     "a token count is what bounds memory; at TPRU's sizes (<= 7 images of ~50 tokens) no prompt comes near"),
    ("micro-batches", "4 sequences per GPU for the update, 16 for log-probs",
     "per_device_train_batch_size completions per GPU (10 in the examples), 8 accumulation steps",
     "a memory setting; with the dapo loss it does not change the update"),
    ("format prompt", "the 3B config names format_prompt.jinja (the file is format-prompt.jinja, so EasyR1 drops "
     "the preamble); the 7B config points it at reward.py",
     "the project's preamble; template= (--set template=FILE) loads the authors' format-prompt.jinja",
     "the released configs are buggy: which preamble the released weights saw cannot be told from the repo"),
    ("validation", "on the test split every 5 steps, temperature 0.5", "greedy held-out accuracy at the end "
     "(eval_steps for a curve)", "greedy is what the SDK serves; sampling at 0.5 adds noise to a small test set"),
    ("data order", "shuffle seed 1", "seed 0", "any seed; the data order differs from the authors' run"),
    ("checkpoints", "every 35 steps, last 3 kept", "every save_steps (20 in the examples), last 3 kept",
     "shorter loss of work on preemption"),
)


def differences_markdown() -> list[str]:
    """The model card's section, one bullet per difference."""
    lines = ["## Differences from the authors' recipe", "",
             "The paper preset follows the TPRU authors' EasyR1 configs; where it cannot, or chooses not to:", ""]
    for topic, theirs, ours, why in DIFFERENCES:
        lines.append(f"- **{topic}**: authors: {theirs}; here: {ours}. Why: {why}.")
    return lines + [""]
