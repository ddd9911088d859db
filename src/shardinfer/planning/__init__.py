"""Before any work: work units, fingerprint, estimate, pre-flight checks, example requests."""
