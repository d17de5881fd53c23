"""The OpenAI-compatible API (/v1/models, /v1/chat/completions, /v1/completions).

Pure mapping apart from I/O, like the gRPC services: `requests` turns a JSON body into
core's RawRequest (or an error naming the field), `responses` builds the JSON objects
and SSE chunks, `errors` the error shape and statuses, `auth` the key check, `models`
the model's id; `routes` is the thin Quart adapter over `serving.GenerationFlow`.
"""
