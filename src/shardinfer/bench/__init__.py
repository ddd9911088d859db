"""``shardinfer bench``: throughput of the pipeline against the raw engine on a synthetic corpus."""
