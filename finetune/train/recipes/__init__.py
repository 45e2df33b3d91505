"""Training recipes that reproduce a shipped model end to end (``nano``: tpru-nano)."""
