curl https://api.fireworks.ai/inference/v1/completions \
  -H "Content-Type: application/json" \
  -H "Authorization: Bearer $FIREWORKS_API_KEY" \
  -d '{
    "model": "accounts/fireworks/models/deepseek-v3p1",
    "prompt": "Once upon a time"
  }'
