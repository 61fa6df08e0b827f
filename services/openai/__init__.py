"""OpenAI-compatible HTTP front end (`pdserve serve openai`): /v1/completions, /v1/chat/completions,
/v1/models, /health and /metrics over aiohttp, as a client of the router's gRPC API.

It holds no engine: it renders chat templates, tokenizes chat prompts, turns OpenAI request
fields into `pdserve.v1.SamplingParams`, relays the router's token stream as OpenAI responses or
server-sent events, and cancels the gRPC call when the HTTP client goes away. Every size, count
and time a client controls is bounded before the work it costs (limits.py).
"""
