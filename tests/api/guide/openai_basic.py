import os
from openai import OpenAI

client = OpenAI(
    api_key=os.environ.get("FIREWORKS_API_KEY"),
    base_url="https://api.fireworks.ai/inference/v1"
)

response = client.completions.create(
    model="accounts/fireworks/models/deepseek-v3p1",
    prompt="Once upon a time"
)

print(response.choices[0].text)
