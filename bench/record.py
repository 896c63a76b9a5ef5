"""Turn a pytest-benchmark JSON file into a markdown table with machine, date, revision and command.

    python bench/record.py RESULT.json "COMMAND" > bench/results/NAME.md
"""
import json
import platform
import subprocess
import sys


def main(path: str, command: str) -> None:
    data = json.load(open(path))
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip()
    m = data["machine_info"]
    print(f"- date: {data['datetime']}")
    print(f"- machine: {m.get('cpu', {}).get('brand_raw', platform.processor())}, "
          f"{m.get('cpu', {}).get('count', '?')} cores, {platform.system()} {platform.release()}")
    print(f"- git revision: {rev}{' (with uncommitted changes)' if dirty else ''}")
    print(f"- command: `{command}`\n")
    rows = data["benchmarks"]
    extra_keys = sorted({k for b in rows for k in b["extra_info"]})
    print("| test | median ms | IQR ms | min ms | rounds | " + " | ".join(extra_keys) + " |")
    print("|---|---|---|---|---|" + "---|" * len(extra_keys))
    for b in sorted(rows, key=lambda b: b["name"]):
        s = b["stats"]
        ex = [b["extra_info"].get(k, "") for k in extra_keys]
        ex = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in ex]
        print(f"| {b['name']} | {s['median']*1e3:.2f} | {s['iqr']*1e3:.2f} | {s['min']*1e3:.2f} | {s['rounds']} | "
              + " | ".join(ex) + " |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
