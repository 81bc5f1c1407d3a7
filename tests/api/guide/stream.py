from fireworks import Fireworks

client = Fireworks()

stream = client.completions.create(
  model="accounts/fireworks/models/deepseek-v3p1",
  prompt="Once upon a time",
  stream=True
)

for chunk in stream:
    if chunk.choices:
        print(chunk.choices[0].text, end="", flush=True)
    if chunk.usage:
        print("\nusage:", chunk.usage.completion_tokens)
