"""POST /v1/embeddings (also under /inference/v1): pooled hidden states of the served model."""
