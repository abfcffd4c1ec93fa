#!/usr/bin/env bash
# The compatibility watch: the test suite on each (transformers, torch) pair, one fresh venv per pair.
#
#     bash scripts/compat.sh [PAIR ...]          # default: floor pinned newest
#
# PAIR is TRANSFORMERS[/TORCH].  TRANSFORMERS: `floor` (setup.cfg's lower bound), `pinned`
# (constraints.txt), `newest` (the newest release setup.cfg admits, whatever the registry has today)
# or a version.  TORCH: `pinned` (constraints.txt: the CPU build on our machines; the default),
# `newest` (the newest release pip on this machine may install: torch's own requirement, unpinned)
# or a version.  Neither constraints.txt nor any other pin is used for the rest: what a user gets
# with `pip install vtprune[...]` and that transformers.  The venv is built from the README's
# extras; the README's test command then runs from the repo root (so a top-level folder that
# shadows an installed package fails it too).
#
# Environment: VTPRUNE_COMPAT_TESTS=all (default; the whole suite, as the README runs it) or
# `core` (the wrap, the cut, positions, generate modes, caches, summary tokens and bias, exits, videos, the
# layout, the lmms-eval plugin, the families' own tests: ~5 of the suite's ~11 minutes); VTPRUNE_COMPAT_DIR=DIR keeps the venvs there (default: a temp folder,
# removed at the end); VTPRUNE_COMPAT_EXTRAS (default dev,triton,eval,notebooks).
# Prints one line per pair (versions, pytest's closing line, seconds) and exits 1 if any failed.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PAIRS=("$@")
[ ${#PAIRS[@]} -eq 0 ] && PAIRS=(floor pinned newest)
TESTS="${VTPRUNE_COMPAT_TESTS:-all}"
EXTRAS="${VTPRUNE_COMPAT_EXTRAS:-dev,triton,eval,notebooks}"
CORE=(tests/test_layout.py tests/test_api.py tests/test_exact.py tests/test_drop_in.py tests/test_model_contract.py
      tests/test_positions.py tests/test_summary.py tests/test_exit.py tests/test_pdrop.py tests/test_vhr.py
      tests/test_eval.py tests/test_video.py tests/test_toy_video.py tests/test_gemma3.py tests/test_glm4v.py
      tests/test_llava_onevision.py tests/test_qwen3_5.py tests/test_gemma4.py tests/test_eval_video.py)
if [ -n "${VTPRUNE_COMPAT_DIR:-}" ]; then
    BASE="$VTPRUNE_COMPAT_DIR"; mkdir -p "$BASE"
else
    BASE="$(mktemp -d)"; trap 'rm -rf "$BASE"' EXIT
fi

floor() { sed -n 's/^ *transformers>=\([0-9.]*\),.*/\1/p' setup.cfg; }
pin() { sed -n "s/^$1==\([^ ]*\).*/\1/p" constraints.txt; }
upper() { sed -n 's/^ *transformers>=[0-9.]*,\(<[0-9.]*\).*/\1/p' setup.cfg; }

requirement() {  # name, wanted -> a pip requirement
    case "$2" in
        newest) [ "$1" = transformers ] && echo "transformers>=$(floor),$(upper)" || echo "$1" ;;
        pinned) echo "$1==$(pin "$1")" ;;
        floor) echo "$1==$(floor)" ;;
        *) echo "$1==$2" ;;
    esac
}

STATUS=0
SUMMARY=()
for pair in "${PAIRS[@]}"; do
    tf="${pair%%/*}"; th="pinned"; [ "$pair" != "$tf" ] && th="${pair#*/}"
    venv="$BASE/venv-${tf}-${th}"
    start=$SECONDS
    log="$BASE/${tf}-${th}.log"
    echo "== transformers $tf, torch $th: $venv (log $log)"
    {
        python3 -m venv "$venv" && "$venv/bin/python" -m pip install --quiet --upgrade pip &&
        # torch first, alone, then held where it is (lmms-eval's unpinned torchvision would replace it)
        "$venv/bin/python" -m pip install --quiet "$(requirement torch "$th")" &&
        "$venv/bin/python" -m pip freeze | grep -i '^torch==' >"$venv/torch.txt" &&
        "$venv/bin/python" -m pip install --quiet -c "$venv/torch.txt" -e ".[$EXTRAS]" "$(requirement transformers "$tf")"
    } >"$log" 2>&1
    if [ $? -ne 0 ]; then
        SUMMARY+=("transformers $tf / torch $th: install failed (see $log)"); STATUS=1; continue
    fi
    # the README's test command after the install: torchvision out unless it imports beside this torch
    "$venv/bin/python" -c "import torchvision" >/dev/null 2>&1 || "$venv/bin/python" -m pip uninstall -y -q torchvision >>"$log" 2>&1
    versions="$("$venv/bin/python" -c 'import torch, transformers; print(f"transformers {transformers.__version__}, torch {torch.__version__}")' 2>>"$log")"
    if [ "$TESTS" = core ]; then targets=("${CORE[@]}"); else targets=(); fi
    case ",$EXTRAS," in *,eval,*) eval_env=(VTPRUNE_REQUIRE_EVAL=1) ;; *) eval_env=() ;; esac
    # two workers where pytest-xdist is installed (the dev extra)
    if "$venv/bin/python" -c "import xdist" >/dev/null 2>&1; then workers=(-n 2); else workers=(); fi
    env "${eval_env[@]}" TRITON_INTERPRET=1 "$venv/bin/python" -m pytest -q "${workers[@]}" -p no:cacheprovider "${targets[@]}" >>"$log" 2>&1
    rc=$?
    closing="$(grep -E '^(=+ )?[0-9]+ (passed|failed)' "$log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')"
    SUMMARY+=("$versions [$TESTS]: ${closing:-no summary line (exit $rc)}, $((SECONDS - start)) s")
    [ $rc -ne 0 ] && STATUS=1 && tail -40 "$log"
done
echo
printf '%s\n' "${SUMMARY[@]}"
exit $STATUS
