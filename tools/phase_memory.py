"""Peak RSS of a command's process tree (children included) while each of its output lines was the last.

    python tools/phase_memory.py adaptbir-export build --preset sd21 --random-weights --precision int8 ...

The command's output passes through; at the end, one row per line it printed: the largest summed RSS of the
process and its descendants, sampled every 0.2 s, while that line was the newest (a build prints one line per
phase, so the rows are its phases' peaks). Linux (/proc).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

INTERVAL_S = 0.2


def tree_rss(pid: int) -> int:
    """Summed VmRSS, bytes, of `pid` and its descendants (0 for those already gone)."""
    total, children = 0, []
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
        for task in Path(f"/proc/{pid}/task").iterdir():
            children += Path(task, "children").read_text().split()
    except OSError:
        return total
    return total + sum(tree_rss(int(child)) for child in children)


def main(command: list[str]) -> int:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    last, peaks = ["(before any output)"], {}

    def sample() -> None:
        while process.poll() is None:
            peaks[last[0]] = max(peaks.get(last[0], 0), tree_rss(process.pid))
            time.sleep(INTERVAL_S)

    threading.Thread(target=sample, daemon=True).start()
    for line in process.stdout:
        sys.stdout.write(line)
        if line.strip():
            last[0] = line.strip()[:100]
    status = process.wait()
    print("--- peak RSS of the process tree (GiB) while each line was the last printed")
    for line, peak in peaks.items():
        print(f"{peak / 2**30:6.2f}  {line}")
    return status


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1:]))
