"""``tpru data build``: episode sources -> TPRU questions with negatives -> parquet in the TPRU layout."""
