"""Generation: sampling, requests, the scheduler/engine and the LLM/SamplingParams API."""
