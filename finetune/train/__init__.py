"""``tpru finetune``: the configuration, TRL wiring (GRPO, SFT), rewards, callbacks, launch and recipes."""
