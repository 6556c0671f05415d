"""``--run-script``: run a launch script under real bash, with the launchers replaced by recorders.

This executes the user's script (only when asked, and the output says so):
in a scratch directory holding a copy of the files next to the script,
with a minimal environment (``PATH``, ``HOME`` in the scratch directory, and
the ``--env`` values, pinned read-only as the static read pins them, so
``GPUS=$(nvidia-smi -L | wc -l)`` keeps the ``--env GPUS=8`` given), stdin
closed and a time limit. ``torchrun``,
``deepspeed``, ``srun``, ``mpirun``, ``mpiexec``, ``accelerate`` and
``python``/``python3`` running a ``*.py`` file or ``-m
torch.distributed.run`` are bash functions (and, for child processes,
executables first on ``PATH``) that record their arguments and the script
line that called them, then return 0 without starting anything (a launcher given ``bash -c STRING``, as
BigScience's ``srun ... bash -c "$LAUNCHER $CMD"``, runs the string, so the
launch inside it is what gets recorded). Every
other command runs as the script says. Files the script writes in the
scratch directory (a heredoc or ``sed`` DeepSpeed JSON) are kept as
``Script.files``; the training command is picked as the static reader picks
it (:func:`.shell_script.pick`).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

from zeromega.config.errors import ConfigError

from . import limits

TIME_LIMIT = 20.0
"""Seconds the script may run before it is stopped (its process group killed)."""
LAUNCHERS = ("torchrun", "deepspeed", "srun", "mpirun", "mpiexec", "accelerate")
PYTHONS = ("python", "python3")
_MAX_COPY = 256
"""Files next to the script copied into the scratch directory (each at most limits.MAX_BYTES)."""

_RECORD = r'''
__zeromega_record() {
  local line="$1"; shift
  __zeromega_n=$(( ${__zeromega_n:-0} + 1 ))
  printf '%s\0' "$line" "$@" > "$ZEROMEGA_RECORD/$(printf %06d "$__zeromega_n").$BASHPID"
}
'''
_LAUNCHER_FUNCTION = r'''{name}() {{
  local i
  for (( i = 1; i < $#; i++ )); do
    if [[ "${{!i}}" == bash || "${{!i}}" == sh ]]; then
      local flag=$(( i + 1 )) body=$(( i + 2 ))
      if [[ "${{!flag}}" == -c ]]; then bash -c "${{!body}}"; return; fi
    fi
  done
  __zeromega_record "${{BASH_LINENO[0]}}" {name} "$@"
}}
'''
_PYTHON_FUNCTION = r'''{name}() {{
  local a
  for a in "$@"; do
    case "$a" in *.py|torch.distributed.run|torch.distributed.launch)
      __zeromega_record "${{BASH_LINENO[0]}}" {name} "$@"; return 0;; esac
  done
  command {name} "$@"
}}
'''
_EXECUTABLE = '''#!/bin/bash
{body}
{function}
{name} "$@"
'''


def _prelude() -> str:
    text = _RECORD
    for name in LAUNCHERS:
        text += _LAUNCHER_FUNCTION.format(name=name)
    for name in PYTHONS:
        text += _PYTHON_FUNCTION.format(name=name)
    return text


def _copy_siblings(base: Optional[Path], work: Path) -> dict[str, bytes]:
    """Copy the regular files next to the script (templates, sourced env files) into ``work``."""
    copied: dict[str, bytes] = {}
    if base is None or not base.is_dir():
        return copied
    for path in sorted(base.iterdir())[:_MAX_COPY]:
        try:
            if path.is_file() and not path.is_symlink() and path.stat().st_size <= limits.MAX_BYTES:
                data = path.read_bytes()
                (work / path.name).write_bytes(data)
                copied[path.name] = data
        except OSError:
            continue
    return copied


def _written(work: Path, copied: dict[str, bytes]) -> dict[str, str]:
    """Text files the script wrote (new or changed) under ``work``: relative, ``./`` and absolute keys."""
    files: dict[str, str] = {}
    count = 0
    for path in sorted(work.rglob("*")):
        count += 1
        if count > 4 * _MAX_COPY:
            break
        try:
            if not path.is_file() or path.is_symlink() or path.stat().st_size > limits.MAX_BYTES:
                continue
            data = path.read_bytes()
        except OSError:
            continue
        rel = path.relative_to(work).as_posix()
        if copied.get(rel) == data:
            continue
        text = data.decode("utf-8", errors="replace")
        for key in (rel, f"./{rel}", str(path)):
            files[key] = text
    return files


def read(text: str, env: dict[str, str], name: str, base: Optional[Path], pick):
    """The training command of the script as bash runs it (see the module docstring); ``pick`` is the
    static reader's choice of the training command (:func:`.shell_script.pick`, passed in so the two
    modules do not import each other)."""
    from .shell_eval import Command, Evaluator

    bash = shutil.which("bash")
    if bash is None:
        raise ConfigError("--run-script", name, "bash is not installed here", "drop --run-script (the static read "
                          "needs no bash)")
    with tempfile.TemporaryDirectory(prefix="zeromega-run-script-") as tmp:
        root = Path(tmp)
        work, bin_dir, record = root / "work", root / "bin", root / "record"
        for folder in (work, bin_dir, record):
            folder.mkdir()
        copied = _copy_siblings(base, work)
        prelude = root / "prelude.sh"
        pins = "".join(f"declare -rx {key}={shlex.quote(val)}\n" for key, val in env.items()
                       if re.fullmatch(r"[A-Za-z_]\w*", key))
        prelude.write_text(_prelude() + pins)
        for stub in (*LAUNCHERS, *PYTHONS):
            function = (_PYTHON_FUNCTION if stub in PYTHONS else _LAUNCHER_FUNCTION).format(name=stub)
            if stub in PYTHONS:  # the executable's fallback must find the real interpreter, not itself
                function = function.replace(f"command {stub}", f"PATH=\"$ZEROMEGA_PATH\" command {stub}")
            path = bin_dir / stub
            path.write_text(_EXECUTABLE.format(body=_RECORD, function=function, name=stub))
            path.chmod(0o755)
        script = work / (Path(name).name or "script.sh")
        script.write_text(text)
        copied[script.name] = text.encode()
        system_path = os.environ.get("PATH", "/usr/bin:/bin")
        run_env = {"PATH": f"{bin_dir}{os.pathsep}{system_path}", "ZEROMEGA_PATH": system_path,
                   "HOME": str(work), "BASH_ENV": str(prelude), "ZEROMEGA_RECORD": str(record), "LANG": "C.UTF-8",
                   **env}
        process = subprocess.Popen([bash, script.name], cwd=work, env=run_env, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, stderr = process.communicate(timeout=TIME_LIMIT)
        except subprocess.TimeoutExpired:
            _kill(process)
            raise ConfigError("--run-script", name, f"the script did not finish within {TIME_LIMIT:.0f} s under bash "
                              "(with the launchers recorded, not run)", "drop --run-script to read it statically, "
                              "or remove what waits (a sleep, a download) from the script") from None
        finally:
            _kill(process)
        commands = []
        lines = text.splitlines()
        for path in sorted(record.iterdir()):
            parts = path.read_bytes().decode("utf-8", errors="replace").split("\0")[:-1]
            if len(parts) < 2:
                continue
            line = int(parts[0]) if parts[0].isdigit() else 0
            shown = lines[line - 1].strip() if 0 < line <= len(lines) else " ".join(parts[1:4])
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            commands.append(Command(parts[1:], line, shown))
        files = _written(work, copied)
    if not commands:
        last = stderr.decode("utf-8", errors="replace").strip().splitlines()[-1:] or ["nothing on stderr"]
        raise ConfigError("--run-script", name, f"the script exited with status {process.returncode} under bash "
                          f"without starting a launcher or a *.py script (last line on stderr: {last[0][:200]})",
                          "check that the script runs with this environment (pass missing variables with --env "
                          "NAME=VALUE; an --env value is read-only under --run-script, so a `set -e` script that "
                          "assigns it stops)")
    evaluator = Evaluator(env, name, base)
    evaluator.commands = commands
    evaluator.state.files = files
    found = pick(evaluator, name)
    found.notes.insert(0, f"{name}: --run-script: ran it under bash in a scratch directory (its own commands ran; "
                          f"{', '.join(LAUNCHERS)} and python *.py were recorded, not started); the training "
                          f"command is line {found.line} ({found.command})")
    return found


def _kill(process: subprocess.Popen) -> None:
    """Stop the script's process group (what it left running in the background too)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except OSError:
        pass
    process.wait()
