"""Error types that the CLI turns into one-line messages and exit codes.

UsageError (exit 2): the user gave something bad (unknown model, malformed file, bad option value).
RuntimeFailure (exit 1): the input was fine but the work failed (out of memory, NaN weights, server gone).
Both carry a message that names the bad thing; nothing already stored is rolled back by raising them.
"""


class ComptrustError(Exception):
    exit_code = 1


class UsageError(ComptrustError):
    exit_code = 2


class RuntimeFailure(ComptrustError):
    exit_code = 1
