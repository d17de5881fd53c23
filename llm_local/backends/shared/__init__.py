"""What every backend shares, and no backend owns.

Modules: ``bridge`` (one generation's tokens from a worker thread into trio, in groups),
``costs`` (what a decoding step and a prompt token cost, measured while serving),
``threads`` (how many CPUs this process may use, from the affinity mask and the cgroup),
``context`` (where a model's config states its context length), ``source`` (the
configured model's source, or a load error naming why not).
A backend imports from here and from core, never from another backend.
"""
