"""The ``abmll`` command: ``abmll ls`` / ``abmll cp`` (the packaged configs,
:mod:`abmll.config_registry`) and ``abmll evaluate`` (test a finished run again,
:mod:`abmll.evaluate_run`) and ``abmll adapt`` (adapt a finished run to your own task,
:mod:`abmll.adapt`)."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "evaluate":
        from abmll.evaluate_run import main as evaluate_main

        return evaluate_main(args[1:])
    if args and args[0] == "adapt":
        from abmll.adapt import main as adapt_main

        return adapt_main(args[1:])
    from abmll.config_registry import main as configs_main

    return configs_main(args)


if __name__ == "__main__":
    sys.exit(main())
