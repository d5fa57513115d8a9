"""gradiag's wire format: Pydantic v2 models and nothing else."""
