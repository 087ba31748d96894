"""A worker whose own work fails (here: a data file its machine does not have) hands its tickets
back, and the operator sees why in the coordinator's events, not only in the worker's log."""

from __future__ import annotations

from gptjt_cli import tables
from tests.swarm import Swarm, swarm_toml


def test_a_worker_that_cannot_read_its_data_says_why_in_the_coordinators_events(tmp_path, swarms):
    config = swarm_toml(tmp_path, steps=1, num_stages=1)
    missing = tmp_path / "not-here" / "wiki.jsonl.gz"
    text = config.read_text()
    wiki = next(line for line in text.splitlines() if line.startswith("path = "))
    config.write_text(text.replace(wiki, f'path = "{missing}"'))
    swarm = Swarm(tmp_path, config)
    swarms.append(swarm)
    swarm.start_coordinator()
    swarm.start_worker("a")

    def told(status: dict) -> list[str]:
        # among the notable events (the dashboard's default list), not the routine hand-backs
        return [e["detail"] for e in status["notable_events"] if e["kind"] == "work_failed"]

    status = swarm.wait(lambda s: told(s), 120, "a hand-back that says why")
    detail = told(status)[0]
    assert f"DataError: data file '{missing}' does not exist; fix the source path" in detail, detail
    assert status["step"] == 0 and status["tickets"]["committed"] == 0  # nothing counted that was not done
    # and the operator's table shows it as one printable line
    shown = tables.to_text(tables.events_table([e for e in status["notable_events"] if e["detail"] == detail][:1]))
    assert "does not exist" in shown.replace("\n", "")
