"""The serving pipeline every inference endpoint shares: a validated request to engine requests
per choice, one collect loop and one stream loop, and back to a response shape."""
