"""`gptjt` whose reader stops early (`gptjt config | head`) ends quietly, as a shell command does."""

from __future__ import annotations

import os
import subprocess
import sys


def test_a_closed_pipe_ends_the_command_with_141_and_no_traceback():
    # a pipe whose reader is gone before the command starts: its first write fails, every time
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        p = subprocess.run([sys.executable, "-c", "import sys\nfrom gptjt_cli.main import main\n"
                            "sys.exit(main(['config']))"], stdout=write_end, stderr=subprocess.PIPE, timeout=120)
    finally:
        os.close(write_end)
    err = p.stderr.decode()
    assert p.returncode == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err
