"""Summarise a py-spy raw profile (`py-spy record --format raw --threads [--gil]`): share of samples per thread,
then per function (inclusive, by thread) and per line (own time).

    python bench/pyspy_summary.py PROFILE.raw [TOP]

scripts/profile_engine.sh records such profiles of the GPU process of `serve --frontends N` under load."""
from __future__ import annotations

import collections
import sys

SKIP = ("asyncio/runners", "run_until_complete", "run_forever", "server/cli.py", "<module>", "_run_once",
        "Handle._run", "_bootstrap", "Thread.run", "_worker (concurrent", "_WorkItem")


def summarise(path: str, top: int = 50) -> str:
    inclusive, own, threads = collections.Counter(), collections.Counter(), collections.Counter()
    total = 0
    for line in open(path):
        stack, n = line.rstrip().rsplit(" ", 1)
        n = int(n)
        frames = stack.split(";")
        thread = frames[0].split(": ")[-1].rstrip("_0123456789")  # "thread (tid): name_3" -> name
        threads[thread] += n
        total += n
        seen = set()
        for f in frames[1:]:
            name, _, where = f.partition(" (")
            key = f"{thread} | {name} ({where.split(':')[0]})"
            if key not in seen:
                inclusive[key] += n
                seen.add(key)
        own[f"{thread} | {frames[-1]}"] += n
    out = [f"samples: {total}; by thread: " + ", ".join(f"{t} {v / total:.0%}" for t, v in threads.most_common())]
    out.append("inclusive:")
    out += [f"{v / total * 100:5.1f}% {k}" for k, v in inclusive.most_common() if not any(s in k for s in SKIP)][:top]
    out.append("own (by line):")
    out += [f"{v / total * 100:5.1f}% {k}" for k, v in own.most_common(top // 2)]
    return "\n".join(out)


if __name__ == "__main__":
    print(summarise(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 50))
