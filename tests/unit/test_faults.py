"""The GPTJT_FAULTS grammar (worker/faults.py): good strings arm what they say, bad ones fail loudly,
and GPTJT_FAULTS_ONCE_DIR hands each fault to one process."""

from __future__ import annotations

import pytest

from worker.faults import Armed, Faults, LieSettings, parse_faults


@pytest.mark.parametrize("text, armed", [
    ("", {}),
    ("poison@3", {"poison": Armed(3)}),
    (" nan@0 , die-checkpoint@2 ,", {"nan": Armed(0), "die-checkpoint": Armed(2)}),
    ("lie-scale@2", {"lie-scale": Armed(2, 1.0)}),
    ("lie-noise@3:0.25", {"lie-noise": Armed(3, 0.25)}),
    ("lie-stale-grad@1:.5,lie-zero@4:1", {"lie-stale-grad": Armed(1, 0.5), "lie-zero": Armed(4, 1.0)}),
    ("isolate-averaging@1,lie-zero-grad@0", {"isolate-averaging": Armed(1), "lie-zero-grad": Armed(0)}),
])
def test_good_strings_arm_what_they_say(text, armed):
    assert parse_faults(text) == armed


@pytest.mark.parametrize("text, says", [
    ("poisson@3", "expected KIND@STEP"),
    ("lie-scale", "expected KIND@STEP"),
    ("lie-scale@-1", "expected KIND@STEP"),
    ("lie-scale@x", "expected KIND@STEP"),
    ("lie-scale-gradient@2", "expected KIND@STEP"),
    ("lie-scale@2:", "expected KIND@STEP"),
    ("lie-scale@2:1e-2", "expected KIND@STEP"),
    ("poison@3:0.5", "only lie-\\* kinds take a fraction"),
    ("lie-scale@2:0", "give one in \\(0, 1\\]"),
    ("lie-scale@2:1.5", "give one in \\(0, 1\\]"),
    ("lie-scale@2,lie-zero@3", "one lie per tensor"),
    ("lie-noise-grad@2,lie-stale-grad@3", "one lie per tensor"),
])
def test_bad_strings_fail_loudly(text, says):
    with pytest.raises(ValueError, match=says):
        parse_faults(text)


def test_lie_settings_default_to_what_a_1e_2_check_must_catch_and_are_checked():
    assert LieSettings.from_env({}) == LieSettings(1.1, 0.05)
    assert LieSettings.from_env({"GPTJT_LIE_SCALE": "0.5", "GPTJT_LIE_NOISE": "0.2"}) == LieSettings(0.5, 0.2)
    for env, says in [({"GPTJT_LIE_SCALE": "big"}, "GPTJT_LIE_SCALE='big' is not a finite number"),
                      ({"GPTJT_LIE_SCALE": "inf"}, "is not a finite number"),
                      ({"GPTJT_LIE_SCALE": "1"}, "makes lie-scale honest"),
                      ({"GPTJT_LIE_NOISE": "0"}, "adds no noise"),
                      ({"GPTJT_LIE_NOISE": "nan"}, "GPTJT_LIE_NOISE='nan' is not a finite number")]:
        with pytest.raises(ValueError, match=says):
            LieSettings.from_env(env)


def test_without_a_once_dir_every_process_fires_and_claims():
    faults = Faults(parse_faults("poison@2,lie-zero@1"))
    assert not faults.fires("poison", 1) and faults.fires("poison", 2) and faults.fires("poison", 2)
    assert faults.claim("lie-zero") and faults.claim("lie-zero")
    assert not faults.claim("lie-scale")  # not armed


def test_a_once_dir_gives_a_fault_to_one_process_and_a_lie_to_one_for_good(tmp_path):
    first, second = (Faults(parse_faults("die-checkpoint@2,lie-stale@1"), str(tmp_path)) for _ in range(2))
    assert first.fires("die-checkpoint", 2)
    assert not second.fires("die-checkpoint", 2) and "die-checkpoint" not in second.armed
    assert second.claim("lie-stale")  # the first to ask is the liar...
    assert not first.claim("lie-stale") and "lie-stale" not in first.armed
    assert second.claim("lie-stale") and second.claim("lie-stale")  # ...and stays one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["die-checkpoint@2", "lie-stale@1"]


def test_a_fault_given_back_fires_again_in_the_next_process_to_reach_it(tmp_path):
    """die-checkpoint whose upload was refused before half of it went out (the worker's session
    had ended) must still happen once: the chaos soak counts on it."""
    first = Faults(parse_faults("die-checkpoint@2"), str(tmp_path))
    assert first.fires("die-checkpoint", 2)
    first.give_back("die-checkpoint", 2)
    assert list(tmp_path.iterdir()) == []
    later = Faults(parse_faults("die-checkpoint@2"), str(tmp_path))
    assert later.fires("die-checkpoint", 2) and not first.fires("die-checkpoint", 2)
