"""Sub-commands of the ``accelcore`` CLI, one module each with ``register(subparsers)``."""
