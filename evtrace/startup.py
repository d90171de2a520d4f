"""What the process had before evtrace's own imports, which ``evtrace run`` gives back to a script.

``evtrace/__init__.py`` imports this module first, before numpy and torch add their warning filters:
``python script.py`` would not have them at its start, so a traced script should not either (cli).
"""

from __future__ import annotations

import warnings

#: the warning filters of the interpreter's start (its -W options and PYTHONWARNINGS included)
WARNING_FILTERS = list(warnings.filters)
