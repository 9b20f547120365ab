"""Run the fast test suite on other releases than the lock, and say which package broke which test.

    python scripts/canary.py latest   # newest releases setup.cfg allows (what `pip install hf_vlm` gives)
    python scripts/canary.py lowest   # the lowest releases setup.cfg declares (requirements/lowest.txt)

Why: the registry moves under us (transformers 5.24 renamed Mamba's cache field and broke a fresh
install). `make test` proves the lock; this proves the declared range, in its own virtualenv
(`.venv-latest` / `.venv-lowest`), so the main result stays that of the lock.

When tests fail and some of the watched packages differ from the lock, each of them is put back
to its lock version on its own and the failed tests are re-run: a package whose rollback makes
them pass is named as the one that broke them. Exit code: that of the test run (non-zero when
the range is broken: a failure the next newcomer would hit).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WATCHED = ("transformers", "accelerate", "peft", "datasets")
EXTRAS = os.environ.get("EXTRAS", "test,medical,metrics")
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")


def sh(cmd: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=check, cwd=ROOT, **kwargs)


def lock_versions() -> dict[str, str]:
    versions = {}
    for line in (ROOT / "requirements" / "lock.txt").read_text(encoding="utf-8").splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if match:
            versions[match.group(1).lower().replace("_", "-")] = match.group(2)
    return versions


def installed_versions(python: str) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json; "
        f"print(json.dumps({{n: m.version(n) for n in {list(WATCHED) + ['torch']!r}}}))"
    )
    import json

    return json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout)


def frozen_versions(python: str) -> dict[str, str]:
    """`pip freeze` of a venv as {name: version}, without torch and hf_vlm (as the lock is written)."""
    out = subprocess.run(
        [python, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, text=True, check=True
    ).stdout
    versions = {}
    for line in out.splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if match and match.group(1).lower().replace("_", "-") not in ("torch", "hf-vlm"):
            versions[match.group(1).lower().replace("_", "-")] = match.group(2)
    return versions


def build_venv(kind: str) -> str:
    venv = ROOT / f".venv-{kind}"
    python = str(venv / ("Scripts" if os.name == "nt" else "bin") / "python")
    if not Path(python).exists():
        sh([sys.executable, "-m", "venv", str(venv)])
    if sh([python, "-c", "import torch"], check=False, capture_output=True).returncode != 0:
        sh([python, "-m", "pip", "install", "-q", TORCH_SPEC])
    if kind == "latest":  # newest releases the declared ranges allow, whatever the lock says
        sh(
            [
                python,
                "-m",
                "pip",
                "install",
                "-q",
                "--upgrade",
                "--upgrade-strategy",
                "eager",
                "-e",
                f".[{EXTRAS}]",
                *WATCHED,
            ]
        )
    else:
        sh([python, "-m", "pip", "install", "-q", "-c", "requirements/lowest.txt", "-e", f".[{EXTRAS}]"])
    return python


def run_tests(python: str, *extra: str) -> int:
    return sh([python, "-m", "pytest", "-m", "not slow", "-q", *extra], check=False).returncode


def blame(python: str, installed: dict[str, str], locked: dict[str, str]) -> list[str]:
    """Roll each differing package back to its lock version alone and re-run the failed tests."""
    lines = []
    for name in WATCHED:
        if locked.get(name) in (None, installed[name]):
            continue
        sh([python, "-m", "pip", "install", "-q", f"{name}=={locked[name]}"], check=False)
        fixed = run_tests(python, "--last-failed", "--last-failed-no-failures", "none") == 0
        lines.append(
            f"  {name} {installed[name]} (lock {locked[name]}): "
            + ("rolling it back fixes the failures -> it broke them" if fixed else "not the cause alone")
        )
        sh([python, "-m", "pip", "install", "-q", f"{name}=={installed[name]}"], check=False)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("latest", "lowest"))
    args = parser.parse_args()
    python = build_venv(args.kind)
    installed, locked = installed_versions(python), lock_versions()
    versions = ", ".join(f"{n} {installed[n]}" for n in (*WATCHED, "torch"))
    print(f"\ncanary ({args.kind}): {versions}", flush=True)
    if args.kind == "latest" and frozen_versions(python) == lock_versions():
        # every installed package (not only the watched ones) is exactly the lock's: `make test` ran this
        print(
            f"canary (latest): every package equals the lock; the newest allowed releases are what `make test` "
            f"tested: nothing else to run ({versions})"
        )
        return 0
    code = run_tests(python, "-rf")
    if code == 0:
        print(f"\ncanary ({args.kind}): PASS with {versions}")
        return 0
    print(f"\ncanary ({args.kind}): FAIL with {versions} (the failed tests are listed above)")
    for line in blame(python, installed, locked) if args.kind == "latest" else []:
        print(line)
    print(
        "The lock (make test) is what CI's main result and `make demo` use; a newcomer who runs "
        "`pip install hf_vlm` without it would hit these failures."
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
