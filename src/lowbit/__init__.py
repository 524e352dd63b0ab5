"""lowbit: quantize, evaluate and export low-bit LLMs.

Layers import one way only: ``core``, ``models`` and ``data`` at the bottom; ``methods`` and
``formats`` above them (siblings that never import each other); ``pipeline`` above those;
``eval``, ``bench``, ``cli`` on top.
"""

__version__ = "0.1.0"
