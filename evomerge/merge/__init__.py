"""Weight-space merging: recipe -> plan (per-tensor jobs) -> engine (disk or in-place)."""
