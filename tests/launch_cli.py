"""Running a launcher as its own process, as a user does: the launchers define the same flags
(--config, --workdir), so they cannot be imported together into the test process."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu",
       "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}


def run(module: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """``python -m launch.<module> args...`` from the repository root."""
    return subprocess.run([sys.executable, "-m", f"launch.{module}", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The last line of stderr of a run that must have failed."""
    assert proc.returncode != 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    return proc.stderr.strip().splitlines()[-1]
