"""medai: on-device medical imaging AI with a tamper-evident audit trail.

The library stays quiet until asked: it logs through ``logging.getLogger("medai")``
with a ``NullHandler``; the CLI and UI decide verbosity.
"""

import logging

__version__ = "0.1.0"

logging.getLogger("medai").addHandler(logging.NullHandler())
