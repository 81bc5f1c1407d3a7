"""Pydantic request schemas of the inference API."""
