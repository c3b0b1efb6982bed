"""Models for dpmjax: analytic data with exact denoisers (:mod:`.analytic`), the shipped digits models
(:mod:`.digits`, trained here on data available offline) and the Flax Stable Diffusion adapters
(:mod:`.flax_sd`)."""
