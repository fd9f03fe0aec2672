"""``python -m stratus.agents.compute.enter --cgroup DIR ... -- PROGRAM ARGS...``

Moves itself into each cgroup, then execs PROGRAM: the program and every
process it starts are inside the limits from their first instruction (a
process moved in after it started could fork children outside them first).
Standard library only, so it starts fast.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    cgroups: list[str] = []
    i = 0
    while i < len(argv) and argv[i] != "--":
        if argv[i] != "--cgroup" or i + 1 >= len(argv):
            print(
                f"usage: enter --cgroup DIR ... -- PROGRAM ARGS (got {argv[i]!r})", file=sys.stderr
            )
            return 2
        cgroups.append(argv[i + 1])
        i += 2
    program = argv[i + 1 :]
    if not program:
        print("enter: no program given after --", file=sys.stderr)
        return 2
    for cg in cgroups:
        with open(os.path.join(cg, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    os.execvp(program[0], program)
    return 127  # not reached: execvp raises on failure


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
