"""How the launch-script readers compare: which bash constructs each parses, and seconds per script.

Readers: ``bashlex`` (a Python bash parser from PyPI, measured when
importable; it is not a zeromega dependency), zeromega's static reader
(``launch/shell_parse.py`` + ``shell_eval.py``) and ``--run-script`` (real
bash with the launchers recorded, ``launch/shell_run.py``). The scripts are
the corpus of ``tests/test_shell_script.py``.

    python bench/shell_readers.py            # PYTHONPATH=DIR to measure a bashlex installed in DIR
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from test_shell_script import CORPUS  # noqa: E402

from zeromega.launch import shell_script  # noqa: E402
from zeromega.launch.shell_parse import parse  # noqa: E402

CONSTRUCTS = {
    "if/elif/else with [[ ]]": 'if [ "$X" = y ]; then A=1\nelif [[ $X -gt 2 ]]; then A=2\nelse A=3\nfi\n',
    "[[ -n ... && ... ]]": '[[ -n "$X" && $Y == a* ]] && Z=1\n',
    "+= on a string": 'A="x"\nA+=" y"\n',
    "+= on an array": 'A=(a b)\nA+=(c)\n',
    "array with a comment holding (": 'A=(\n  --x 1  # note (a)\n  --y 2\n)\n',
    "comment ending in \\": '# a comment \\\npython t.py --lr 1\n',
    "multi-line \"...\" string": 'G="\n --a 1 \\\n --b 2\n"\n',
    "heredoc to a file": 'cat <<EOF > ds.json\n{"a": $X}\nEOF\n',
    "$(( ))": 'A=$(( X * 2 ))\n',
    "${X:-d} ${X:=d}": 'A=${X:-d} B=${Y:=e}\n',
    "${#A[@]} \"${A[@]}\"": 'N=${#A[@]}\npython t.py "${A[@]}"\n',
    "export, source, .": 'export A=1\nsource env.sh\n. env.sh\n',
    "2>&1 | tee, > file": 'python t.py --lr 1 2>&1 | tee log\npython t.py > out.log\n',
    "sed template > file": 'sed "s/CONFIG_BATCH_SIZE/$GBS/" tmpl.json > ds.json\n',
    "for loop": 'for i in 1 2; do echo $i; done\n',
    "case": 'case $M in 7B) H=4096;; *) H=1;; esac\n',
    "function": 'f() { echo hi; }\nf\n',
    "$(cmd | cmd)": 'G=$(nvidia-smi -L | wc -l)\n',
    "eval": 'eval ${run_cmd}\n',
}


def _bashlex():
    try:
        import bashlex
    except ImportError:
        return None
    return bashlex


def _parses(fn, text: str) -> str:
    try:
        fn(text)
        return "yes"
    except Exception as err:  # noqa: BLE001 - what each parser raises differs
        return f"NO ({type(err).__name__})"


def constructs() -> None:
    bashlex = _bashlex()
    bash = shutil.which("bash")
    print(f"{'construct':34} {'bashlex':24} {'zeromega static':18} bash -n")
    for name, text in CONSTRUCTS.items():
        lex = _parses(bashlex.parse, text) if bashlex else "not installed"
        ours = _parses(parse, text)
        real = "yes" if bash and subprocess.run([bash, "-n"], input=text, text=True,
                                                capture_output=True).returncode == 0 else "NO"
        print(f"{name:34} {lex:24} {ours:18} {real}")


def timings(repeats: int = 5) -> None:
    print(f"\n{'script':30} {'static ms':>10} {'--run-script ms':>16} {'ratio':>7}   same reading")
    for name, (script, files, env, *_rest) in sorted(CORPUS.items()):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            (folder / "run.sh").write_text(script)
            for file, text in files.items():
                (folder / file).write_text(text)
            best = {}
            got = {}
            for run in (False, True):
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    got[run] = shell_script.read(script, env, "run.sh", base=folder, run=run)
                    times.append(time.perf_counter() - start)
                best[run] = min(times) * 1000
            same = got[False].argv == got[True].argv and got[False].launcher == got[True].launcher
            print(f"{name:30} {best[False]:10.1f} {best[True]:16.1f} {best[True] / best[False]:6.1f}x   {same}")


if __name__ == "__main__":
    constructs()
    timings()
