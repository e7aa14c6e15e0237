"""``kvswitch serve`` under tracemalloc, for the soak benchmark's memory diagnosis (not for production).

    python -m e2e.bench.traced_picker DIR serve --port P ...

Starts tracemalloc (10 frames) before the picker imports anything, then runs ``extproc.cli.main`` with the rest of
argv. Each SIGUSR1 writes the next snapshot to ``DIR/snapshot-NNN.tracemalloc`` (numbered from 0) and then an empty
``.done`` marker beside it, so the soak knows the file is complete. The handler runs on the main thread between
bytecodes (Python signal semantics), where the event loop also runs: a snapshot is a short pause of the loop, which
is why this is a diagnosis tool and the RSS figures come from a run without it.
"""

from __future__ import annotations

import itertools
import signal
import sys
import tracemalloc
from pathlib import Path
from types import FrameType


def main() -> int:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    tracemalloc.start(10)
    counter = itertools.count()

    def dump(_sig: int, _frame: FrameType | None) -> None:
        path = out / f"snapshot-{next(counter):03d}.tracemalloc"
        tracemalloc.take_snapshot().dump(str(path))
        path.with_suffix(".done").touch()

    signal.signal(signal.SIGUSR1, dump)
    from extproc.cli import main as cli_main

    return cli_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
