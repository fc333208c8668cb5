"""The core training engine: one loop (``loop.fit``) shared by every strategy and precision."""
