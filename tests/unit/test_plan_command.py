"""`gptjt plan`: the plan and each stage's memory for a run config and devices, before a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gptjt_cli.main import main
from gptjt_cli.plan_command import parse_devices

PHASE1 = Path(__file__).resolve().parents[2] / "deploy" / "run-configs" / "gptjt-6b-phase1.toml"


def test_devices_parse_with_counts_or_say_what_is_expected():
    workers = parse_devices("a100:150:80x2, rtx3090:35:24")
    assert [(w.id, w.tflops, w.memory_gb) for w in workers] == [("a100-0", 150.0, 80.0), ("a100-1", 150.0, 80.0),
                                                                ("rtx3090", 35.0, 24.0)]
    for bad in ("a100:150", "a100:x:80", "a100:150:0", ""):
        with pytest.raises(ValueError, match="device|names no device"):
            parse_devices(bad)


def test_gptj_6b_on_24_gb_cards_needs_activation_checkpointing(tmp_path, capsys):
    devices = ["--devices", "rtx4090:80:24x7", "--model", "random:gptj-6b:0"]
    assert main(["plan", "--config", str(PHASE1), *devices]) == 1
    out = capsys.readouterr().out
    assert "no plan" in out and "stage 0 layers 0-4: 45.78 GB" in out  # what the deploy config's comment says
    config = tmp_path / "run.toml"
    config.write_text(PHASE1.read_text().replace("num_stages = 7", 'num_stages = 7\nactivation_checkpointing = "block"'))
    assert main(["plan", "--config", str(config), *devices, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["planned"] and report["activation_checkpointing"] == "block" and len(report["stages"]) == 7
    assert all(row["fits"] and row["memory_gb"] <= 24 * 0.9 for row in report["stages"]), report["stages"]
    assert sorted(w for row in report["stages"] for w in row["workers"]) == [f"rtx4090-{i}" for i in range(7)]
