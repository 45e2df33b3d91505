"""Rebuild TPRU data from episode sources, train with GRPO / SFT through TRL, evaluate (``tpru_agent.finetune``)."""
