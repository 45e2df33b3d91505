"""``tpru eval`` and ``tpru label``: accuracy and VOC runs, reports, statistics, held-out checks during training."""
