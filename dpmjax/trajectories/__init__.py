"""Whole trajectories as compiled loops: the scan every sampler runs (:mod:`.scan`), inversion plain
and exact (:mod:`.inversion`, :mod:`.exact`), null-text inversion (:mod:`.null_text`), the per-step
inversion check (:mod:`.step_check`), classifier-free guidance and progress lines."""
