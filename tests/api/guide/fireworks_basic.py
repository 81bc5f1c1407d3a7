from fireworks import Fireworks

client = Fireworks()

response = client.completions.create(
  model="accounts/fireworks/models/deepseek-v3p1",
  prompt="Once upon a time"
)

print(response.choices[0].text)
