"""Batch inference jobs over HTTP: `/v1/accounts/{a}/batchInferenceJobs` (route.py), the runner
wired into the server (runtime.py), and one input line run through the serving pipeline
(execute.py). The jobs themselves: girandole.batch."""

from girandole.api.batch.route import install_batch

__all__ = ["install_batch"]
