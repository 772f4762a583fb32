"""What the benchmarks share: their messages (``[tokens, 576]`` activations with one massive channel), sizes and
lists from the command line, a timer, the table-and-JSON report and its partial file while a run goes on."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

#: ``--dtype`` values.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HIDDEN = 576  # SmolLM2-135M's hidden size: messages are [tokens, 576]


def report(records: list[dict], table: str, targets: list[str], json_path: str | None) -> int:
    """Print a benchmark's table and target lines, write its records to ``json_path`` (if given); exit code 0."""
    print(table)
    for line in targets:
        print(line)
    if json_path:
        write_json(records, json_path)
        print(f"wrote {len(records)} records to {json_path}")
    return 0


def split_list(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]`` (comma-separated command-line lists)."""
    return [s.strip() for s in text.split(",") if s.strip()]


def parse_size(text: str) -> int:
    """Bytes from '16KiB', '8MiB', '1GiB', '64KB' or a plain integer."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 1000, "mb": 10**6, "gb": 10**9, "b": 1}
    low = text.strip().lower()
    for suffix, mult in units.items():
        if low.endswith(suffix) and low[: -len(suffix)].strip().replace(".", "", 1).isdigit():
            return int(float(low[: -len(suffix)]) * mult)
    if low.isdigit():
        return int(low)
    raise ValueError(f"bad size {text!r}; expected e.g. 16KiB, 8MiB or a byte count")


def message(nbytes: int, dtype: torch.dtype, *, seed: int = 0, tokens_multiple: int = 1) -> torch.Tensor:
    """A ``[tokens, 576]`` activation of about ``nbytes`` bytes, seeded; ``tokens`` is rounded down to a multiple
    of ``tokens_multiple`` (at least one multiple)."""
    elem = torch.empty((), dtype=dtype).element_size()
    tokens = max(1, nbytes // (elem * HIDDEN))
    tokens = max(tokens_multiple, tokens - tokens % tokens_multiple)
    x = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(seed))
    x[:, 7] *= 300.0  # one massive-activation channel, as in real row-parallel partials
    return x.to(dtype)


def time_call(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes (wall clock)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def size_label(nbytes: int) -> str:
    """'8.0Mi' / '16.0Ki' for table columns."""
    if nbytes >= 1 << 20:
        return f"{nbytes / (1 << 20):.1f}Mi"
    return f"{nbytes / 1024:.1f}Ki"


def write_json(records: list[dict], path: str) -> None:
    """Write ``records`` as a JSON list, atomically (never a half-written file under the final name)."""
    from megatron_tpcomp.cliutil import atomic_write_json, partial_path

    atomic_write_json(path, records, indent=1)
    partial_path(path).unlink(missing_ok=True)  # the records of the unfinished run, now complete


def check_json_path(path: str | None) -> None:
    """Check ``--json FILE`` before any timing (a bad path must not cost the run); its folder is created."""
    if path:
        from megatron_tpcomp.cliutil import check_output_file

        check_output_file(path, "--json")


def partial_writer(path: str | None) -> Callable[[list[dict]], None] | None:
    """A callback that rewrites ``FILE.partial`` (atomically) with the records finished so far, or None."""
    if not path:
        return None
    from megatron_tpcomp.cliutil import atomic_write_json, partial_path

    return lambda records: atomic_write_json(partial_path(path), records, indent=1)


def add_launch_arguments(parser: argparse.ArgumentParser, timeout_s: float) -> None:
    """The options every benchmark that launches ranks on a shaped link ends with: the tbf queue, the deadline of
    one launch, the JSON output and ``--quiet``."""
    from megatron_tpcomp.cliutil import add_quiet_argument

    parser.add_argument("--limit", default=None, help="tbf queue, e.g. 1MiB (default: 250 ms at the rate, >= 8MiB)")
    parser.add_argument("--timeout", type=float, default=timeout_s, help=f"seconds per launch (default {timeout_s:g})")
    parser.add_argument("--json", metavar="FILE", help="also write one record per case as a JSON list to FILE")
    add_quiet_argument(parser, "no progress or link lines from this process (the table and errors only)")
