"""Model backends: the Backend protocol (base.py) and its implementations."""
