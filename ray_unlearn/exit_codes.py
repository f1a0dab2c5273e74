"""Process exit statuses of every `ray-unlearn` command and job script: one table, for cron alerting.

| code | name | meaning | who acts |
|---|---|---|---|
| 0 | OK | the work was done, or there was nothing to do | nobody |
| 1 | REQUEST_FAILED | a request (or run) ended failed or not_produced: its reason says why | an operator reads the reason |
| 2 | USAGE | a bad option, setting or argument; nothing was touched | whoever wrote the command |
| 3 | GATE_REFUSED | a gate refused (integrity, regression, lineage race, lost lease): requests went back to pending, nothing shipped | an operator reads the reasons; a retry may pass |
| 4 | INFRASTRUCTURE | storage, MLflow or Ray unreachable or refusing (missing bucket, access denied, endpoint down) | whoever runs the infrastructure |

When several apply, the highest code wins (4 > 3 > 1), so an alert on "not 0" sees every problem
and the code names the most urgent one. Typer's own usage errors exit 2 as well.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    REQUEST_FAILED = 1
    USAGE = 2
    GATE_REFUSED = 3
    INFRASTRUCTURE = 4


__all__ = ["ExitCode"]
