import OpenAI from "openai";

const client = new OpenAI({
  apiKey: process.env.FIREWORKS_API_KEY,
  baseURL: "https://api.fireworks.ai/inference/v1",
});

const response = await client.completions.create({
  model: "accounts/fireworks/models/deepseek-v3p1",
  prompt: "Once upon a time",
});

console.log(response.choices[0].text);
