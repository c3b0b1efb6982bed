"""dpmjax benchmarks: ``python -m benchmarks [--quick]``."""
