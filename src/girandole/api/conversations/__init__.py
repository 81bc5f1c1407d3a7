"""OpenAI's Conversations API (`route.py`)."""
