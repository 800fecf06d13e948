"""Job instances: each a :class:`~secfedtl.federated.job.FederatedJob` (the bundled heart job,
:mod:`secfedtl.jobs.heart`), and the commands that run them (`secfedtl run`, `secfedtl demo`)."""
