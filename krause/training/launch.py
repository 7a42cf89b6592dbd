"""torchrun, with its failures reported the way the entry points report them.

    python -m krause.training.launch --standalone --nproc_per_node 4 -m vision_transformers.train ...

Takes torchrun's arguments and runs `torch.distributed.run` in this process, then:

- a worker that exited 2 (a one-line usage error, already printed by the worker) ends
  the launch with exit code 2 and nothing more: no ChildFailedError block;
- a signal (SIGTERM / SIGINT / SIGUSR1, forwarded to the workers, which save at the next
  step and exit) ends it with one line and exit code 0;
- any other failure prints one line naming the failing rank, its exit code and the last
  line of its error (the full traceback was printed by that rank, and `@record` put it in
  torchrun's error file), and exits with that rank's code (1 for a signal). The failing
  rank is the first that did not die of the SIGTERM torchrun sends the survivors once a
  rank failed; in a tie, one killed by a signal.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # the agent's own "failed (exitcode: N)" log line would repeat what the summary below says
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        run(args)
    except ChildFailedError as e:
        failures = sorted(e.failures.items())
        codes = {f.exitcode for _, f in failures}
        if codes == {2}:
            return 2
        # torchrun SIGTERMs the survivors after the first failure: not the cause; in the same second a
        # rank killed by a signal (the OOM killer, kill -9) is the cause of its peers' broken connections
        rank, first = min(failures, key=lambda rf: (rf[1].exitcode == -signal.SIGTERM, rf[1].timestamp,
                                                    rf[1].exitcode > 0, rf[0]))
        if first.exitcode < 0:  # killed by a signal
            detail = f"killed by signal {-first.exitcode}"
        else:
            lines = [ln for ln in str(first.message or "").splitlines() if ln.strip()]
            detail = f"exit code {first.exitcode}" + (f": {lines[-1].strip()}" if lines else "")
        print(f"launch: rank {rank} failed ({detail}); its traceback is above", file=sys.stderr)
        return first.exitcode if first.exitcode > 0 else 1
    except SignalException as e:
        print(f"launch: stopped by {e.sigval.name}: the workers saved at their next step and exited",
              file=sys.stderr)
        return 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
