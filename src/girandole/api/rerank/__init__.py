"""POST /v1/rerank (also under /inference/v1), and Cohere's POST /v2/rerank."""
