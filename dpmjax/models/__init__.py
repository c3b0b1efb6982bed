"""Models shipped with dpmjax (trained here, on data available offline)."""
