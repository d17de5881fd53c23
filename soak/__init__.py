"""`python -m soak` (`make soak`): a real server driven at about twice its capacity by a
mix of well-behaved and abusive clients for a while, measured over time, reported in
docs/RELIABILITY.md. Never part of `make test`."""
