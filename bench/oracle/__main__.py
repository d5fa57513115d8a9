"""`make oracle`: record PyTorch's answers as small fixtures the tests compare against.

`make test` never imports torch (a multi-GB download on a fresh machine). What a test needs
from PyTorch (a gradient, a loss, a dead-unit count, an exported ONNX file) is recorded here
once, with the `bench` extra's torch, into tests/fixtures/oracle/<subject>/, and committed.
Each module `bench/oracle/<subject>.py` has `record(out: Path) -> None`; inputs are drawn from
NumPy's seeded generators, so a test can draw the same inputs itself and the fixture holds
only what PyTorch answered (and the seeds and shapes it used).

    make oracle                        # every subject
    make oracle ORACLE_ARGS="ops cnn"  # some subjects
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "oracle"


def subjects() -> list[str]:
    here = Path(__file__).resolve().parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if not m.name.startswith("_"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("subjects", nargs="*", help=f"default: all of {subjects()}")
    args = parser.parse_args()
    for name in args.subjects or subjects():
        module = importlib.import_module(f"bench.oracle.{name}")
        out = FIXTURES / name
        out.mkdir(parents=True, exist_ok=True)
        print(f"oracle: {name} -> {out.relative_to(FIXTURES.parents[2])}")
        module.record(out)


if __name__ == "__main__":
    main()
