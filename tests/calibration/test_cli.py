"""tpcomp calibrate's command line: refusals before the model runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_tpcomp import calibration

pytestmark = pytest.mark.megatron


def test_cli_refuses_to_overwrite_and_rejects_bad_specs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "c.json"
    out.write_text("{}")
    assert calibration.main(["--out", str(out)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert calibration.main(["--out", str(tmp_path / "d.json"), "--spec", "int4:gq"]) == 2
    assert "int4:gq" in capsys.readouterr().err and not (tmp_path / "d.json").exists()


def test_cli_rejects_bad_search_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s.json"
    for extra, message in (
        (["--candidates", "int4:g32@auto"], "algo 'auto'"),
        (["--ppl-budget", "-1"], "argument --ppl-budget: expected a finite number >= 0, got '-1'"),
        (["--ppl-budget", "1", "--kl-budget", "0"], "> 0 to start --ppl-budget"),
        (["--candidates", "int4:gq"], "int4:gq"),
    ):
        try:
            rc = calibration.main(["--out", str(out), "--search", *extra])
        except SystemExit as exc:  # a bad number is a usage error of the parser itself
            rc = exc.code
        assert rc == 2
        assert message in capsys.readouterr().err and not out.exists()
