"""Process exit codes of every ``dynamo-rl`` command, defined once; each means one thing.

====  =============  ==========================================================================
code  name           meaning
====  =============  ==========================================================================
0     OK             done
1     FAILURE        a runtime failure: a refit, the stack, the frontend or generation, the
                     cluster; inputs were fine (``k8s run --wait`` exits with the driver's code)
2     BAD_INPUT      the recipe, an override, a flag or a file is wrong; found before anything
                     started wherever possible, and nothing is left behind
130   INTERRUPTED    Ctrl-C or SIGTERM; everything the command started was stopped
====  =============  ==========================================================================
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1
    BAD_INPUT = 2
    INTERRUPTED = 130


#: one line for ``--help`` epilogs
HELP = "Exit codes: 0 done, 1 runtime failure, 2 bad input, 130 interrupted."
