"""Programs built on the library: the ``dpmjax`` command (:mod:`.cli`), the digits job, the analytic
demo, the batch inversion job and its input stores. Nothing in the library imports from here."""
